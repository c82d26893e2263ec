"""Helpers shared by the benchmarks: timing, percentiles, reporting."""

from __future__ import annotations

import asyncio
import collections
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import p2ptimeline as pt

T = TypeVar("T")


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `samples`, nearest-rank."""
    ordered = sorted(samples)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summary_ms(samples: Sequence[float]) -> str:
    """'p50 x ms, p99 y ms' for samples in seconds."""
    return (
        f"p50 {statistics.median(samples) * 1000:.3f} ms, "
        f"p99 {percentile(samples, 99) * 1000:.3f} ms"
    )


def header(title: str) -> None:
    """Print the benchmark's title, the command that ran it and the machine."""
    print(f"# {title}")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{platform.system()} {platform.release()}; {time.strftime('%Y-%m-%d %H:%M')}"
    )


async def bounded(
    job: Callable[[T], Awaitable[object]], items: Iterable[T], limit: int
) -> None:
    """`job(item)` for every item, at most `limit` at a time."""
    slots = asyncio.Semaphore(limit)

    async def run(item: T) -> None:
        async with slots:
            await job(item)

    await asyncio.gather(*(run(item) for item in items))


async def with_retries(
    job: Callable[[T], Awaitable[object]],
    items: Iterable[T],
    limit: int,
    errors: collections.Counter[str],
    tries: int = 3,
) -> list[T]:
    """`job(item)` for every item, at most `limit` at a time; the items that
    failed are tried again (up to `tries` times in all) once the others are
    done. Counts the errors by type; returns the items that never succeeded."""
    pending = list(items)
    for _ in range(tries):
        failed: list[T] = []

        async def attempt(item: T, failed: list[T] = failed) -> None:
            try:
                await job(item)
            except pt.P2PTimelineError as exc:
                errors[type(exc).__name__] += 1
                failed.append(item)

        await bounded(attempt, pending, limit)
        pending = failed
        if not pending:
            break
    return pending
