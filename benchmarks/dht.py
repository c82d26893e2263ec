"""DHT benchmark: DhtRegistry against vanilla kademlia, at 100 and 1,000 nodes.

For each size, builds a network of `DhtRegistry` nodes and one of plain
`kademlia.network.Server` nodes (ksize=20, alpha=3 for both), all in this
process on 127.0.0.1 with ports chosen by the OS, and measures in one run:

* set latency: one DHT write from a random node (ours: a new version of a
  user's signed presence record; vanilla: ``server.set(key, "v<i>")``);
* get latency: one DHT read of the same key from another random node, right
  after the write returned;
* read-after-write freshness: % of those reads returning the version just
  written (ours: the presence's port; vanilla: the string).

Each node joins through 1-3 random nodes already up; once all are up, each
bootstraps once more so that the early nodes learn of the later ones. Every
set does its own node lookup: our writer's 5-second lookup cache is emptied
before each write, since vanilla has none. Everything runs on one event loop,
so a latency here is the CPU time of every node an operation touches. Two
costs of running all nodes in one process are kept out: our nodes share one
serializer (whose decoders each process builds once), and the objects of the
built network are frozen out of the garbage collector during the trials.

Run: python benchmarks/dht.py [--sizes 100 1000] [--trials 200 100] [--keys 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs
from kademlia.network import Server

sys.path.insert(0, str(Path(__file__).parent))

from _common import header, percentile

import p2ptimeline as pt

KSIZE, ALPHA = 20, 3
HOST = "127.0.0.1"

Address = tuple[str, int]
# (trial number, key number, node index) -> None
Write = Callable[[int, int, int], Awaitable[None]]
# (trial number, key number, node index) -> whether it read that trial's write
Read = Callable[[int, int, int], Awaitable[bool]]


@attrs.frozen(kw_only=True)
class Network:
    """A running network, and how to write and read one of its keys."""

    label: str
    """Which implementation."""
    nodes: int
    """Number of nodes."""
    build_s: float
    """Seconds it took to start and join every node (extra round included)."""
    contacts: float
    """Mean routing-table size after the build."""
    write: Write
    """One DHT set of a key's new version, from one node."""
    read: Read
    """One DHT get of a key, from one node."""


@attrs.frozen(kw_only=True)
class Result:
    """One network's measurements."""

    network: Network
    """The network measured."""
    sets: list[float]
    """Latency of each set, in seconds."""
    gets: list[float]
    """Latency of each get, in seconds."""
    fresh: int
    """Gets that returned the value just set."""
    errors: int
    """Trials where the set or the get raised."""

    def row(self) -> str:
        """This result as a markdown table row."""
        trials = len(self.gets) + self.errors
        return (
            f"| {self.network.label} | {self.network.nodes:,} "
            f"| {ms(self.sets, 50)} | {ms(self.sets, 99)} "
            f"| {ms(self.gets, 50)} | {ms(self.gets, 99)} "
            f"| {100 * self.fresh / trials:.1f}% ({self.fresh}/{trials}) |"
        )


def ms(samples: list[float], q: float) -> str:
    """The q-th percentile of `samples` (seconds), in milliseconds."""
    if not samples:
        return "-"
    value = statistics.median(samples) if q == 50 else percentile(samples, q)
    return f"{value * 1000:.1f} ms"


def joins(rng: random.Random, nodes: int) -> list[list[int]]:
    """For each node, 1-3 indices of nodes started before it (none for the first)."""
    return [rng.sample(range(i), min(i, rng.randint(1, 3))) for i in range(nodes)]


def rejoins(rng: random.Random, nodes: int) -> list[list[int]]:
    """For each node, 1-3 indices of other nodes, for the extra bootstrap round."""
    return [
        [j + (j >= i) for j in rng.sample(range(nodes - 1), rng.randint(1, 3))]
        for i in range(nodes)
    ]


async def start_ours(
    stack: contextlib.AsyncExitStack,
    nodes: int,
    keys: int,
    seed: int,
    rpc_timeout: float,
) -> Network:
    """Start a network of `DhtRegistry` nodes; `stack` stops them."""
    rng = random.Random(seed)
    # One serializer for all: it builds its decoders on first use, which a
    # long-running node has done long ago.
    serializer = pt.CborSerializer()
    started = time.perf_counter()
    registries: list[pt.DhtRegistry] = []
    for boot in joins(rng, nodes):
        registry = pt.DhtRegistry(
            HOST,
            0,
            [registries[j].address for j in boot],
            ksize=KSIZE,
            alpha=ALPHA,
            rpc_timeout=rpc_timeout,
            serializer=serializer,
        )
        await registry.start()
        stack.push_async_callback(registry.stop)
        registries.append(registry)
    for registry, boot in zip(registries, rejoins(rng, nodes), strict=True):
        await registry._started().bootstrap([registries[j].address for j in boot])
    build_s = time.perf_counter() - started

    users = [pt.Identity.generate() for _ in range(keys)]
    for user in users:  # a first version, so that no read finds nothing
        await registries[0]._publish_presence(user, (HOST, 1), online=True)

    # The users' presence records, written with a distinct port per trial,
    # by the registry's own lower-level calls: exactly one DHT set or get.
    async def write(trial: int, key: int, node: int) -> None:
        registries[node]._started()._lookups.clear()  # a lookup per set
        await registries[node]._publish_presence(
            users[key], (HOST, 1024 + trial), online=True
        )

    async def read(trial: int, key: int, node: int) -> bool:
        got = await registries[node]._read_presence(users[key].public_key)
        return got is not None and got.port == 1024 + trial

    return Network(
        label="ours: DhtRegistry",
        nodes=nodes,
        build_s=build_s,
        contacts=statistics.mean(len(r.neighbors()) for r in registries),
        write=write,
        read=read,
    )


async def start_vanilla(
    stack: contextlib.AsyncExitStack, nodes: int, keys: int, seed: int
) -> Network:
    """Start a network of plain kademlia `Server`s; `stack` stops them."""
    rng = random.Random(seed)
    started = time.perf_counter()
    servers: list[Server] = []
    addresses: list[Address] = []
    for boot in joins(rng, nodes):
        server = Server(ksize=KSIZE, alpha=ALPHA)
        await server.listen(0, interface=HOST)
        stack.callback(server.stop)
        if boot:
            await server.bootstrap([addresses[j] for j in boot])
        servers.append(server)
        addresses.append(server.transport.get_extra_info("sockname")[:2])
    for server, boot in zip(servers, rejoins(rng, nodes), strict=True):
        await server.bootstrap([addresses[j] for j in boot])
    build_s = time.perf_counter() - started

    names = [f"user{k}" for k in range(keys)]
    for name in names:
        await servers[0].set(name, "v-first")

    async def write(trial: int, key: int, node: int) -> None:
        await servers[node].set(names[key], f"v{trial}")

    async def read(trial: int, key: int, node: int) -> bool:
        return bool(await servers[node].get(names[key]) == f"v{trial}")

    return Network(
        label="vanilla: kademlia.Server",
        nodes=nodes,
        build_s=build_s,
        contacts=statistics.mean(
            sum(len(b) for b in s.protocol.router.buckets) for s in servers
        ),
        write=write,
        read=read,
    )


async def measure(network: Network, trials: int, keys: int, seed: int) -> Result:
    """Write from a random node, read from another one, `trials` times."""
    rng = random.Random(seed)
    sets: list[float] = []
    gets: list[float] = []
    fresh = errors = 0
    for trial in range(trials):
        writer, reader = rng.sample(range(network.nodes), 2)
        key = trial % keys
        try:
            started = time.perf_counter()
            await network.write(trial, key, writer)
            written = time.perf_counter()
            fresh += await network.read(trial, key, reader)
            sets.append(written - started)
            gets.append(time.perf_counter() - written)
        except pt.P2PTimelineError as exc:
            errors += 1
            print(f"  trial {trial}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return Result(network=network, sets=sets, gets=gets, fresh=fresh, errors=errors)


async def bench(
    ours: bool, nodes: int, trials: int, keys: int, seed: int, rpc_timeout: float
) -> Result:
    """Start a network, measure it, stop it."""
    async with contextlib.AsyncExitStack() as stack:
        if ours:
            network = await start_ours(stack, nodes, keys, seed, rpc_timeout)
        else:
            network = await start_vanilla(stack, nodes, keys, seed)
        # A thousand nodes' objects make a full collection take ~0.2 s, a
        # pause no real node sees: move them out of the collector's sight.
        gc.collect()
        gc.freeze()
        try:
            result = await measure(network, trials, keys, seed + 1)
        finally:
            gc.unfreeze()
    # Let the last tasks of stopped nodes see their closed sockets.
    await asyncio.sleep(0.1)
    return result


def per_size(values: Sequence[int], sizes: Sequence[int], flag: str) -> list[int]:
    """`values` of a flag given once for all sizes or once per size, per size."""
    if len(values) == 1:
        return list(values) * len(sizes)
    if len(values) != len(sizes):
        raise SystemExit(f"{flag}: give one value, or one per size")
    return list(values)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--trials", type=int, nargs="+", default=[200, 100], help="one per size"
    )
    parser.add_argument("--keys", type=int, default=5, help="keys written in turn")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rpc-timeout", type=float, default=2.0, help="ours (vanilla: 5 s)"
    )
    args = parser.parse_args()
    trials = per_size(args.trials, args.sizes, "--trials")
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.ERROR)
    header("DHT benchmark: DhtRegistry vs vanilla kademlia")
    print(
        f"ksize={KSIZE}, alpha={ALPHA}; one process, one event loop; "
        f"{args.keys} keys; rpc timeout: ours {args.rpc_timeout:g} s, vanilla 5 s\n"
    )

    results: list[Result] = []
    for size, count in zip(args.sizes, trials, strict=True):
        for ours in (True, False):
            started = time.perf_counter()
            result = await bench(
                ours, size, count, args.keys, args.seed, args.rpc_timeout
            )
            network = result.network
            results.append(result)
            print(
                f"{network.label}: {network.nodes:,} nodes built in "
                f"{network.build_s:.1f} s (mean routing table "
                f"{network.contacts:.0f} contacts); {count} trials, "
                f"{result.errors} errors; {time.perf_counter() - started:.1f} s in all"
            )

    print("\n| network | nodes | set p50 | set p99 | get p50 | get p99 | fresh reads |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        print(result.row())

    print()
    within_2x = True
    for mine, vanilla in zip(results[::2], results[1::2], strict=True):
        get_ratio = statistics.median(mine.gets) / statistics.median(vanilla.gets)
        set_ratio = statistics.median(mine.sets) / statistics.median(vanilla.sets)
        within_2x = within_2x and get_ratio <= 2
        print(
            f"{mine.network.nodes:,} nodes, ours/vanilla: get p50 {get_ratio:.2f}x, "
            f"set p50 {set_ratio:.2f}x"
        )
    largest = max(results[::2], key=lambda r: r.network.nodes)
    all_fresh = largest.fresh == len(largest.gets) and not largest.errors
    print(
        f"targets: 100% fresh reads at {largest.network.nodes:,} nodes: "
        f"{'met' if all_fresh else 'NOT met'}; our get p50 within 2x of "
        f"vanilla's: {'met' if within_2x else 'NOT met'}"
    )


if __name__ == "__main__":
    asyncio.run(main())
