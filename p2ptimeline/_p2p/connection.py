"""The asyncio side of the peer protocol: one connection, and its `Limits`.

`wire` does the framing; this module moves frames over TCP (`pool` holds a
peer's outgoing connections, `server` its incoming ones). A connection
is an `asyncio.Protocol` (callbacks, not streams), so that it decides when
to read and knows what it holds. It carries many requests at once, matched
to replies by id. Every wait has a timeout, so a slow or silent peer only
ever delays the requests sent to it.

What one remote party can make a peer hold is bounded by `Limits`:

* bytes in: one frame being assembled, which must arrive whole within
  `frame_timeout` of its first byte;
* requests: `max_pending` handled at once per connection, four times as
  many queued, the rest refused; and no more read while those held take
  `max_buffered` bytes;
* replies: `max_buffered` bytes per connection, shared between replies
  being made (a handler reserves what its reply may take before it runs)
  and replies written but not yet taken by the remote (writing pauses past
  a third of the budget). While the budget is spent the connection's next
  requests are neither started nor read, and a remote that takes none of
  our bytes for `frame_timeout` is disconnected, as flow control in the
  manner of uvicorn's and aioquic's credit;
* connections: `max_connections` in all, `max_connections_per_host` from
  one address; a full server makes room by closing an idle connection
  that never completed a request before it refuses a newcomer;
* outgoing connects: `max_connecting` at once, and none to an address whose
  connect failed less than `connect_backoff` seconds ago.

Log lines a remote party can cause are rate-limited (`RateLimitedLog`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

import attrs

from .._errors import PeerUnreachable, Refused, RemoteError
from .._ratelog import RateLimitedLog
from .._serializer import Serializer
from .._tasks import Tasks
from .wire import (
    DEFAULT_MAX_FRAME_SIZE,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    GetPosts,
    Message,
    Refusal,
    encode_frame,
)

__all__ = ["LOG_INTERVAL", "Connection", "Handler", "Limits"]

log = logging.getLogger("p2ptimeline.peer")

Handler = Callable[[Message, tuple[str, int]], Awaitable[Message]]
"""Answers one request message from a remote address with a reply message."""

_SMALL_REPLY = 1024
"""Bytes reserved for the reply to any request but `GetPosts`: an `Ack` or
a `Refusal` (whose reason is at most 200 characters)."""
LOG_INTERVAL = 10.0
"""Seconds between two log lines of one kind that a remote party can cause."""


@attrs.frozen(kw_only=True)
class Limits:
    """Resource limits of the peer protocol, all configurable.

    They bound what one peer can cost another: memory (frame size, queued
    requests, bytes of replies held per connection), sockets (connections,
    per remote host too, connects in flight) and time (every wait has a
    timeout; a frame once started must arrive in `frame_timeout`, and bytes
    written must start being taken within it, so connections opened and
    never finished, or never read, are closed).
    """

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame accepted or sent, in bytes."""
    connect_timeout: float = 3.0
    """Seconds to open a TCP connection."""
    request_timeout: float = 5.0
    """Seconds to wait for the reply to a request (waiting for a connect
    slot, connecting and waiting to write included)."""
    frame_timeout: float = 10.0
    """Seconds a frame may take to arrive once its first byte has; also the
    longest a connection stays open while the remote takes none of the
    bytes we have written to it."""
    idle_timeout: float = 60.0
    """Seconds an unused connection stays open."""
    max_connections: int = 1024
    """Most incoming connections served at once (and outgoing ones kept)."""
    max_connections_per_host: int = 32
    """Most incoming connections served at once from one IP address."""
    max_pending: int = 32
    """Most requests served at once on one connection (four times as many
    may wait; more are refused)."""
    max_buffered: int = 768 * 1024
    """Most bytes of replies one incoming connection may make this peer
    hold: replies written but not taken by the remote (writing pauses past a
    third of this) plus replies being made, each counted at what it may take
    (`max_page_size` for a `GetPosts`, 1 KiB for any other request). While
    it is spent, the connection's next requests are neither read nor
    started. Apart from that, the requests read and not yet answered may
    take as many bytes (as received) before reading pauses."""
    max_page_size: int = 128 * 1024
    """Most bytes of one page of posts: the frame answering a `GetPosts`
    (at most `max_frame_size` of it is used). Larger pages mean fewer
    round trips for a pull, and fewer of them made at once per connection."""
    max_connecting: int = 64
    """Most outgoing connections being opened at once; other requests wait
    for a turn (within their `request_timeout`)."""
    connect_backoff: float = 2.0
    """Seconds after a failed connect during which requests to that address
    fail at once (4,096 such addresses at most are remembered); 0 to
    always try."""


class Connection(asyncio.Protocol):
    """Frames over one TCP connection: requests out and replies in (opened
    by a `ConnectionPool`), or requests in and replies out (accepted by a
    `PeerServer`, which gives the `handler` and an `admit` check)."""

    def __init__(
        self,
        serializer: Serializer,
        limits: Limits,
        ratelog: RateLimitedLog,
        handler: Handler | None = None,
        admit: Callable[[Connection], bool] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._serializer = serializer
        self._limits = limits
        self._log = ratelog
        self._handler = handler
        self._admit = admit
        self._decoder = FrameDecoder(serializer, limits.max_frame_size)
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self.remote: tuple[str, int] = ("", 0)
        self.last_used = self._loop.time()
        """When a request was last sent or answered (or the connection made)."""
        self.served = 0
        """Requests answered on this connection."""
        # Requests out, waiting for their replies.
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        # Requests in, being answered, and the bytes they came in.
        self._handlers = Tasks(log)
        self._slots = asyncio.Semaphore(limits.max_pending)
        self._requests_held = 0
        # Flow control: bytes reserved by replies being made, waiters for
        # room in FIFO order, and whether the remote takes what we write.
        self._high_water = limits.max_buffered // 3
        self._reserved = 0
        self._room: collections.deque[tuple[int, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._writing_paused = False
        self._written = 0
        self._taken = 0
        self._stall_timer: asyncio.TimerHandle | None = None
        # Reading: deadlines for the next byte (idle) and a frame's end.
        self._reading_paused = False
        self._idle_deadline: float | None = None
        self._frame_deadline: float | None = None
        self._read_timer: asyncio.TimerHandle | None = None

    # State

    @property
    def closed(self) -> bool:
        """Closed or closing: no more frames go either way."""
        return self._lost.done() or (
            self._transport is not None and self._transport.is_closing()
        )

    @property
    def idle(self) -> bool:
        """No request is waiting for a reply on this connection, either way."""
        return not len(self._handlers) and not self._pending

    def done(self, callback: Callable[[object], None]) -> None:
        """Call `callback` once the connection has closed."""
        self._lost.add_done_callback(callback)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peername = transport.get_extra_info("peername")
        if peername is None:  # gone before we got here
            transport.abort()
            return
        self.remote = tuple(peername[:2])
        transport.set_write_buffer_limits(
            high=self._high_water, low=self._high_water // 4
        )
        if self._admit is not None and not self._admit(self):
            transport.close()
            return
        if self._handler is not None:  # serving: idle peers get closed
            self._idle_deadline = self._loop.time() + self._limits.idle_timeout
            self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        before = self._decoder.buffered
        try:
            frames = self._decoder.feed(data)
        except RemoteError as exc:
            self._log.info("protocol", "closing connection to %s: %s", self.remote, exc)
            self.shut()
            return
        now = self._loop.time()
        limits = self._limits
        if self._handler is not None:
            self._idle_deadline = now + limits.idle_timeout
        if not self._decoder.buffered:
            self._frame_deadline = None
        elif frames or self._frame_deadline is None:  # a new frame began
            self._frame_deadline = now + limits.frame_timeout
        if frames:
            # What each request held costs: its share of the bytes it came in.
            consumed = before + len(data) - self._decoder.buffered
            share, rest = divmod(consumed, len(frames))
            for frame in frames:
                self._dispatch(frame, share + rest)
                rest = 0
            self._update_reading()
        self._arm_read_timer()

    def eof_received(self) -> bool:
        return False  # close our side too (after writing what is buffered)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()
        self._grant()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("connection to %s broke: %s", self.remote, exc)
        for timer in (self._read_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._read_timer = self._stall_timer = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionResetError("connection closed"))
        self._pending.clear()
        self._handlers.cancel()
        if not self._lost.done():
            self._lost.set_result(None)
        self._grant()  # fails every waiter for room

    # Requests out

    async def request(self, message: Message) -> Message:
        """Send a request and wait for its reply message (no timeout here:
        waiting for room to write and for the reply is the caller's to bound).

        Raises:
            PeerUnreachable: The connection broke.
            ProtocolError: The peer refused the request.
            FrameTooLarge: The request does not fit in a frame; nothing was sent.
        """
        request_id = next(self._ids)
        future: asyncio.Future[Message] = self._loop.create_future()
        self._pending[request_id] = future
        try:
            await self._reserve(0)  # until the remote takes what we wrote
            self._write(
                encode_frame(
                    self._serializer,
                    Frame.of(message, request_id=request_id),
                    self._limits.max_frame_size,
                )
            )
            reply = await future
        except (ConnectionError, OSError) as exc:
            raise PeerUnreachable(f"{self.remote}: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
            self.last_used = self._loop.time()
        if isinstance(reply, Refusal):
            raise Refused(f"{self.remote} refused: {reply.reason}", reply.reason)
        return reply

    # Requests in

    def _dispatch(self, frame: Frame, size: int) -> None:
        """Take one frame that came in `size` bytes."""
        if self.closed:  # e.g. an earlier frame of the same read closed it
            return
        if frame.reply_to:
            future = self._pending.get(frame.reply_to)
            if future is not None and not future.done():
                future.set_result(frame.message)
            return
        if self._handler is None:
            self._log.info(
                "unexpected", "dropped an unexpected request from %s", self.remote
            )
            return
        self.last_used = self._loop.time()
        if len(self._handlers) >= 4 * self._limits.max_pending:
            # Queued requests cost memory: past this, say no at once.
            self._log.info(
                "busy", "refused a request from %s: too many pending", self.remote
            )
            self._refuse(frame, "too many pending requests")
            return
        self._requests_held += size
        self._handlers.spawn(self._answer(frame, size))

    def _refuse(self, frame: Frame, reason: str) -> None:
        """Write a refusal now, if the budget has room for it; otherwise the
        remote is not reading its replies and is disconnected."""
        data = self._encode_reply(Refusal(reason=reason), frame.request_id)
        if self._held() + len(data) > self._limits.max_buffered:
            self._log.info(
                "unread",
                "closed the connection from %s: it does not read its replies",
                self.remote,
            )
            self.abort()
            return
        self._write(data)

    async def _answer(self, frame: Frame, size: int) -> None:
        """Answer a request that came in `size` bytes, counted as held until
        it is answered."""
        try:
            async with self._slots:
                await self._reply_within_budget(frame)
        except (ConnectionError, OSError):
            pass  # the connection closed: nobody to answer
        except Exception:
            self._log.exception(
                "answer", "failed to answer a request from %s", self.remote
            )
        finally:
            self._requests_held -= size
            self._update_reading()

    async def _reply_within_budget(self, frame: Frame) -> None:
        """Reserve room for the reply, make it, write it."""
        need = _SMALL_REPLY
        if isinstance(frame.message, GetPosts):
            need = min(self._limits.max_page_size, self._limits.max_frame_size)
        await self._reserve(need)
        try:
            reply = await self._reply_to(frame.message)
            data = self._encode_reply(reply, frame.request_id)
            del reply
            if len(data) > need:
                # Larger than its reservation (a handler ignoring
                # max_page_size): held uncounted until all of it fits.
                self._release(need)
                need = 0
                await self._reserve(len(data))
                need = len(data)
            self._write(data)
            self.served += 1
            self.last_used = self._loop.time()
        finally:
            self._release(need)

    async def _reply_to(self, message: Message) -> Message:
        assert self._handler is not None
        try:
            return await self._handler(message, self.remote)
        except (RemoteError, ValueError) as exc:  # UsageError is a ValueError
            self._log.info("refused", "refused a request from %s: %s", self.remote, exc)
            return Refusal(reason=str(exc)[:200])
        except Exception:
            self._log.exception(
                "handler", "failed to handle a request from %s", self.remote
            )
            return Refusal(reason="internal error")

    def _encode_reply(self, reply: Message, request_id: int) -> bytes:
        limit = self._limits.max_frame_size
        try:
            return encode_frame(
                self._serializer, Frame.of(reply, reply_to=request_id), limit
            )
        except FrameTooLarge as exc:
            self._log.warning("too-large", "a reply to %s: %s", self.remote, exc)
            refusal = Refusal(reason="reply too large")
            return encode_frame(
                self._serializer, Frame.of(refusal, reply_to=request_id), limit
            )

    # Flow control

    def _update_reading(self) -> None:
        """Serving, read no more requests while the replies written are not
        taken (a client keeps reading: replies are what unblock its peer),
        or while the requests held take the budget."""
        transport = self._transport
        if self._handler is None or transport is None or self._lost.done():
            return
        pause = self._writing_paused or self._requests_held >= self._limits.max_buffered
        if pause == self._reading_paused:
            return
        self._reading_paused = pause
        if pause:
            transport.pause_reading()
            return
        transport.resume_reading()
        now = self._loop.time()
        self._idle_deadline = now + self._limits.idle_timeout
        if self._decoder.buffered:
            self._frame_deadline = now + self._limits.frame_timeout
        self._arm_read_timer()

    def _held(self) -> int:
        """Bytes of replies this connection makes us hold right now."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport else 0
        return buffered + self._reserved

    def _has_room(self, size: int) -> bool:
        if self._writing_paused:
            return False
        budget = self._limits.max_buffered - self._high_water
        return self._reserved == 0 or self._reserved + size <= budget

    async def _reserve(self, size: int) -> None:
        """Wait until `size` more bytes fit in the budget, and take them.

        Waiters are served first come, first served. With `size` 0 it waits
        only until the transport takes writes again.

        Raises:
            ConnectionResetError: The connection closed.
        """
        if self.closed:
            raise ConnectionResetError("connection closed")
        if not self._room and self._has_room(size):
            self._reserved += size
            return
        future: asyncio.Future[None] = self._loop.create_future()
        entry = (size, future)
        self._room.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and not future.exception():
                self._release(size)  # granted, but its task was cancelled
            else:
                with contextlib.suppress(ValueError):  # already handed a failure
                    self._room.remove(entry)
                self._grant()
            raise

    def _release(self, size: int) -> None:
        if size:
            self._reserved -= size
            self._grant()

    def _grant(self) -> None:
        """Hand room to the waiters at the head of the queue, in order."""
        while self._room:
            size, future = self._room[0]
            if future.done():  # its waiter was cancelled
                self._room.popleft()
            elif self._lost.done():
                self._room.popleft()
                future.set_exception(ConnectionResetError("connection closed"))
            elif self._has_room(size):
                self._room.popleft()
                self._reserved += size
                future.set_result(None)
            else:
                return

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self.closed:
            raise ConnectionResetError("connection closed")
        transport.write(data)
        self._written += len(data)
        if self._stall_timer is None and transport.get_write_buffer_size():
            self._arm_stall_timer()

    def _arm_stall_timer(self) -> None:
        assert self._transport is not None
        self._taken = self._written - self._transport.get_write_buffer_size()
        self._stall_timer = self._loop.call_later(
            self._limits.frame_timeout, self._on_stall_timer
        )

    def _on_stall_timer(self) -> None:
        self._stall_timer = None
        transport = self._transport
        if transport is None or self._lost.done():
            return
        buffered = transport.get_write_buffer_size()
        if not buffered:
            return
        if self._written - buffered == self._taken:  # nothing taken since
            self._log.info(
                "stalled",
                "closed the connection with %s: it took none of %d bytes in %g s",
                self.remote,
                buffered,
                self._limits.frame_timeout,
            )
            self.abort()
            return
        self._arm_stall_timer()

    # Read deadlines

    def _read_deadline(self) -> float | None:
        if self._reading_paused:  # we stopped reading: not the remote's fault
            return None
        deadlines = [
            d for d in (self._idle_deadline, self._frame_deadline) if d is not None
        ]
        return min(deadlines, default=None)

    def _arm_read_timer(self) -> None:
        deadline = self._read_deadline()
        if deadline is None or self._lost.done():
            return
        timer = self._read_timer
        if timer is not None:
            if timer.when() <= deadline:
                return  # it fires first, and looks again then
            timer.cancel()
        self._read_timer = self._loop.call_at(deadline, self._on_read_timer)

    def _on_read_timer(self) -> None:
        self._read_timer = None
        deadline = self._read_deadline()
        if deadline is None or self._lost.done():
            return
        if self._loop.time() < deadline:
            self._arm_read_timer()
            return
        self._log.info(
            "idle", "closed an idle or stalled connection from %s", self.remote
        )
        self.shut()

    # Closing

    def shut(self) -> None:
        """Start closing: after writing what is buffered if that is nothing,
        at once otherwise (a remote that does not read would hold it open)."""
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def abort(self) -> None:
        """Close at once, dropping whatever is not sent yet."""
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Start closing and cancel the handlers; see `wait_closed`."""
        self.shut()
        self._handlers.cancel()

    async def wait_closed(self) -> None:
        """Wait until the handlers are done and the socket is closed."""
        await self._handlers.close()
        if self._transport is not None:
            await asyncio.shield(self._lost)
