"""Dissemination benchmark: the k-ary push tree against direct sends, churn, catch-up.

All peers run in this process on 127.0.0.1 (ports chosen by the OS), joined
through one bootstrap `DhtRegistry`, with in-memory stores and no NTP (a
`p2ptimeline.testing.local_network`). In one run:

* tree: one author and N online followers (each subscribed with
  `Peer.incoming()`); the author posts P times with `Peer.post`, one post at a
  time, and each post is timed from just before `post()` until the last
  follower has it (and until 50% and 90% of them have it). A post goes down
  one of 2k trees; the first 2k posts, reported apart, open the connections
  along their edges, which later posts reuse;
* naive baseline, on the same network, interleaved with the tree posts: the
  author sends each post itself to every follower, one `PostPush` each
  carrying only that follower (all at once, or `--naive-concurrency` at a
  time), through its own transport;
* churn: 20% of the followers, chosen at random, crash (no logout: their
  presence leases stay valid, so the author still plans them into trees);
  then P more posts of each kind. Delivery counts the live followers only;
* catch-up: another network of 100 followees and one reader following all of
  them. The reader logs out, each followee posts 100 times, and the reader's
  `login()` (which pulls what was missed) is timed; repeated `--rounds` times.

Setup, 32 operations at a time, failed ones tried again: start the peers;
optionally warm the DHT up (each node joins again through 3 random peers and
looks up `--warm-up-lookups` random ids; -1 skips it: each join already
looks up an id in every bucket); register every user; every follower
follows the author; the author re-reads its followers from the registry
once (what it does every `pull_interval`), for the follow notices it missed
under the load. `Peer.follow` also starts a
background pull of the followee's posts; it is skipped in setup unless
`--pull-on-follow`, since there is nothing to pull yet and it reads the
author's whole follower set from the DHT: O(N^2) DHT reads for N followers.
Presence leases last an hour: with 1,000 peers in one process the setup takes
many minutes, during which lease renewals (one DHT write per peer every
third of the lease; the default 30 s lease would mean 100 writes/s) often
fail under the load; an expired lease makes the author re-read that
follower's presence before each post, and leave it out if it reads offline.
Crashed followers thus also still read as online during churn.

A post's receivers are the live followers that the author knows of; the
table's last column counts the followers it does not know (left out of its
trees and of the baseline's sends).

Frames are the `PostPush` requests each peer makes (every try counts, those
to crashed peers included), counted by wrapping each peer's transport.
A new post starts only when every peer has finished forwarding the previous
one. Everything runs on one event loop, so a latency here is the CPU time of
every peer a post passes through, on a machine shared by all of them.

Run: python benchmarks/dissemination.py [--followers 1000] [--posts 10]
    [--churn 0.2] [--ksize 8] [--fanout 2] [--lease 3600] [--naive-concurrency 0]
    [--followees 100] [--catch-up-posts 100] [--rounds 3]
    [--warm-up-lookups 4] [--pull-on-follow] [--deadline 30] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import logging
import math
import random
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).parent))

from _common import bounded, header, percentile, with_retries

import p2ptimeline as pt
from p2ptimeline._p2p.context import Session
from p2ptimeline._p2p.pull import Puller
from p2ptimeline._p2p.transport import Address, Transport, TransportWrapper
from p2ptimeline._p2p.wire import Message, PostPush, TreeMember
from p2ptimeline.testing import LocalNetwork, crash, local_network

HOST = "127.0.0.1"
SETUP_CONCURRENCY = 32


async def wait_until(condition: Callable[[], bool], within: float) -> bool:
    """Poll `condition` every 10 ms for up to `within` seconds; its last value."""
    deadline = time.perf_counter() + within
    while not condition():
        if time.perf_counter() > deadline:
            return False
        # Nothing announces that background forwarding is over: poll.
        await asyncio.sleep(0.01)
    return True


class Observer:
    """Arrival times of posts at followers, and the pushes every peer sends."""

    def __init__(self) -> None:
        # post id -> follower name -> perf_counter() when it arrived
        self.arrivals: dict[bytes, dict[str, float]] = collections.defaultdict(dict)
        # post id -> sender name -> PostPush requests made
        self.frames: dict[bytes, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self._waiting: dict[bytes, tuple[frozenset[str], asyncio.Event]] = {}
        self._consumers: list[asyncio.Task[None]] = []

    def counting(self, name: str) -> TransportWrapper:
        """A `Peer(transport=...)` counting every `PostPush` that the peer of
        user `name` sends, per post (as tests do)."""
        frames = self.frames

        class Counting(Transport):
            async def request(self, address: Address, message: Message) -> Message:
                if isinstance(message, PostPush):
                    frames[message.post.id][name] += 1
                return await super().request(address, message)

        return Counting

    def subscribe(self, peers: dict[pt.Peer, str]) -> None:
        """One consumer of `incoming()` per peer (its user's name given); each
        listens from now on."""

        async def consume(stream: AsyncIterator[pt.Post], name: str) -> None:
            async for post in stream:
                arrived = self.arrivals[post.id]
                arrived[name] = time.perf_counter()
                waiting = self._waiting.get(post.id)
                if waiting is not None and waiting[0] <= arrived.keys():
                    waiting[1].set()

        self._consumers += [
            asyncio.create_task(consume(p.incoming(), name))
            for p, name in peers.items()
        ]

    def expect(self, post_id: bytes, receivers: frozenset[str]) -> asyncio.Event:
        """An event set once all of `receivers` have `post_id`."""
        event = asyncio.Event()
        self._waiting[post_id] = (receivers, event)
        if receivers <= self.arrivals[post_id].keys():
            event.set()
        return event

    async def close(self) -> None:
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)


@attrs.frozen(kw_only=True)
class Delivery:
    """One post's delivery."""

    receivers: int
    """Live followers that the author knows of, so should get it."""
    times: list[float]
    """Seconds from the send to each of their arrivals, sorted."""
    unknown: int
    """Live followers that the author does not know of."""
    unknown_reached: int
    """How many of those got it all the same."""
    author_frames: int
    """PostPush requests made by the author."""
    busiest_frames: int
    """The most PostPush requests made by any one peer (the author included)."""
    send_errors: int = 0
    """Naive sends that raised (to crashed followers, under churn)."""

    def at(self, fraction: float) -> float | None:
        """Seconds until `fraction` of the receivers had the post, if they did."""
        needed = max(1, math.ceil(fraction * self.receivers))
        return self.times[needed - 1] if len(self.times) >= needed else None


@attrs.frozen(kw_only=True)
class Phase:
    """The deliveries of one kind of send, in one state of the network."""

    label: str
    """What was measured."""
    deliveries: list[Delivery]
    """One per post."""

    def complete(self) -> bool:
        return all(len(d.times) == d.receivers for d in self.deliveries)

    def percent(self) -> str:
        got = sum(len(d.times) for d in self.deliveries)
        wanted = sum(d.receivers for d in self.deliveries)
        return f"{100 * got / wanted:.2f}% ({got:,}/{wanted:,})"

    def last(self) -> list[float]:
        """Time to last delivery of each post that reached every receiver."""
        return [d.times[-1] for d in self.deliveries if len(d.times) == d.receivers]

    def row(self) -> str:
        last = self.last()
        missed = len(self.deliveries) - len(last)

        def median_at(fraction: float) -> str:
            values = [d.at(fraction) for d in self.deliveries]
            reached = [v for v in values if v is not None]
            return seconds(statistics.median(reached)) if reached else "-"

        authors = [d.author_frames for d in self.deliveries]
        busiest = [d.busiest_frames for d in self.deliveries]
        errors = sum(d.send_errors for d in self.deliveries)
        unknown = max(d.unknown for d in self.deliveries)
        reached = sum(d.unknown_reached for d in self.deliveries)
        note = f" ({missed} incomplete)" if missed else ""
        note += f" ({errors:,} send errors)" if errors else ""
        return (
            f"| {self.label} | {self.deliveries[0].receivers:,} "
            f"| {seconds(statistics.median(last)) if last else '-'}{note} "
            f"| {seconds(percentile(last, 99)) if last else '-'} "
            f"| {median_at(0.5)} | {median_at(0.9)} | {self.percent()} "
            f"| {statistics.median(authors):g} (max {max(authors)}) "
            f"| {statistics.median(busiest):g} (max {max(busiest)}) "
            f"| {unknown:,} ({reached:,} deliveries) |"
        )


def ratio(mine: Phase, baseline: Phase) -> str:
    """Median time to last delivery of `mine` over `baseline`'s."""
    if not mine.last() or not baseline.last():
        return "- (no post reached every receiver)"
    return f"{statistics.median(mine.last()) / statistics.median(baseline.last()):.2f}x"


def seconds(value: float) -> str:
    return f"{value:.3f} s" if value >= 1 else f"{value * 1000:.0f} ms"


@attrs.define
class Network:
    """An author, its followers, and everything needed to stop them."""

    local: LocalNetwork
    author: pt.Peer
    followers: list[pt.Peer]
    names: dict[pt.Peer, str]
    observer: Observer
    crashed: set[pt.Peer] = attrs.field(factory=set)

    @property
    def live(self) -> list[pt.Peer]:
        return [f for f in self.followers if f not in self.crashed]

    async def stop(self) -> float:
        """Stop every peer (with a logout), then the bootstrap node; seconds taken."""
        started = time.perf_counter()
        await self.observer.close()
        await bounded(
            lambda p: p.stop(), [self.author, *self.followers], SETUP_CONCURRENCY * 2
        )
        await self.local.aclose()  # the bootstrap node, and the peers left out
        return time.perf_counter() - started


@contextlib.contextmanager
def no_pull_on_follow(skip: bool) -> Iterator[None]:
    """If `skip`, the pulls that `Peer.follow` starts in the background do
    nothing meanwhile (no other pull runs during the follows of the setup).

    Such a pull fetches the followee's posts (there are none yet here), but
    it first reads the followee's whole follower set from the DHT and each
    follower's presence: for N followers joining, O(N^2) DHT reads.
    """
    if not skip:
        yield
        return
    pull = Puller.pull

    async def no_pull(self: Puller, author: str) -> int:
        return 0

    Puller.pull = no_pull  # type: ignore[method-assign]
    try:
        yield
    finally:
        Puller.pull = pull  # type: ignore[method-assign]


def session(peer: pt.Peer) -> Session:
    """The session of the user logged in on `peer`."""
    session = peer._context.session
    assert session is not None
    return session


def busy_session(peer: pt.Peer) -> bool:
    """Whether `peer` runs session tasks other than its periodic ones."""
    current = peer._context.session
    return current is not None and any(
        not isinstance(task, asyncio.Task) or task.get_name() != "every"
        for task in current.tasks._tasks
    )


def forwarding(peer: pt.Peer) -> bool:
    """Whether `peer` is still pushing its own post or forwarding others'."""
    return bool(len(peer._context.tasks) or len(peer._disseminator._relays))


def progress(message: str) -> None:
    """A progress note on stderr (stdout is the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def warm_up(peers: Sequence[pt.Peer], lookups: int, seed: int) -> None:
    """Let the DHT nodes meet before any record is stored.

    Each node joins again through 3 random peers (the first ones joined an
    empty network) and looks up `lookups` random ids, as Kademlia's bucket
    refresh does. A node that meets a new contact offers it every stored
    record it should hold, sorting its routing table once per record: meeting
    contacts while storage is still empty costs next to nothing.
    """
    rng = random.Random(seed)
    joins = {p: [q.address for q in rng.sample(peers, 3)] for p in peers}
    targets = {p: [rng.randbytes(20) for _ in range(lookups)] for p in peers}

    async def settle(peer: pt.Peer) -> None:
        node = peer.registry._started()
        await node.bootstrap(joins[peer])
        for target in targets[peer]:
            await node.look_up([target])

    await bounded(settle, peers, SETUP_CONCURRENCY)


async def start_network(
    local: LocalNetwork,
    followers: int,
    errors: collections.Counter[str],
    *,
    lookups: int,
    pull_on_follow: bool,
    seed: int,
) -> tuple[Network, dict[str, float]]:
    """Start, register and subscribe an author and its followers on `local`;
    timings.

    `lookups` < 0 skips the warm-up. Registrations and follows that fail are
    tried again (their errors are counted in `errors`); followers that still
    could not follow are stopped and left out.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    observer = Observer()
    # The author first, so that the followers' DHT lookups can find it; then
    # the followers, `SETUP_CONCURRENCY` at a time (the network's concurrency).
    peers = [await local.add_peer(transport=observer.counting("author"))]
    peers += await asyncio.gather(
        *(
            local.add_peer(transport=observer.counting(f"fan{i}"))
            for i in range(1, followers + 1)
        )
    )
    timings["start peers"] = time.perf_counter() - started
    progress(f"start peers: {timings['start peers']:.1f} s")
    if lookups >= 0:
        mark = time.perf_counter()
        await warm_up(peers, lookups, seed)
        timings["DHT warm-up"] = time.perf_counter() - mark
        progress(f"DHT warm-up: {timings['DHT warm-up']:.1f} s")

    mark = time.perf_counter()
    names = {p: f"fan{i}" for i, p in enumerate(peers)}
    names[peers[0]] = "author"
    await peers[0].register("author", "correct horse")

    async def register(peer: pt.Peer) -> None:
        try:
            await peer.register(names[peer], "correct horse")
        except pt.UsernameTaken:  # a try that failed after claiming the name
            await peer.login(names[peer], "correct horse")

    lost = await with_retries(register, peers[1:], SETUP_CONCURRENCY, errors)
    timings["register"] = time.perf_counter() - mark
    progress(f"register: {timings['register']:.1f} s")

    mark = time.perf_counter()
    with no_pull_on_follow(not pull_on_follow):
        lost += await with_retries(
            lambda p: p.follow("author"),
            [p for p in peers[1:] if p not in lost],
            SETUP_CONCURRENCY,
            errors,
        )
    timings["follow"] = time.perf_counter() - mark
    progress(f"follow: {timings['follow']:.1f} s")

    # Each follow starts a pull of the followee's posts in the background,
    # and each login an announcement to followees: wait for them to end.
    mark = time.perf_counter()
    await wait_until(lambda: not any(map(busy_session, peers)), 3600.0)
    timings["background tasks"] = time.perf_counter() - mark
    progress(f"background tasks: {timings['background tasks']:.1f} s")

    for peer in lost:
        await peer.stop()
    peers = [p for p in peers if p not in lost]
    observer.subscribe({p: names[p] for p in peers[1:]})
    net = Network(
        local=local,
        author=peers[0],
        followers=peers[1:],
        names=names,
        observer=observer,
    )
    return net, timings


async def tree_send(net: Network, text: str) -> tuple[pt.Post, Awaitable[int]]:
    """`Peer.post`: the author stores the post and pushes it down a tree."""
    post = await net.author.post(text)
    return post, no_errors()


async def no_errors() -> int:
    return 0


async def naive_send(
    net: Network, text: str, concurrency: int
) -> tuple[pt.Post, Awaitable[int]]:
    """The author sends the post to each online follower itself."""
    author = net.author
    context, mine = author._context, session(author)
    post = pt.Post.create(mine.identity, "author", text, context.hlc.now())
    await context.store.add([post])
    members = await author._disseminator._online_followers(mine)
    slots = asyncio.Semaphore(concurrency or len(members) or 1)

    async def send(member: TreeMember) -> None:
        push = PostPush(post=post, fanout=author.config.fanout, tree=(member,))
        async with slots:
            await context.request((member.host, member.port), push)

    async def send_all() -> int:
        results = await asyncio.gather(
            *(send(m) for m in members), return_exceptions=True
        )
        return sum(isinstance(r, Exception) for r in results)

    return post, asyncio.ensure_future(send_all())


Send = Callable[[Network, str], Awaitable[tuple[pt.Post, Awaitable[int]]]]


async def deliver(net: Network, send: Send, text: str, deadline: float) -> Delivery:
    """Send one post, wait for it to reach every live follower that the author
    knows of; its figures."""
    live = net.live
    names = {net.names[p] for p in live}
    expected = frozenset(names & session(net.author).directory.names())
    observer = net.observer
    started = time.perf_counter()
    post, sending = await send(net, text)
    arrived = observer.expect(post.id, expected)
    sent = asyncio.ensure_future(sending)
    busy = [net.author, *live]

    def idle() -> bool:
        return sent.done() and not any(map(forwarding, busy))

    # Until every expected follower has it, or no peer is forwarding it any more
    # (a lost subtree: nothing else would come, pulls being hourly). Then let
    # every forwarder finish (retries to crashed peers included), so that the
    # frame counts are complete and posts do not overlap.
    await wait_until(lambda: arrived.is_set() or idle(), deadline)
    await wait_until(idle, deadline)
    errors = await sent
    frames = observer.frames.get(post.id, collections.Counter())
    got = observer.arrivals[post.id]
    return Delivery(
        receivers=len(expected),
        times=sorted(t - started for name, t in got.items() if name in expected),
        unknown=len(names - expected),
        unknown_reached=len((names - expected) & got.keys()),
        author_frames=frames["author"],
        busiest_frames=max(frames.values(), default=0),
        send_errors=errors,
    )


async def measure(
    net: Network, label: str, posts: int, naive_concurrency: int, deadline: float
) -> tuple[Phase, Phase]:
    """`posts` tree posts and as many naive ones, interleaved."""
    tree: list[Delivery] = []
    naive: list[Delivery] = []

    async def naively(net: Network, text: str) -> tuple[pt.Post, Awaitable[int]]:
        return await naive_send(net, text, naive_concurrency)

    for i in range(posts):
        tree.append(await deliver(net, tree_send, f"{label}: tree post {i}", deadline))
        naive.append(await deliver(net, naively, f"{label}: naive post {i}", deadline))
        progress(
            f"{label}, post {i + 1}/{posts}: last delivery tree "
            f"{tree[-1].times[-1] if tree[-1].times else math.nan:.3f} s, "
            f"baseline {naive[-1].times[-1] if naive[-1].times else math.nan:.3f} s"
        )
    return (
        Phase(label=f"{label}: tree (Peer.post)", deliveries=tree),
        Phase(label=f"{label}: baseline, direct sends", deliveries=naive),
    )


async def presence_refresh(net: Network, within: float) -> tuple[float, int, int]:
    """The author re-reads every live follower's presence from the DHT, as
    `Peer._online_followers` does (16 at a time) once its copies expired.

    Returns the seconds it took (at most `within`), the reads done, and the
    reads there were to do."""
    author = net.author
    directory = session(author).directory
    known = (directory.get(net.names[f]) for f in net.live)
    keys = [f.public_key for f in known if f is not None]
    started = time.perf_counter()
    slots = asyncio.Semaphore(16)

    async def read(key: bytes) -> None:
        async with slots:
            await author.registry.get_presence(key)

    reads = [asyncio.ensure_future(read(k)) for k in keys]
    await asyncio.wait(reads, timeout=within)
    for task in reads:
        task.cancel()
    await asyncio.gather(*reads, return_exceptions=True)
    done = sum(t.done() and not t.cancelled() for t in reads)
    return time.perf_counter() - started, done, len(keys)


@attrs.frozen(kw_only=True)
class CatchUp:
    """One login of the reader after it missed posts."""

    login_s: float
    """Seconds `login()` took, pulling included."""
    pulled: int
    """Posts the reader gained."""
    expected: int
    """Posts it should have gained."""


async def catch_up(
    followees: int,
    per_followee: int,
    rounds: int,
    config: pt.PeerConfig,
    *,
    lookups: int,
    seed: int,
) -> tuple[list[CatchUp], float, float]:
    """The reader misses `per_followee` posts of each followee, `rounds` times.

    Returns each round, the setup time and the posting time of the last round.
    """
    started = time.perf_counter()
    results: list[CatchUp] = []
    posting_s = 0.0
    async with local_network(
        followees + 1, config=config, concurrency=SETUP_CONCURRENCY
    ) as local:
        peers = local.peers
        reader, authors = peers[0], peers[1:]
        if lookups >= 0:
            await warm_up(peers, lookups, seed)
        await bounded(
            lambda i: authors[i].register(f"author{i}", "correct horse"),
            range(followees),
            SETUP_CONCURRENCY,
        )
        await reader.register("reader", "correct horse")
        await bounded(
            lambda i: reader.follow(f"author{i}"), range(followees), SETUP_CONCURRENCY
        )
        setup_s = time.perf_counter() - started
        have = 0
        for round_ in range(rounds):
            await reader.logout()
            mark = time.perf_counter()

            async def write(author: pt.Peer, round_: int = round_) -> None:
                for i in range(per_followee):
                    await author.post(f"round {round_} post {i} by {author.username}")

            await asyncio.gather(*(write(a) for a in authors))
            await wait_until(lambda: not any(map(forwarding, authors)), 60.0)
            posting_s = time.perf_counter() - mark
            mark = time.perf_counter()
            await reader.login("reader", "correct horse")
            login_s = time.perf_counter() - mark
            total = len(await reader.timeline(limit=(rounds + 1) * followees * 1000))
            results.append(
                CatchUp(
                    login_s=login_s,
                    pulled=total - have,
                    expected=followees * per_followee,
                )
            )
            have = total
            progress(f"catch-up round {round_ + 1}: login {login_s:.2f} s")
    return results, setup_s, posting_s


def raise_open_files(wanted: int) -> int:
    """Raise the soft limit of open files towards `wanted`; the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--posts", type=int, default=10, help="posts of each kind")
    parser.add_argument("--churn", type=float, default=0.2, help="share that crash")
    parser.add_argument("--ksize", type=int, default=8, help="Kademlia k")
    parser.add_argument("--fanout", type=int, default=2, help="tree arity k")
    parser.add_argument(
        "--lease", type=float, default=3600.0, help="presence lease, seconds"
    )
    parser.add_argument(
        "--naive-concurrency",
        type=int,
        default=0,
        help="baseline sends in flight at once (0: all at once)",
    )
    parser.add_argument("--deadline", type=float, default=30.0, help="per post, s")
    parser.add_argument("--followees", type=int, default=100, help="catch-up")
    parser.add_argument(
        "--catch-up-posts", type=int, default=100, help="per followee per round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="catch-up rounds")
    parser.add_argument(
        "--warm-up-lookups",
        type=int,
        default=4,
        help="random-id lookups per DHT node before registering (-1: no warm-up)",
    )
    parser.add_argument(
        "--pull-on-follow",
        action="store_true",
        help="keep the pull that follow() starts (O(N^2) DHT reads in setup)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("p2ptimeline").setLevel(logging.WARNING)
    # Per peer: a UDP and a listening TCP socket, and both ends of each
    # connection (tree edges, follow notices, the baseline's star).
    files = raise_open_files(12 * (args.followers + 1) + 1000)

    config = pt.PeerConfig(
        fanout=args.fanout,
        seal_cost=10,
        ksize=args.ksize,
        pull_interval=3600.0,
        lease=args.lease,
        # Every peer here is on 127.0.0.1: the per-host cap on incoming
        # connections (32 by default) would refuse all but 32 of them.
        limits=pt.Limits(
            max_connections=2 * args.followers + 1024,
            max_connections_per_host=2 * args.followers + 1024,
        ),
    )
    header("Dissemination benchmark: push tree vs direct sends, churn, catch-up")
    concurrency = args.naive_concurrency or "all at once"
    print(
        f"{args.followers:,} followers, {args.posts} posts of each kind per phase; "
        f"fan-out k={args.fanout}; DHT ksize={args.ksize}, alpha={config.alpha}; "
        f"lease {args.lease:g} s; push tries {config.push_tries} (backoff "
        f"{config.push_backoff:g} s, doubling); baseline sends in flight: "
        f"{concurrency}; MemoryStore, no NTP; one process, one event loop; "
        f"open-files limit {files:,}; setup: {SETUP_CONCURRENCY} operations at "
        f"a time, DHT warm-up "
        + (
            f"of {args.warm_up_lookups} lookups per node"
            if args.warm_up_lookups >= 0
            else "skipped"
        )
        + ", follow()'s background pull "
        + ("kept" if args.pull_on_follow else "skipped")
        + "\n"
    )

    started = time.perf_counter()
    async with local_network(
        config=config, concurrency=SETUP_CONCURRENCY
    ) as local:  # net.stop() closes it: timed as the teardown
        errors: collections.Counter[str] = collections.Counter()
        net, timings = await start_network(
            local,
            args.followers,
            errors,
            lookups=args.warm_up_lookups,
            pull_on_follow=args.pull_on_follow,
            seed=args.seed,
        )
        notified = len(session(net.author).directory)
        # Follow notices lost under the setup's load are made up by the author's
        # periodic re-read of its followers (every pull_interval: an hour here);
        # run it once, as it would have run in an hour.
        await with_retries(
            lambda _: net.author._sessions.reread_followers(), [None], 1, errors
        )
        setup_s = time.perf_counter() - started
        known = len(session(net.author).directory)
        print(
            f"setup of {args.followers + 1:,} peers: {setup_s:.1f} s ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
            + "); errors, tried again: "
            + (", ".join(f"{n} {k}" for k, n in errors.most_common()) or "none")
            + f"; followers in the end: {len(net.followers):,}, of which the author "
            f"knows {known:,} ({notified:,} from follow notices, the others from "
            "its re-read of its followers in the registry)"
        )
        # A thousand peers' objects make a full collection take a while, a pause
        # no real peer sees: move them out of the collector's sight.
        gc.collect()
        gc.freeze()
        phases: list[Phase] = []
        try:
            # A post uses one of 2k trees; the first post down each one opens the
            # connections along its edges, which the later ones reuse.
            phases += await measure(
                net,
                "all online, first post down each tree",
                2 * args.fanout,
                args.naive_concurrency,
                args.deadline,
            )
            phases += await measure(
                net, "all online", args.posts, args.naive_concurrency, args.deadline
            )
            victims = random.Random(args.seed).sample(
                net.followers, round(args.churn * len(net.followers))
            )
            mark = time.perf_counter()
            for victim in victims:
                await crash(victim)
                net.crashed.add(victim)
            crash_s = time.perf_counter() - mark
            phases += await measure(
                net,
                f"{100 * args.churn:g}% crashed",
                args.posts,
                args.naive_concurrency,
                args.deadline,
            )
            refresh_s, reads, to_read = await presence_refresh(net, 120.0)
        finally:
            gc.unfreeze()
            teardown_s = await net.stop()
    await asyncio.sleep(0.1)  # let the stopped peers' last tasks see their sockets
    print(
        f"{len(victims)} followers crashed in {crash_s:.1f} s; "
        f"everything stopped in {teardown_s:.1f} s; then, after the posts, the "
        f"author re-read the presence of {reads:,} of its {to_read:,} live "
        f"followers from the DHT in {refresh_s:.2f} s (what it does before a post "
        "once its copies expire; given 120 s at most)\n"
    )
    print(
        "| send | receivers | last delivery p50 | last delivery p99 | 50% reached "
        "(median) | 90% reached (median) | delivery | author frames/post "
        "| busiest peer frames/post | live followers the author does not know "
        "(deliveries to them) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for phase in phases:
        print(phase.row())

    mark = time.perf_counter()
    rounds, catch_setup_s, posting_s = await catch_up(
        args.followees,
        args.catch_up_posts,
        args.rounds,
        config,
        lookups=args.warm_up_lookups,
        seed=args.seed,
    )
    total = args.followees * args.catch_up_posts
    print(
        f"\ncatch-up: {args.followees} followees and 1 reader (setup "
        f"{catch_setup_s:.1f} s); per round the reader logs out, each followee "
        f"posts {args.catch_up_posts} ({total:,} in all; the last round's posting "
        f"took {posting_s:.1f} s), then the reader logs in; "
        f"{time.perf_counter() - mark:.1f} s in all\n"
    )
    print("| round | login + catch-up | posts pulled | posts/s |")
    print("|---|---|---|---|")
    for i, r in enumerate(rounds):
        print(
            f"| {i + 1} | {r.login_s:.2f} s | {r.pulled:,}/{r.expected:,} "
            f"| {r.pulled / r.login_s:,.0f} |"
        )
    login_p50 = statistics.median(r.login_s for r in rounds)
    print(
        f"| median | {login_p50:.2f} s | | "
        f"{statistics.median(r.pulled / r.login_s for r in rounds):,.0f} |"
    )

    _, _, tree, naive, churn_tree, churn_naive = phases
    author_max = max(d.author_frames for d in tree.deliveries)
    last_p99 = percentile(tree.last(), 99) if tree.complete() else math.inf
    caught_up = all(r.pulled == r.expected for r in rounds)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(
        f"\ntree/baseline, last delivery p50: {ratio(tree, naive)} all online, "
        f"{ratio(churn_tree, churn_naive)} with {100 * args.churn:g}% crashed; "
        "author frames per "
        f"post: {author_max} (tree, max) vs {len(net.followers):,} (baseline)"
    )
    print(
        "targets: 100% delivery to the followers the author knows: "
        f"{verdict(tree.complete())} (all online), "
        f"{verdict(churn_tree.complete())} (live followers after the crash); "
        f"the author knows every follower: {verdict(known == len(net.followers))}; "
        f"author frames <= k={args.fanout} (all online): "
        f"{verdict(author_max <= args.fanout)}; last delivery p99 < 2 s at "
        f"{args.followers:,} followers: {verdict(last_p99 < 2)}; catch-up "
        f"complete: {verdict(caught_up)}"
    )
    print(
        f"setup {setup_s:.1f} s; peak RSS {rss_mb:,.0f} MB; "
        f"{time.perf_counter() - started:.1f} s in all"
    )


if __name__ == "__main__":
    asyncio.run(main())
