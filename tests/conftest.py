"""Shared test configuration."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import HealthCheck, settings

import p2ptimeline as pt

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", parent=settings.get_profile("default"), derandomize=True, print_blob=True
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

NetworkFactory = Callable[..., Awaitable[list[pt.DhtRegistry]]]


@pytest.fixture
async def network() -> AsyncIterator[NetworkFactory]:
    """A factory of DHT networks on 127.0.0.1, all stopped at the end.

    ``await network(n, **options)`` starts `n` registries; the first is the
    bootstrap node of the others.
    """
    started: list[pt.DhtRegistry] = []

    async def start(count: int, **options: object) -> list[pt.DhtRegistry]:
        options = {"ksize": 8, "rpc_timeout": 2.0, **options}
        first = pt.DhtRegistry(**options)  # type: ignore[arg-type]
        await first.start("127.0.0.1", 0)
        started.append(first)
        nodes = [first]
        for _ in range(count - 1):
            node = pt.DhtRegistry(**options)  # type: ignore[arg-type]
            await node.start("127.0.0.1", 0, bootstrap=[first.address])
            started.append(node)
            nodes.append(node)
        return nodes

    yield start
    await asyncio.gather(*(node.stop() for node in started))
