"""A peer-protocol client that sends what it likes and reads only if it likes."""

from __future__ import annotations

import asyncio
import socket
from typing import Self

import p2ptimeline as pt
from p2ptimeline._wire import Frame, FrameDecoder, Message, encode_frame

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
