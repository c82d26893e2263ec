"""The asyncio side of the peer protocol: connections, a pool, a server.

`_wire` does the framing; this module moves frames over asyncio streams.
A connection carries many requests at once, matched to replies by id. Every
wait has a timeout, and each connection has its own reader task, so a slow
or silent peer only ever delays the requests sent to it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

import attrs

from ._errors import PeerUnreachable, ProtocolError, RemoteError
from ._serializer import Serializer
from ._wire import (
    DEFAULT_MAX_FRAME_SIZE,
    Frame,
    FrameDecoder,
    Message,
    Refusal,
    encode_frame,
)

__all__ = ["ConnectionPool", "Handler", "Limits", "PeerServer"]

log = logging.getLogger("p2ptimeline.peer")

Handler = Callable[[Message, tuple[str, int]], Awaitable[Message]]
"""Answers one request message from a remote address with a reply message."""


@attrs.frozen(kw_only=True)
class Limits:
    """Resource limits of the peer protocol, all configurable.

    They bound what one peer can cost another: memory (frame size, queued
    requests), sockets (connections, per remote host too) and time (every
    wait has a timeout; a frame once started must arrive in `frame_timeout`,
    so connections opened and never finished are closed).
    """

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest frame accepted or sent, in bytes."""
    connect_timeout: float = 3.0
    """Seconds to open a TCP connection."""
    request_timeout: float = 5.0
    """Seconds to wait for the reply to a request."""
    frame_timeout: float = 10.0
    """Seconds a frame may take to arrive once its first byte has."""
    idle_timeout: float = 60.0
    """Seconds an unused connection stays open."""
    max_connections: int = 1024
    """Most incoming connections served at once."""
    max_connections_per_host: int = 32
    """Most incoming connections served at once from one IP address."""
    max_pending: int = 32
    """Most requests served at once on one connection (four times as many
    may wait; more are refused)."""


class _Connection:
    """Frames over one TCP stream: requests out and replies in, or the reverse."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        serializer: Serializer,
        limits: Limits,
        handler: Handler | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._serializer = serializer
        self._limits = limits
        self._handler = handler
        self._decoder = FrameDecoder(serializer, limits.max_frame_size)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(limits.max_pending)
        self.remote: tuple[str, int] = writer.get_extra_info("peername")[:2]
        self.last_used = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._read_loop(), name=f"peer {self.remote}")

    @property
    def closed(self) -> bool:
        return self._task.done()

    def done(self, callback: Callable[[object], None]) -> None:
        """Call `callback` once the connection has closed."""
        self._task.add_done_callback(callback)

    async def request(self, message: Message) -> Message:
        """Send a request and wait for its reply message (no timeout here).

        Raises:
            PeerUnreachable: The connection broke.
            ProtocolError: The peer refused the request.
        """
        request_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._send(Frame.of(message, request_id=request_id))
            reply = await future
        except (ConnectionError, OSError) as exc:
            raise PeerUnreachable(f"{self.remote}: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
            self.last_used = asyncio.get_running_loop().time()
        if isinstance(reply, Refusal):
            raise ProtocolError(f"{self.remote} refused: {reply.reason}")
        return reply

    def _send(self, frame: Frame) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("connection closed")
        data = encode_frame(self._serializer, frame, self._limits.max_frame_size)
        self._writer.write(data)

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        limits = self._limits
        frame_deadline = None
        try:
            while True:
                deadline = None
                if self._handler is not None:  # serving: idle peers get closed
                    deadline = loop.time() + limits.idle_timeout
                if frame_deadline is not None:  # in the middle of a frame
                    deadline = min(deadline or frame_deadline, frame_deadline)
                async with asyncio.timeout_at(deadline):
                    data = await self._reader.read(65536)
                if not data:
                    break
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
                if not self._decoder.buffered:
                    frame_deadline = None
                elif frame_deadline is None:
                    frame_deadline = loop.time() + limits.frame_timeout
        except TimeoutError:
            log.info("closed an idle or stalled connection from %s", self.remote)
        except RemoteError as exc:
            log.info("closing connection to %s: %s", self.remote, exc)
        except (ConnectionError, OSError) as exc:
            log.debug("connection to %s broke: %s", self.remote, exc)
        finally:
            self._fail_pending()
            self._writer.close()  # `close()` waits until it is closed

    def _dispatch(self, frame: Frame) -> None:
        if frame.reply_to:
            future = self._pending.get(frame.reply_to)
            if future is not None and not future.done():
                future.set_result(frame.message)
            return
        if self._handler is None:
            log.info("dropped an unexpected request from %s", self.remote)
            return
        if len(self._handlers) >= 4 * self._limits.max_pending:
            # Queued requests cost memory: past this, say no at once.
            log.info("refused a request from %s: too many pending", self.remote)
            with contextlib.suppress(ConnectionError, OSError, ProtocolError):
                reply = Refusal(reason="too many pending requests")
                self._send(Frame.of(reply, reply_to=frame.request_id))
            return
        task = asyncio.create_task(self._answer(frame))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _answer(self, frame: Frame) -> None:
        assert self._handler is not None
        async with self._slots:
            try:
                reply = await self._handler(frame.message, self.remote)
            except RemoteError as exc:
                log.info("refused a request from %s: %s", self.remote, exc)
                reply = Refusal(reason=str(exc)[:200])
            except Exception:
                log.exception("failed to handle a request from %s", self.remote)
                reply = Refusal(reason="internal error")
        with contextlib.suppress(ConnectionError, OSError, ProtocolError):
            self._send(Frame.of(reply, reply_to=frame.request_id))

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionResetError("connection closed"))
        self._pending.clear()

    async def close(self) -> None:
        self._task.cancel()
        handlers = [self._task, *self._handlers]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class ConnectionPool:
    """Outgoing connections, one per remote address, reused between requests."""

    def __init__(self, serializer: Serializer, limits: Limits) -> None:
        self._serializer = serializer
        self._limits = limits
        self._connections: collections.OrderedDict[tuple[str, int], _Connection] = (
            collections.OrderedDict()
        )
        self._opening: dict[tuple[str, int], asyncio.Future[_Connection]] = {}
        self._closed = False

    async def request(self, address: tuple[str, int], message: Message) -> Message:
        """Send `message` to the peer at `address` and return its reply.

        Raises:
            PeerUnreachable: It cannot be reached, or did not answer within
                `Limits.request_timeout`.
            ProtocolError: It refused the request or broke the protocol.
        """
        try:
            async with asyncio.timeout(self._limits.request_timeout):
                connection = await self._connection(address)
                return await connection.request(message)
        except TimeoutError:
            raise PeerUnreachable(f"{address} did not answer in time") from None

    async def _connection(self, address: tuple[str, int]) -> _Connection:
        if self._closed:
            raise PeerUnreachable("the connection pool is closed")
        connection = self._connections.get(address)
        if connection is not None and not connection.closed:
            self._connections.move_to_end(address)
            return connection
        opening = self._opening.get(address)
        if opening is None:
            opening = asyncio.ensure_future(self._open(address))
            self._opening[address] = opening
            opening.add_done_callback(lambda _: self._opening.pop(address, None))
        return await asyncio.shield(opening)

    async def _open(self, address: tuple[str, int]) -> _Connection:
        try:
            async with asyncio.timeout(self._limits.connect_timeout):
                reader, writer = await asyncio.open_connection(*address)
        except (OSError, TimeoutError) as exc:
            raise PeerUnreachable(f"cannot connect to {address}: {exc!r}") from None
        connection = _Connection(reader, writer, self._serializer, self._limits)
        self._connections[address] = connection
        await self._evict()
        return connection

    async def _evict(self) -> None:
        now = asyncio.get_running_loop().time()
        stale = [
            address
            for address, c in self._connections.items()
            if c.closed or now - c.last_used > self._limits.idle_timeout
        ]
        while len(self._connections) - len(stale) > self._limits.max_connections:
            stale.append(next(a for a in self._connections if a not in stale))
        for address in stale:
            connection = self._connections.pop(address, None)
            if connection is not None:  # another eviction may have taken it
                await connection.close()

    async def close(self) -> None:
        """Close every connection. Idempotent."""
        self._closed = True
        connections = list(self._connections.values())
        self._connections.clear()
        await asyncio.gather(*(c.close() for c in connections))


class PeerServer:
    """Accepts peer connections and answers their requests with `handler`."""

    def __init__(
        self, handler: Handler, serializer: Serializer, limits: Limits
    ) -> None:
        self._handler = handler
        self._serializer = serializer
        self._limits = limits
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._per_host: collections.Counter[str] = collections.Counter()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on TCP `host`:`port`; returns the address bound."""
        self._server = await asyncio.start_server(self._accept, host, port)
        sockname: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return sockname

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host = writer.get_extra_info("peername")[0]
        if (
            len(self._connections) >= self._limits.max_connections
            or self._per_host[host] >= self._limits.max_connections_per_host
        ):
            log.warning("too many connections: refused one from %s", host)
            writer.close()
            return
        connection = _Connection(
            reader, writer, self._serializer, self._limits, self._handler
        )
        self._connections.add(connection)
        self._per_host[host] += 1

        def forget(_: object) -> None:
            self._connections.discard(connection)
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]

        connection.done(forget)

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await asyncio.gather(*(c.close() for c in list(self._connections)))
        if server is not None:
            await server.wait_closed()
