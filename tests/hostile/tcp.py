"""TCP attackers: a peer-protocol client that sends what it likes and reads
only if it likes, a server that never reads, and an address whose connects
hang. Plus `transports_to`, to see what a peer in this process holds for a
connection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
from types import TracebackType
from typing import Self

import p2ptimeline as pt
from p2ptimeline._p2p.wire import Frame, FrameDecoder, Message, encode_frame

SERIALIZER = pt.CborSerializer()


class RawClient:
    """One TCP connection to a peer, driven frame by frame.

    Args:
        reader, writer: The open stream.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = FrameDecoder(SERIALIZER)
        self._next_id = 1

    @classmethod
    async def connect(
        cls,
        address: tuple[str, int],
        *,
        local_host: str | None = None,
        receive_buffer: int | None = None,
    ) -> Self:
        """Connect to `address`, from `local_host` (e.g. "127.0.0.2") if given.

        With `receive_buffer`, the socket's receive buffer is shrunk to that
        many bytes before connecting, so that a client that does not read
        stops taking bytes almost at once and the peer's replies pile up on
        its side.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if local_host is not None:
            sock.bind((local_host, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    @property
    def local_address(self) -> tuple[str, int]:
        """This end's address, as the peer sees it."""
        sockname: tuple[str, int] = self.writer.get_extra_info("sockname")[:2]
        return sockname

    def peer_side(self) -> asyncio.Transport | None:
        """The peer's end of this connection, if the peer runs in this
        process and has accepted it (see `transports_to`)."""
        found = transports_to(self.local_address)
        return found[0] if found else None

    def request(self, message: Message) -> int:
        """Send `message` as a request; returns its request id."""
        request_id = self._next_id
        self._next_id += 1
        self.send_bytes(
            encode_frame(SERIALIZER, Frame.of(message, request_id=request_id))
        )
        return request_id

    def send_bytes(self, data: bytes) -> None:
        """Send raw bytes (a frame, part of one, or garbage)."""
        self.writer.write(data)

    async def frames(self, count: int, *, within: float = 10.0) -> list[Frame]:
        """Read until `count` frames arrived (or raise TimeoutError)."""
        received: list[Frame] = []
        async with asyncio.timeout(within):
            while len(received) < count:
                data = await self.reader.read(65536)
                if not data:
                    break
                received += self._decoder.feed(data)
        return received

    async def closed_by_peer(self, *, within: float) -> bool:
        """Whether the peer closes the connection within `within` seconds
        (reading and discarding whatever it sends meanwhile)."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            return True
        return True

    def close(self) -> None:
        """Close the connection (no goodbye)."""
        self.writer.close()


def transports_to(address: tuple[str, int]) -> list[asyncio.Transport]:
    """The open asyncio transports of this process connected to `address`.

    Found through the garbage collector, so that a test can measure what a
    peer holds for one connection (`get_write_buffer_size()`) through any
    version of the library, whatever its internals.
    """
    found = []
    for thing in gc.get_objects():
        if isinstance(thing, asyncio.Transport) and not thing.is_closing():
            peername = thing.get_extra_info("peername")
            if peername is not None and tuple(peername[:2]) == address:
                found.append(thing)
    return found


class SilentServer:
    """A TCP server that accepts connections and never reads from them.

    Its sockets' receive buffers are shrunk to `receive_buffer` bytes, so
    that whoever writes to it is blocked almost at once. Use it as an async
    context manager; `address` is where it listens.
    """

    def __init__(self, *, receive_buffer: int = 4096) -> None:
        self._receive_buffer = receive_buffer
        self._server: asyncio.Server | None = None
        self.accepted: list[asyncio.StreamWriter] = []
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)
        sock.bind(("127.0.0.1", 0))
        self.address = sock.getsockname()[:2]

        async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted.append(writer)

        self._server = await asyncio.start_server(hold, sock=sock)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for writer in self.accepted:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class HangingPort:
    """A TCP port on every loopback address whose connects never complete.

    A listening socket whose accept queue is full: Linux then drops the SYNs
    of new connects, which hang until their timeout. Connects to any
    127.x.y.z at `port` hang alike, so that a test can have many distinct
    addresses that hang. A context manager.
    """

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._fillers: list[socket.socket] = []
        self.port = 0

    def __enter__(self) -> Self:
        self._listener.bind(("0.0.0.0", 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        for _ in range(3):  # one completes, the next ones wait in the queue
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))  # in progress
            self._fillers.append(filler)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for filler in self._fillers:
            filler.close()
        self._listener.close()

    def address(self, host: str = "127.0.0.1") -> tuple[str, int]:
        """An address at this port whose connects hang."""
        return (host, self.port)

    def connecting(self) -> int:
        """How many sockets of this process are trying to connect to the port
        (in state SYN_SENT), the fillers that keep the queue full aside."""
        fillers = {f.getsockname()[1] for f in self._fillers}
        ours = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("socket:["):
                    ours.add(target[len("socket:[") : -1])
        count = 0
        with open("/proc/net/tcp") as table:
            for line in table.read().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].split(":")[1], 16)
                remote_port = int(fields[2].split(":")[1], 16)
                count += (
                    fields[3] == "02"  # SYN_SENT
                    and remote_port == self.port
                    and local_port not in fillers
                    and fields[9] in ours  # the socket's inode
                )
        return count
