"""Crash safety: a peer killed with SIGKILL right after post() loses nothing.

A peer in its own process (tests/crash_probe.py), always on the same data
directory, is started, posts 1 to 3 posts and is killed with SIGKILL as
soon as it reports that `post()` returned, round after round (default 50).
The kill comes in three ways, in turn: at once; 1 to 20 ms later (while
the post is being pushed to followers); or at once with one more `post()`
in flight (that post is not counted as confirmed, and may or may not
survive). A bootstrap DHT node and a long-lived reader peer, which follows
the probe's user and posts once while the probe is down, run in this
process.

After every kill, SQLite's `integrity_check` runs on a copy of the store
(the live files are left for the peer itself to recover). At every restart
the benchmark checks that the probe holds every post it ever confirmed
(`posted <id>`), that it caught up on the reader's posts made while it was
down, and that the reader, polling `sync()`, gets every confirmed post from
it (the probe serves again: the reader is the only other peer). A last
restart repeats the checks; then, the reader stopped, a new follower with
an empty store pulls every confirmed post from the probe, its only source;
and the store itself is checked once the last probe is killed.

Reported: rounds, posts confirmed, lost posts (target 0), integrity check
results, restart-to-ready time (process spawn to the probe's `held` line:
interpreter start, store recovery, login with its catch-up sync) p50/p99,
the probe's, the reader's and the new follower's catch-up, total time.

Run: python benchmarks/crash.py [--rounds 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import header, percentile
from crash_probe import Probe

import p2ptimeline as pt
from p2ptimeline.testing import local_network

CONFIG = pt.PeerConfig(seal_cost=10, ksize=8, pull_interval=3600.0)
AUTHOR, READER, PASSWORD = "author", "reader", "correct horse"
KILLS = ("at once", "1-20 ms later", "with a post in flight")
CATCH_UP_DEADLINE = 30.0


def integrity_check(path: Path) -> str:
    """The answer of `PRAGMA integrity_check` on the database at `path`."""
    db = sqlite3.connect(path)
    try:
        return "; ".join(str(r[0]) for r in db.execute("PRAGMA integrity_check"))
    finally:
        db.close()


def check_copy(data_dir: Path, scratch: Path) -> str:
    """`integrity_check` on a copy of the store (database and WAL), so that
    the peer itself still has to recover the live files at its restart."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for name in ("peer.db", "peer.db-wal"):
        if (data_dir / name).exists():
            shutil.copy2(data_dir / name, scratch / name)
    return integrity_check(scratch / "peer.db")


async def reader_catch_up(
    reader: pt.Peer, wanted: set[str]
) -> tuple[int, float | None]:
    """Poll the reader's `sync()` until it holds `wanted`.

    Returns how many of `wanted` it lacked at first, and the seconds it
    took to hold them all (None past the deadline).
    """
    started = time.monotonic()
    deadline = started + CATCH_UP_DEADLINE
    held = {p.id.hex() for p in await reader.timeline(limit=100_000)}
    lacking = len(wanted - held)
    while not wanted <= held:
        if time.monotonic() > deadline:
            return lacking, None
        await reader.sync()
        held = {p.id.hex() for p in await reader.timeline(limit=100_000)}
        if not wanted <= held:
            await asyncio.sleep(0.05)
    return lacking, time.monotonic() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    header("Crash safety")
    rng = random.Random(args.seed)
    started = time.monotonic()

    confirmed: list[str] = []  # every id the probe reported as posted
    missed: list[str] = []  # the reader's posts made while the probe was down
    lost_by_round: dict[int, int] = {}
    not_caught_up: dict[int, int] = {}
    reader_failures: list[int] = []
    reader_times: list[float] = []  # catch-up times when it lacked some
    ready_times: list[float] = []
    last_held: set[str] = set()  # the probe's own posts at the last restart
    integrity_results: collections.Counter[str] = collections.Counter()
    kills: collections.Counter[str] = collections.Counter()
    reader_lacked: list[int] = []  # confirmed posts missing at each restart
    bad_exits = in_flight_kept = 0

    async with contextlib.AsyncExitStack() as stack:  # the network stops first
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        net = await stack.enter_async_context(local_network(config=CONFIG))
        (boot,) = net.bootstrap
        data_dir, scratch = Path(tmp) / "author", Path(tmp) / "copy"
        reader = await net.add_peer(data_dir=Path(tmp) / "reader")
        await reader.register(READER, PASSWORD)

        async def restart(round_: int) -> Probe:
            """Start the probe; check what it holds and that it serves."""
            t0 = time.monotonic()
            probe = await Probe.start(data_dir, boot, AUTHOR, PASSWORD, READER)
            held = set(await probe.line("held"))
            ready_times.append(time.monotonic() - t0)
            last_held.clear()
            last_held.update(held)
            timeline = set(await probe.line("timeline"))
            if lost := len(set(confirmed) - held):
                lost_by_round[round_] = lost
            if behind := len(set(missed) - timeline):
                not_caught_up[round_] = behind
            if round_ == 0:
                await reader.follow(AUTHOR)
            lacking, took = await reader_catch_up(reader, set(confirmed))
            reader_lacked.append(lacking)
            if took is None:
                reader_failures.append(round_)
            elif lacking:
                reader_times.append(took)
            return probe

        for round_ in range(args.rounds):
            probe = await restart(round_)
            count, kill = rng.randint(1, 3), KILLS[round_ % len(KILLS)]
            for i in range(count):
                await probe.send_post(f"round {round_} post {i}")
                if i == count - 1 and kill == KILLS[2]:
                    await probe.send_post(f"round {round_} in flight")
                (post_id,) = await probe.line("posted")
                confirmed.append(post_id)
            if kill == KILLS[1]:
                await asyncio.sleep(rng.uniform(0.001, 0.020))
            late = await probe.kill()
            confirmed.extend(late)  # confirmed between the last read and the kill
            in_flight_kept += len(late)
            kills[kill] += 1
            if probe.process.returncode != -signal.SIGKILL:
                bad_exits += 1
            integrity_results[check_copy(data_dir, scratch)] += 1
            post = await reader.post(f"while {AUTHOR} is down, round {round_}")
            missed.append(post.id.hex())

        # One more restart and its checks. Then, the reader gone, a newcomer
        # with an empty store follows the probe's user: its only source is
        # the probe. Then the store itself, once the probe is killed.
        probe = await restart(args.rounds)
        reader_held = {p.id.hex() for p in await reader.timeline(limit=100_000)}
        await reader.stop()
        (newcomer,) = await net.add_users("newcomer", password=PASSWORD)
        await newcomer.follow(AUTHOR)
        _, newcomer_took = await reader_catch_up(newcomer, set(confirmed))
        await newcomer.stop()
        await probe.kill()
        final = integrity_check(data_dir / "peer.db")
    wall = time.monotonic() - started

    lost = sum(lost_by_round.values())
    checks = sum(integrity_results.values())
    ok = integrity_results["ok"]
    unconfirmed_in_flight = kills[KILLS[2]] - in_flight_kept
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| rounds (SIGKILLs right after `post()` returned) | {args.rounds} |")
    kill_mix = ", ".join(f"{kills[k]} {k}" for k in KILLS)
    print(f"| kills | {kill_mix} |")
    print(f"| posts confirmed (`posted <id>` read) | {len(confirmed)} |")
    print(
        f"| in-flight posts confirmed before the kill landed | {in_flight_kept} "
        f"(the other {unconfirmed_in_flight} were not counted) |"
    )
    print(
        f"| unconfirmed in-flight posts found in the store afterwards | "
        f"{len(last_held - set(confirmed))} of {unconfirmed_in_flight} |"
    )
    print(
        f"| lost posts (confirmed, not held at a later restart) | {lost} "
        f"over {args.rounds + 1} restarts |"
    )
    print(f"| probe exits other than SIGKILL | {bad_exits} |")
    print(f"| integrity_check after each kill (on a copy) | {ok}/{checks} ok |")
    print(f"| integrity_check of the store at the end | {final} |")
    print(
        f"| restart to ready (spawn to `held`), {len(ready_times)} restarts | "
        f"p50 {statistics.median(ready_times):.2f} s, "
        f"p99 {percentile(ready_times, 99):.2f} s |"
    )
    if len(ready_times) >= 20:
        first, last = ready_times[:10], ready_times[-10:]
        print(
            f"| restart to ready, first 10 / last 10 restarts | "
            f"p50 {statistics.median(first):.2f} s / "
            f"{statistics.median(last):.2f} s |"
        )
    print(
        f"| probe caught up on the reader's posts made while it was down | "
        f"{args.rounds - len(not_caught_up)}/{args.rounds} restarts |"
    )
    served = args.rounds + 1 - len(reader_failures)
    times = (
        f"; p50 {statistics.median(reader_times):.2f} s, "
        f"p99 {percentile(reader_times, 99):.2f} s"
        if reader_times
        else ""
    )
    print(
        f"| reader got every confirmed post from the restarted probe | "
        f"{served}/{args.rounds + 1} restarts (polling sync(), "
        f"{CATCH_UP_DEADLINE:.0f} s deadline{times}) |"
    )
    print(
        f"| confirmed posts the reader lacked at a restart (push cut by the kill) "
        f"| {sum(reader_lacked)} over {sum(1 for n in reader_lacked if n)} restarts |"
    )
    final_share = len(set(confirmed) & reader_held)
    print(f"| reader holds at the end | {final_share}/{len(set(confirmed))} posts |")
    newcomer_result = (
        f"all {len(set(confirmed))} in {newcomer_took:.2f} s"
        if newcomer_took is not None
        else f"NOT all within {CATCH_UP_DEADLINE:.0f} s"
    )
    print(
        f"| new follower, empty store, the probe its only source | {newcomer_result} |"
    )
    print(f"| total time | {wall:.0f} s |")
    print()
    met = (
        lost == 0
        and ok == checks
        and final == "ok"
        and bad_exits == 0
        and not not_caught_up
        and not reader_failures
        and newcomer_took is not None
    )
    verdict = "met" if met else "NOT met"
    print(f"targets (0 lost, sound store, catches up and serves): {verdict}")
    if lost_by_round:
        print("lost by restart:", lost_by_round)
    if not_caught_up:
        print("reader posts not caught up, by restart:", not_caught_up)
    if reader_failures:
        print("restarts where the reader did not catch up:", reader_failures)
    bad = {r: n for r, n in integrity_results.items() if r != "ok"}
    if bad:
        print("integrity_check failures:", bad)


if __name__ == "__main__":
    asyncio.run(main())
