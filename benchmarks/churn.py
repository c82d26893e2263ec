"""Churn soak: peers leave, crash and come back while others post and follow.

N peers (default 200) in one process, each with its own SQLite store, run
for a while (default 180 s). Throughout, online users post at a steady
rate; now and then a peer logs out and stops, or crashes (its sockets close
with no goodbye, as when its process is killed), and comes back after a
random downtime on the same data directory; some users follow or unfollow
others. Afterwards every peer comes back and syncs once, and the benchmark
checks, for every user, that it holds every post of every user it follows,
and that no author lost a post it made.

Reported: delivery % (target 100%), lost posts (target 0), posts and
actions, memory per peer, CPU use. Peers use a 30 s presence lease and pull
every 30 s (the defaults); all of them share one event loop, so the
background work of 200 peers shares one core.

Run: python benchmarks/churn.py [--peers 200] [--seconds 180] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).parent))

from _common import bounded, header, with_retries

import p2ptimeline as pt
from p2ptimeline.testing import LocalNetwork, crash, local_network

CONFIG = pt.PeerConfig(seal_cost=10, ksize=8, lease=30.0, pull_interval=30.0)


class World:
    """The peers, who is online, and every post ever made (the truth)."""

    def __init__(self, net: LocalNetwork, root: Path, rng: random.Random) -> None:
        self.net = net
        self.root = root
        self.rng = rng
        self.peers: dict[str, pt.Peer] = {}
        self.offline: set[str] = set()
        self.following: dict[str, set[str]] = collections.defaultdict(set)
        self.posts: dict[str, list[bytes]] = collections.defaultdict(list)
        self.actions: collections.Counter[str] = collections.Counter()

    async def join(self, name: str, *, new: bool = False) -> None:
        """Start a peer on the user's data directory: register the user if
        `new`, else log in."""
        peer = await self.net.add_peer(data_dir=self.root / name)
        try:
            if new:
                try:
                    await peer.register(name, "correct horse")
                except pt.UsernameTaken:  # an earlier try claimed it, then failed
                    await peer.login(name, "correct horse")
            else:
                await peer.login(name, "correct horse")
        except BaseException:
            await peer.stop()
            raise
        self.peers[name] = peer
        self.offline.discard(name)

    def online(self) -> list[str]:
        return [n for n in self.peers if n not in self.offline]


async def churn(world: World, seconds: float, post_rate: float) -> None:
    """Post, leave, crash, return, follow and unfollow until time is up."""
    rng = world.rng
    returning: set[asyncio.Task[None]] = set()
    deadline = time.monotonic() + seconds
    tick = 0.25

    async def come_back(name: str, after: float) -> None:
        await asyncio.sleep(after)
        try:
            await world.join(name)
            world.actions["returned"] += 1
        except pt.P2PTimelineError as exc:
            world.actions["failed return"] += 1
            logging.warning("%s could not come back: %s", name, exc)
            returning.add(asyncio.create_task(come_back(name, 5.0)))

    while time.monotonic() < deadline:
        await asyncio.sleep(tick)
        online = world.online()
        if not online:
            continue
        if rng.random() < post_rate * tick:
            author = rng.choice(online)
            try:
                post = await world.peers[author].post(
                    f"post by {author} at {time.time():.1f}"
                )
                world.posts[author].append(post.id)
                world.actions["post"] += 1
            except pt.P2PTimelineError as exc:
                world.actions["failed post"] += 1
                logging.warning("post failed: %s", exc)
        roll = rng.random()
        if roll < 0.02 and len(online) > len(world.peers) // 2:
            name = rng.choice(online)
            world.offline.add(name)
            peer = world.peers[name]
            if rng.random() < 0.5:
                await peer.stop()
                world.actions["left"] += 1
            else:
                await crash(peer)
                world.actions["crashed"] += 1
            task = asyncio.create_task(come_back(name, rng.uniform(3.0, 20.0)))
            returning.add(task)
            task.add_done_callback(returning.discard)
        elif roll < 0.04:
            name, other = rng.sample(online, 2)
            peer = world.peers[name]
            try:
                if other in world.following[name]:
                    await peer.unfollow(other)
                    world.following[name].discard(other)
                    world.actions["unfollow"] += 1
                else:
                    await peer.follow(other)
                    world.following[name].add(other)
                    world.actions["follow"] += 1
            except pt.P2PTimelineError as exc:
                world.actions["failed (un)follow"] += 1
                logging.warning("(un)follow failed: %s", exc)
    if returning:
        await asyncio.gather(*returning, return_exceptions=True)


@attrs.frozen
class Holding:
    """What one user holds of the posts it should."""

    expected: int
    delivered: int
    lost: int
    """Posts the user made but no longer holds."""
    missing: collections.Counter[str]
    """Posts not held, by author."""


@attrs.frozen
class Tally:
    """What a set of users hold of the posts they should."""

    users: dict[str, Holding]

    @property
    def expected(self) -> int:
        return sum(h.expected for h in self.users.values())

    @property
    def delivered(self) -> int:
        return sum(h.delivered for h in self.users.values())

    @property
    def lost(self) -> int:
        return sum(h.lost for h in self.users.values())

    @property
    def missing(self) -> collections.Counter[str]:
        return sum((h.missing for h in self.users.values()), collections.Counter())

    def incomplete(self) -> list[str]:
        """The users that miss some post."""
        return [n for n, h in self.users.items() if h.delivered < h.expected]

    def share(self) -> str:
        expected, delivered = self.expected, self.delivered
        share = 100 * delivered / expected if expected else 100.0
        return f"{share:.2f}% ({delivered}/{expected})"


async def tally(world: World, names: list[str], since: Tally | None = None) -> Tally:
    """Count, for `names`, the posts of their followees they hold, and their
    own posts they lost; the others' counts come from `since`."""
    users = dict(since.users) if since else {}
    for name in names:
        held = {p.id for p in await world.peers[name].timeline(limit=1_000_000)}
        missing = collections.Counter(
            followee
            for followee in world.following[name]
            for post_id in world.posts[followee]
            if post_id not in held
        )
        expected = sum(len(world.posts[f]) for f in world.following[name])
        lost = len(set(world.posts[name]) - held)
        users[name] = Holding(expected, expected - missing.total(), lost, missing)
    return Tally(users)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--follows", type=int, default=8, help="follows per user")
    parser.add_argument("--post-rate", type=float, default=2.0, help="posts/s")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s"
    )
    header("Churn soak")
    rng = random.Random(args.seed)
    cpu0 = time.process_time()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        async with local_network(bootstrap_nodes=3, config=CONFIG) as net:
            await soak(World(net, Path(tmp), rng), args, started, cpu0)


async def soak(
    world: World, args: argparse.Namespace, started: float, cpu0: float
) -> None:
    """Set up the users, churn, count what every user holds; print the report."""
    rng = world.rng
    names = [f"user{i}" for i in range(args.peers)]
    # Setup on one loaded event loop: operations that fail (the DHT
    # timing out) are tried again, and counted.
    errors: collections.Counter[str] = collections.Counter()
    failed = await with_retries(lambda n: world.join(n, new=True), names, 16, errors)
    if failed:
        raise SystemExit(f"could not register {failed}: {dict(errors)}")
    pairs = [
        (name, other)
        for name in names
        for other in rng.sample([n for n in names if n != name], args.follows)
    ]

    async def follow(pair: tuple[str, str]) -> None:
        await world.peers[pair[0]].follow(pair[1])
        world.following[pair[0]].add(pair[1])

    unfollowed = await with_retries(follow, pairs, 16, errors)
    setup = time.monotonic() - started
    print(
        f"setup: {args.peers} peers, {len(pairs) - len(unfollowed)} follows "
        f"({len(unfollowed)} failed 3 times) in {setup:.0f} s; errors, tried "
        f"again: {dict(errors) or 'none'}; churn for {args.seconds:.0f} s at "
        f"{args.post_rate} posts/s"
    )

    await churn(world, args.seconds, args.post_rate)

    # Those online hold what was pushed to them or pulled at login and
    # periodically; give the last pushes and pulls one pull interval.
    mark = time.monotonic()
    online = world.online()
    live = await tally(world, online)
    while live.incomplete() and time.monotonic() - mark < 31:
        await asyncio.sleep(1.0)  # pulls run every 30 s: poll those missing
        live = await tally(world, live.incomplete(), since=live)
    settle = time.monotonic() - mark

    # Everyone comes back and syncs, until nothing is missing or a sync
    # round brings nothing new (a pull that fails under load is only
    # logged: the next round tries again).
    for name in sorted(world.offline):
        await world.join(name)
    rounds: list[str] = []
    final = await tally(world, names)
    rounds_start = final.share()
    while final.delivered < final.expected and len(rounds) < 5:
        await bounded(lambda n: world.peers[n].sync(), names, 16)
        before, final = final, await tally(world, names)
        rounds.append(final.share())
        if final.delivered == before.delivered:
            break
    expected, delivered, lost = final.expected, final.delivered, final.lost
    missing = final.missing
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - started
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| peers | {args.peers} |")
    print(f"| churn duration | {args.seconds:.0f} s |")
    for action, count in sorted(world.actions.items()):
        print(f"| {action} | {count} |")
    print(
        f"| delivery at the {len(online)} peers online when churn ended, "
        f"{settle:.0f} s later, before any sync | {live.share()} |"
    )
    print(f"| posts expected at followers | {expected} |")
    print(f"| delivery after all came back and logged in | {rounds_start} |")
    for i, round_share in enumerate(rounds, 1):
        print(f"| delivery after sync round {i} | {round_share} |")
    print(f"| lost posts (not held by their author) | {lost} |")
    print(f"| peak RSS | {rss_mb:.0f} MiB ({rss_mb / args.peers:.2f} MiB per peer) |")
    load = 100 * cpu / wall
    print(f"| CPU | {cpu:.0f} s over {wall:.0f} s wall ({load:.0f}% of a core) |")
    print()
    verdict = "met" if delivered == expected and lost == 0 else "NOT met"
    print(f"targets (100% delivery, 0 lost posts): {verdict}")
    if missing:
        print("missing by followee:", dict(missing.most_common(10)))


if __name__ == "__main__":
    asyncio.run(main())
