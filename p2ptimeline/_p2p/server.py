"""`PeerServer`: accepts other peers' connections and answers their requests.

At most `Limits.max_connections` connections in all and
`Limits.max_connections_per_host` from one address; a full server makes
room by closing an idle connection that never completed a request (then
the one idle longest) before it refuses a newcomer.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from .._ratelog import RateLimitedLog
from .._serializer import Serializer
from .connection import LOG_INTERVAL, Connection, Handler, Limits

__all__ = ["PeerServer"]

log = logging.getLogger("p2ptimeline.peer")


class PeerServer:
    """Accepts peer connections and answers their requests with `handler`."""

    def __init__(
        self, handler: Handler, serializer: Serializer, limits: Limits
    ) -> None:
        self._handler = handler
        self._serializer = serializer
        self._limits = limits
        self._log = RateLimitedLog(log, LOG_INTERVAL)
        self._server: asyncio.Server | None = None
        self._connections: dict[Connection, str] = {}
        self._per_host: collections.Counter[str] = collections.Counter()
        self._closing = False

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on TCP `host`:`port`; returns the address bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_connection, host, port)
        sockname: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return sockname

    def _new_connection(self) -> Connection:
        return Connection(
            self._serializer,
            self._limits,
            self._log,
            handler=self._handler,
            admit=self._admit,
        )

    def _admit(self, connection: Connection) -> bool:
        """Whether to serve a connection just accepted; makes room if need be."""
        host = connection.remote[0]
        limits = self._limits
        if self._closing:
            return False
        if self._per_host[host] >= limits.max_connections_per_host:
            self._log.warning(
                "host-full", "too many connections: refused one from %s", host
            )
            return False
        if len(self._connections) >= limits.max_connections:
            idlest = self._idlest()
            if idlest is None:
                self._log.warning(
                    "full", "too many connections: refused one from %s", host
                )
                return False
            self._log.info(
                "evicted",
                "too many connections: closed an idle one from %s for one from %s",
                idlest.remote,
                host,
            )
            self._forget(idlest)
            idlest.close()
        self._connections[connection] = host
        self._per_host[host] += 1
        connection.done(lambda _: self._forget(connection))
        return True

    def _idlest(self) -> Connection | None:
        """The connection to close for a newcomer: one without requests in
        progress, that never completed one if any, and idle the longest."""
        idle = (c for c in self._connections if c.idle)
        return min(idle, key=lambda c: (c.served > 0, c.last_used), default=None)

    def _forget(self, connection: Connection) -> None:
        host = self._connections.pop(connection, None)
        if host is None:
            return
        self._per_host[host] -= 1
        if not self._per_host[host]:
            del self._per_host[host]

    async def close(self) -> None:
        """Stop listening and close every connection. Idempotent."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        await asyncio.gather(*(c.wait_closed() for c in connections))
        if server is not None:
            await server.wait_closed()
