"""Shared test configuration."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import p2ptimeline as pt
from p2ptimeline.testing import LocalNetwork, local_network

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", parent=settings.get_profile("default"), derandomize=True, print_blob=True
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

NetworkFactory = Callable[..., Awaitable[list[pt.DhtRegistry]]]
PeerFactory = Callable[..., Awaitable[list[pt.Peer]]]

FAST = pt.PeerConfig(seal_cost=10, ksize=8, lease=30.0, pull_interval=3600.0)
"""Peers for tests: cheap sealing (Argon2id at 1 MiB), small DHT buckets, no
periodic pull getting in the way."""


@pytest.fixture
async def network() -> AsyncIterator[NetworkFactory]:
    """A factory of DHT networks on 127.0.0.1, all stopped at the end.

    ``await network(n, **options)`` starts `n` registries; the first is the
    bootstrap node of the others.
    """
    started: list[pt.DhtRegistry] = []

    async def start(count: int, **options: object) -> list[pt.DhtRegistry]:
        options = {"ksize": 8, "rpc_timeout": 2.0, **options}
        first = pt.DhtRegistry("127.0.0.1", 0, **options)  # type: ignore[arg-type]
        started.append(first)
        await first.start()
        nodes = [first]
        for _ in range(count - 1):
            node = pt.DhtRegistry("127.0.0.1", 0, [first.address], **options)  # type: ignore[arg-type]
            started.append(node)
            await node.start()
            nodes.append(node)
        return nodes

    yield start
    await asyncio.gather(*(node.stop() for node in started))


@pytest.fixture
async def local_net() -> AsyncIterator[LocalNetwork]:
    """A local network of `FAST` peers: one bootstrap node, peers added by the
    test (`add_peer`, `add_users`); everything stopped at the end."""
    async with local_network(config=FAST) as net:
        yield net


@pytest.fixture
def peers(local_net: LocalNetwork) -> PeerFactory:
    """A factory of peers joined through one bootstrap node; all stopped at the end.

    ``await peers(n, **options)`` starts `n` peers at once; options go to
    `LocalNetwork.add_peer` (`config` is `FAST`, and `clock` one without NTP
    servers, unless given).
    """

    async def start(count: int, **options: Any) -> list[pt.Peer]:
        adding = (local_net.add_peer(**options) for _ in range(count))
        return list(await asyncio.gather(*adding))

    return start
