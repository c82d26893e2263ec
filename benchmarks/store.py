"""LocalStore benchmark: insert throughput and timeline latency.

100 authors x 1,000 posts. For SqliteStore and MemoryStore, and for a
baseline shaped like the seed's storage (a Python list pickled to a .dat
file every 1,000 posts, the timeline sorted on every read), in one run:

* insert throughput, one post per `add` (each one durable for SqliteStore)
  and in batches of 1,000;
* `timeline(limit=50)` latency over all 100 authors and over 10 of them,
  at random cursors (median, p99).

Run: python benchmarks/store.py [--authors 100] [--posts 1000] [--reads 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _common import header, summary_ms

import p2ptimeline as pt
from p2ptimeline.testing import make_posts


class SeedLikeStore:
    """The seed's storage: a list, pickled now and then, sorted per read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.posts: list[pt.Post] = []
        self._unsaved = 0

    async def add(self, posts: Iterable[pt.Post]) -> list[pt.Post]:
        new = list(posts)
        self.posts.extend(new)
        self._unsaved += len(new)
        if self._unsaved >= 1000:
            await asyncio.to_thread(self._save)
            self._unsaved = 0
        return new

    def _save(self) -> None:
        with open(self.path, "wb") as file:
            pickle.dump(self.posts, file)

    async def timeline(
        self,
        authors: Collection[str],
        *,
        limit: int = 50,
        before: pt.Post | None = None,
    ) -> list[pt.Post]:
        wanted = set(authors)
        mine = [p for p in self.posts if p.author in wanted]
        if before is not None:
            mine = [p for p in mine if p.sort_key < before.sort_key]
        mine.sort(key=lambda p: p.sort_key, reverse=True)
        return mine[:limit]


async def measure(
    name: str, store: Any, posts: list[pt.Post], single: int, reads: int
) -> float:
    """Print one table row for `store`; return its 100-author timeline p50."""
    start = time.perf_counter()
    for post in posts[:single]:
        await store.add([post])
    single_rate = single / (time.perf_counter() - start)

    rest = posts[single:]
    start = time.perf_counter()
    for i in range(0, len(rest), 1000):
        await store.add(rest[i : i + 1000])
    batch_rate = len(rest) / (time.perf_counter() - start)

    authors = sorted({p.author for p in posts})
    cursors = [None, *random.Random(7).sample(posts, reads)]
    latencies: dict[str, list[float]] = {}
    for label, subset in (("all", authors), ("ten", authors[:10])):
        latencies[label] = []
        for cursor in cursors:
            t = time.perf_counter()
            page = await store.timeline(subset, limit=50, before=cursor)
            latencies[label].append(time.perf_counter() - t)
            assert len(page) <= 50
    print(
        f"| {name} | {single_rate:,.0f} | {batch_rate:,.0f} | "
        f"{summary_ms(latencies['all'])} | {summary_ms(latencies['ten'])} |"
    )
    return statistics.median(latencies["all"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", type=int, default=100)
    parser.add_argument("--posts", type=int, default=1000, help="posts per author")
    parser.add_argument("--reads", type=int, default=300, help="timeline reads")
    parser.add_argument("--single", type=int, default=5000, help="posts added singly")
    args = parser.parse_args()
    header("LocalStore benchmark")

    started = time.perf_counter()
    posts = []
    for a in range(args.authors):
        start_ms = 1_700_000_000_000 + a
        posts += make_posts(f"user{a}", args.posts, start_ms=start_ms, step_ms=997)
    random.Random(1).shuffle(posts)
    took = time.perf_counter() - started
    print(f"{len(posts):,} posts by {args.authors} authors (signed in {took:.1f} s)\n")
    print(
        "| store | inserts/s, one per add | inserts/s, batches of 1,000 "
        "| timeline(limit=50), 100 authors | timeline(limit=50), 10 authors |"
    )
    print("|---|---|---|---|---|")
    p50 = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with pt.SqliteStore(os.path.join(tmp, "bench.db")) as sqlite:
            p50["sqlite"] = await measure(
                "SqliteStore (WAL, synchronous=NORMAL)",
                sqlite,
                posts,
                args.single,
                args.reads,
            )
        async with pt.MemoryStore() as memory:
            p50["memory"] = await measure(
                "MemoryStore", memory, posts, args.single, args.reads
            )
        seed = SeedLikeStore(Path(tmp) / "posts.dat")
        # Sorting every post on each read is slow: a tenth of the reads.
        p50["seed"] = await measure(
            "baseline: seed-like list + pickle",
            seed,
            posts,
            args.single,
            args.reads // 10,
        )
    ratio = p50["seed"] / p50["sqlite"]
    verdict = "met" if p50["sqlite"] < 0.005 else "NOT met"
    print(
        f"\ntimeline p50 over 100 authors: SqliteStore {ratio:.0f}x faster than the"
        f" seed-like baseline; target (SqliteStore p50 < 5 ms): {verdict}"
    )


if __name__ == "__main__":
    asyncio.run(main())
