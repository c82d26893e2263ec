"""Pushes a hostile sender can make: its own genuine post, any tree it likes.

The tree in a `PostPush` is not signed, so whoever holds a genuine post (its
author first) can list any members at any addresses, and as many as a frame
holds. The frames here are built from plain values and encoded with `cbor2`
directly, without the library's validators, so that they are exactly what a
hostile program could send, whichever version of the library receives them.

`ConnectCounter` watches the other side: it counts the connection attempts a
process makes to chosen ports, at the socket, below whatever the library
uses to connect.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

import cbor2
import pytest

import p2ptimeline as pt
from p2ptimeline._p2p.wire import PROTOCOL_VERSION

SERIALIZER = pt.CborSerializer()

Member = tuple[str, str, int]
"""A tree member as plain values: (username, host, port)."""


def closed_port() -> int:
    """A TCP port of 127.0.0.1 with nothing listening: connecting to it, at
    any 127.x.y.z address, is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def unreachable_members(count: int, port: int, *, first: int = 0) -> list[Member]:
    """`count` members with made-up names at distinct loopback addresses
    (127.1.x.y) on `port`, where nothing listens."""
    return [
        (f"ghost{i}", f"127.1.{i // 250}.{i % 250 + 1}", port)
        for i in range(first, first + count)
    ]


def plain(value: object) -> Any:
    """`value` (a post, a record) as the plain CBOR tree a frame carries."""
    return cbor2.loads(SERIALIZER.encode(value))


def raw_frame(
    request_id: int, *, version: int = PROTOCOL_VERSION, **message: object
) -> bytes:
    """A request frame carrying `message` (one field of `Frame`, as plain
    values), length prefix included; nothing is validated."""
    body = cbor2.dumps({"version": version, "request_id": request_id, **message})
    return struct.pack("!I", len(body)) + body


def raw_push(
    post: pt.Post, tree: Sequence[Member], *, fanout: int = 2, request_id: int = 1
) -> bytes:
    """A `PostPush` frame of `post` with `tree` (receiver first), as is."""
    members = [{"name": n, "host": h, "port": p} for n, h, p in tree]
    push = {"post": plain(post), "fanout": fanout, "tree": members}
    return raw_frame(request_id, push=push)


class ConnectCounter:
    """Counts the TCP connection attempts this process makes to `ports`.

    Installed with `watch`, it wraps `socket.socket.connect`, which asyncio
    calls for every outgoing connection (`open_connection`,
    `create_connection` and `sock_connect` alike), so it counts attempts
    whatever layer above makes them.
    """

    def __init__(self, ports: Sequence[int]) -> None:
        self.ports = frozenset(ports)
        self.attempts = 0
        self.addresses: set[tuple[str, int]] = set()

    def watch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Start counting (until `monkeypatch` is undone)."""
        real = socket.socket.connect

        def connect(sock: socket.socket, address: Any) -> None:
            if isinstance(address, tuple) and address[1] in self.ports:
                self.attempts += 1
                self.addresses.add((address[0], address[1]))
            return real(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)
