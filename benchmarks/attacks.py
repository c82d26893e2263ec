"""Attack benchmark: the harm each attack of issue 10 does, before and after.

Replays points 1-8 of issue 10 against a network of 100 DHT nodes (ksize 20;
each node joins through the first, as the test suite's networks, so routing
tables are partial as in a larger network) on 127.0.0.1, all in one
process, once with the library of a baseline commit (default d7d89c8, the
commit the issue reviewed) and once with the library of this working tree,
and prints the harm of each in numbers:

1. Forged "stale" store replies: for each of four victims, a lying node next
   to its presence key and one next to its claim key answer every store
   under that key with "stale" and a number (2**63 - 2 for two victims,
   None for two), and no record to prove it. Once the liars are gone: is the
   victim locked out (lease not renewed or its task dead, logout or a login
   elsewhere failing), and what was raised into the caller?
2. Name hijacking. (a) As the issue: an attacker whose key is smaller than
   alice's stores its claim of "alice" on every node outside the k closest
   to the name; how many of the 99 other nodes, reading once, bind the name
   to the attacker's key (at k=8 and k=20). (b) 300 nodes, 30 of them
   hostile (random ids; each answers a lookup of any key with the hostile
   nodes closest to it, and of one of five names with the attacker's claim),
   the attacker storing its claims wherever it can; every honest node reads
   each name once (target: 0 reads hijacked). The hostile nodes join by
   greeting every node, or through one node as honest ones do.
3. Unbounded reply buffering: a peer holding 3,000 posts of ~1,000
   characters; one connection that never reads pipelines 600 GetPosts (in
   waves of 100). MiB the peer buffers for it (target under 1 MiB).
4. Reflection: new node ids next to the id of a node holding 20,000 values,
   each at its own address that never proves itself, send one request each
   (ping, find_node, find_value of a held key; kademlia's shape and ours).
   Bytes sent to each address per byte received (target under 3x); CPU and
   answer delay per ping from a new id.
5. Lookup stall: one node next to alice's claim key answers every lookup
   with 64 invented closer nodes at addresses that never answer. get_user
   latency over 40 fresh readers (target p99 under 3 s), datagrams sent to
   the invented addresses.
6. Push fan-out amplification: a genuine post pushed to a peer with a tree
   of 4,000, then of ~25,000 members (all a 1 MiB frame holds) at
   unreachable addresses: connection attempts, most sockets connecting at
   once, CPU seconds.
7. Follow-set stuffing: 3,000 validly signed entries under unregistered
   names in alice's followers set (next to 5 real followers): DHT requests
   and seconds per read of that set, first and second read.
8. Storage memory: one sender stores follow-set shards of ~6.6 KB of its
   own making, under keys it ground to fall next to one node: keys taken,
   bytes that node's storage then holds (every object its table reaches),
   and the most one sender could make it hold.

How: the benchmark checks the baseline out in a temporary git worktree, and
runs each attack twice in a child process (``attacks.py --child ATTACK
--library ROOT``) whose PYTHONPATH puts ROOT (the baseline tree or this one)
first, so `import p2ptimeline` loads that library, while the attack code
and the hostile kit (tests/hostile) come from this tree. The child checks
`p2ptimeline.__file__`, and prints one JSON line of figures; its log goes to
a file, whose path is printed. The worktree is removed at the end. Attacks
use the library's public API and a few internal seams that exist in both
versions (`_started()`, `_sets`, `storage`, `_leases`, `_store`, `_tasks`).

Run: python benchmarks/attacks.py [--baseline d7d89c8] [--only 1 2a ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # the kit

from _common import header, percentile
from hostile import dht, push, tcp

import p2ptimeline as pt
from p2ptimeline._dht.records import (
    RegistryValue,
    claim_key,
    presence_key,
    shard_key,
)
from p2ptimeline._p2p.wire import GetPosts, PostBatch
from p2ptimeline.testing import make_posts

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

ATTACKS = ["1", "2a", "2b", "3", "4", "5", "6", "7", "8"]
TITLES = {
    "1": "1. forged stale store replies",
    "2a": "2a. claims stored outside the k closest",
    "2b": "2b. 300 nodes, 10% hostile",
    "3": "3. a connection that never reads",
    "4": "4. reflection from an unproven address",
    "5": "5. lookups stalled by invented nodes",
    "6": "6. push fan-out amplification",
    "7": "7. follow-set stuffing",
    "8": "8. one sender filling a node's storage",
}
CHILD_TIMEOUT = 1200.0  # seconds one attack on one library may take

Figure = dict[str, Any]


def figure(
    label: str,
    value: float | None,
    shown: str | None = None,
    *,
    target: float | None = None,
    target_text: str = "",
) -> Figure:
    """One measured figure: `value` for ratios and targets (lower is better),
    `shown` as printed; a target is met when the value is at most `target`."""
    if shown is None:
        shown = "-" if value is None else f"{value:,}"
    return {
        "label": label,
        "value": value,
        "shown": shown,
        "target": target,
        "target_text": target_text,
    }


# The parent: worktree, children, table


def git(*args: str) -> str:
    """Run git in this repository; its output, stripped."""
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@contextlib.contextmanager
def baseline_tree(commit: str) -> Iterator[Path]:
    """A temporary git worktree of `commit`, removed at the end."""
    parent = Path(tempfile.mkdtemp(prefix="p2p-attacks-"))
    tree = parent / "baseline"
    git("worktree", "add", "--detach", str(tree), commit)
    try:
        yield tree
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(parent, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "prune")


def run_child(attack: str, library: Path, log: Path) -> dict[str, Any]:
    """Run `attack` in a child process on the library at `library`; its
    figures (or an error)."""
    env = dict(os.environ, PYTHONPATH=str(library))
    command = [sys.executable, str(Path(__file__).resolve())]
    command += ["--child", attack, "--library", str(library)]
    started = time.perf_counter()
    with log.open("w") as errors:
        try:
            done = subprocess.run(
                command,
                cwd=library,
                env=env,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                timeout=CHILD_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            text = out.decode() if isinstance(out, bytes) else out
            return _parsed(text) or {"error": f"timed out after {CHILD_TIMEOUT:.0f} s"}
    result = _parsed(done.stdout)
    if result is None:
        return {"error": f"exit {done.returncode}, no figures (see {log})"}
    result["wall_s"] = time.perf_counter() - started
    return result


def _parsed(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return None


def ratio(before: Figure, after: Figure) -> str:
    """before / after, when both are numbers and after is not zero."""
    b, a = before.get("value"), after.get("value")
    if not isinstance(b, int | float) or not isinstance(a, int | float) or a == 0:
        return "-"
    return f"{b / a:,.1f}x"


def verdict(after: Figure) -> str:
    """Whether the after figure meets its target."""
    if after.get("target") is None:
        return ""
    value = after.get("value")
    if value is None:
        return "no figure"
    return "met" if value <= after["target"] else "**missed**"


def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The markdown table of every attack's figures, before and after."""
    print()
    print("| attack | figure | before | after | before/after | target | after |")
    print("|---|---|---|---|---|---|---|")
    for attack in results:
        before, after = results[attack]["before"], results[attack]["after"]
        if "error" in before or "error" in after:
            print(
                f"| {TITLES[attack]} | (failed) | {before.get('error', 'ok')} "
                f"| {after.get('error', 'ok')} | | | |"
            )
        olds = {f["label"]: f for f in before.get("figures", [])}
        news = {f["label"]: f for f in after.get("figures", [])}
        for label in [*news, *(label for label in olds if label not in news)]:
            old = olds.get(label, figure(label, None))
            fig = news.get(label, figure(label, None))
            print(
                f"| {TITLES[attack]} | {fig['label']} | {old['shown']} "
                f"| {fig['shown']} | {ratio(old, fig)} | {fig['target_text']} "
                f"| {verdict(fig)} |"
            )
    print()
    for attack in results:
        for version in ("before", "after"):
            result = results[attack][version]
            for note in result.get("notes", []):
                print(f"* {attack} {version}: {note}")
            if "wall_s" in result:
                print(
                    f"* {attack} {version}: {result['wall_s']:.0f} s wall, "
                    f"library {result.get('library', '?')}"
                )


def parent(args: argparse.Namespace) -> None:
    header("Attacks of issue 10: harm before and after")
    baseline = git("rev-parse", args.baseline)
    head = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--", "p2ptimeline")
    print(f"before: commit {baseline}")
    print(
        f"after: this working tree, HEAD {head}"
        + (
            f" with uncommitted changes to {len(changed.splitlines())} file(s) "
            "of p2ptimeline/"
            if changed
            else " (p2ptimeline/ unchanged from HEAD)"
        )
    )
    logs = Path(tempfile.mkdtemp(prefix="p2p-attack-logs-"))
    print(f"child logs: {logs}")
    attacks = args.only or ATTACKS
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with baseline_tree(baseline) as old:
        for attack in attacks:
            results[attack] = {}
            for version, library in (("before", old), ("after", REPO)):
                print(f"running {attack} {version} ...", file=sys.stderr, flush=True)
                result = run_child(attack, library, logs / f"{attack}-{version}.log")
                results[attack][version] = result
                print(
                    f"  {json.dumps(result.get('figures', result))}",
                    file=sys.stderr,
                    flush=True,
                )
    print_table(results)


# The child: one attack on one library


def child(attack: str, library: str) -> None:
    loaded = Path(pt.__file__).resolve()
    if not loaded.is_relative_to(Path(library).resolve()):
        sys.exit(f"loaded {loaded}, not the library at {library}")
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    figures, notes = asyncio.run(ATTACK_RUNNERS[attack]())
    print(
        json.dumps(
            {
                "attack": attack,
                "library": str(loaded.parent),
                "figures": figures,
                "notes": notes,
            }
        ),
        flush=True,
    )


# Shared by the attacks

NODES = 100
KSIZE = 20
HOST = "127.0.0.1"
SEALED = b"\x02" + bytes(range(119))  # a sealed key's size, not a real one
PASSWORD = "correct horse"
MiB = 1 << 20

Result = tuple[list[Figure], list[str]]


async def network(
    stack: contextlib.AsyncExitStack,
    count: int = NODES,
    *,
    ksize: int = KSIZE,
    **options: Any,
) -> list[Any]:
    """Start `count` DhtRegistry nodes, each joining through the first (as
    the test suite's networks, where the issue reproduced its points: routing
    tables are then partial, as in a larger network); `stack` stops them."""
    serializer = pt.CborSerializer()
    nodes: list[pt.DhtRegistry] = []
    stack.push_async_callback(_stop_all, nodes)
    for _ in range(count):
        boot = [nodes[0].address] if nodes else []
        node = pt.DhtRegistry(
            HOST, 0, boot, ksize=ksize, serializer=serializer, **options
        )
        await node.start()
        nodes.append(node)
    return nodes


async def _stop_all(things: Sequence[Any]) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await asyncio.gather(*(t.stop() for t in things), return_exceptions=True)


async def speaks_plain(client: Any, addresses: Sequence[tuple[str, int]]) -> bool:
    """Greet the first address to learn which protocol version the network
    speaks; if the older one, have `client` use it with every address at
    once (rather than wait out a request in the newer shape each time)."""
    await client.greet(addresses[0])
    plain = addresses[0] in client.plain
    if plain:
        client.plain.update(addresses)
    return plain


async def join_all(liars: Sequence[Any], addresses: list[tuple[str, int]]) -> None:
    """Have every lying node join the nodes at `addresses`."""
    for liar in liars:
        await speaks_plain(liar.client, addresses)
    await asyncio.gather(*(liar.join(addresses) for liar in liars))


async def limited(
    job: Callable[[Any], Awaitable[Any]], items: Sequence[Any], limit: int
) -> list[Any]:
    """`job(item)` for each item, at most `limit` at a time; the results (or
    the exceptions raised) in order."""
    slots = asyncio.Semaphore(limit)

    async def run(item: Any) -> Any:
        async with slots:
            return await job(item)

    return await asyncio.gather(*(run(i) for i in items), return_exceptions=True)


async def poll(condition: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Whether `condition()` became true within `within` seconds (asked
    every 0.2 s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await condition():
                return True
        await asyncio.sleep(0.2)
    return False


def rss_mib() -> float:
    """This process's resident memory, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def exception_names(errors: Sequence[BaseException]) -> str:
    """'ValueError x2, TypeError' for a list of exceptions."""
    counts = collections.Counter(type(e).__name__ for e in errors)
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.most_common())


def stored(answer: Any) -> bool:
    """Whether a store answer (of either protocol version) says stored."""
    if isinstance(answer, dict):
        return answer.get("outcome") == "stored"
    return isinstance(answer, list) and bool(answer) and answer[0] == "stored"


def deep_size(root: object) -> int:
    """Bytes of the objects reachable from `root` (each counted once;
    classes, modules and functions left out)."""
    skip = (type, type(sys), type(deep_size), type(len))
    seen: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        thing = stack.pop()
        if id(thing) in seen or isinstance(thing, skip):
            continue
        seen.add(id(thing))
        total += sys.getsizeof(thing)
        stack.extend(gc.get_referents(thing))
    return total


def closest(nodes: Sequence[Any], key: bytes) -> list[Any]:
    """`nodes` sorted by XOR distance of their id to `key`."""
    target = int.from_bytes(key)
    return sorted(nodes, key=lambda n: int.from_bytes(n.node_id) ^ target)


# 1. Forged "stale" store replies


LEASE = 3.0  # seconds: renewals every second, so a dead lease shows soon


async def attack_lockout() -> Result:
    async with contextlib.AsyncExitStack() as stack:
        nodes = await network(stack, lease=LEASE)
        addresses = [n.address for n in nodes]
        lies = [2**63 - 2, 2**63 - 2, None, None]
        identities = [pt.Identity.generate() for _ in lies]
        liars = []
        for i, (held, identity) in enumerate(zip(lies, identities, strict=True)):
            for key in (presence_key(identity.public_key), claim_key(f"victim{i}")):
                liar = await dht.LyingNode.start(dht.near(key))
                liar.answer = _stale_answerer(liar, key, held)
                liars.append(liar)
        await join_all(liars, addresses)
        outcomes = await asyncio.gather(
            *(
                _one_victim(nodes, i, identity, liars[2 * i : 2 * i + 2])
                for i, identity in enumerate(identities)
            )
        )
    locked = [o for o in outcomes if o["locked_out"]]
    raised = [e for o in outcomes for e in o["raised"]]
    dead = sum(o["lease_died"] for o in outcomes)
    lied = sum(o["lies"] for o in outcomes)
    figures = [
        figure(
            "victims locked out",
            len(locked),
            f"{len(locked)}/{len(outcomes)}",
            target=0,
            target_text="0",
        ),
        figure(
            "exceptions raised into the caller",
            len(raised),
            f"{len(raised)}" + (f" ({exception_names(raised)})" if raised else ""),
        ),
        figure("lease tasks dead", dead, f"{dead}/{len(outcomes)}"),
        figure("stores answered with a lie", lied, f"{lied:,}"),
    ]
    notes = [
        f"victim{i} (lie {lie}): {o['summary']}"
        for i, (lie, o) in enumerate(
            zip(["2**63-2"] * 2 + ["None"] * 2, outcomes, strict=True)
        )
    ]
    return figures, notes


def _stale_answerer(liar: Any, key: bytes, held: int | None) -> Callable[..., Any]:
    """Answers of a liar: "stale" and `held` (no record) to every store
    under `key` (the victim's), honest ones to anything else (so that each
    victim meets the lie it is listed with)."""

    def answer(name: str, args: list[Any], sender: tuple[str, int]) -> Any:
        if name == "store" and key in args[1:2]:
            return liar.shaped(name, args, outcome="stale", detail=held, held=held)
        return liar.honest(name, args, sender)

    return answer


async def _one_victim(
    nodes: list[Any], i: int, identity: Any, liars: list[Any]
) -> dict[str, Any]:
    """Register victim `i` on one node under the liars' attack, then, the
    liars gone, check its lease, a login elsewhere and a logout."""

    name = f"victim{i}"
    home, elsewhere, reader = nodes[1 + 3 * i], nodes[2 + 3 * i], nodes[3 + 3 * i]
    key = presence_key(identity.public_key)
    raised: list[BaseException] = []
    steps: list[str] = []
    published = None
    try:
        await home.claim_username(name, identity, SEALED)
        published = await home.set_presence(name, identity, (HOST, 1000 + i), True)
        steps.append(f"registered (seq {published.seq})")
    except Exception as exc:
        raised.append(exc)
        steps.append(f"register raised {type(exc).__name__}: {exc}")
    lies = sum(liar.requests["store"] for liar in liars)
    for liar in liars:
        liar.close()

    seen: list[str] = [""]

    async def renewed_past(seq: int, port: int) -> bool:
        try:
            record = await reader.get_user(name)
        except Exception as exc:
            seen[0] = f"read raised {exc!r}"
            raise
        presence = record.presence if record else None
        seen[0] = "read " + (
            f"seq {presence.seq}, port {presence.port}, online {presence.online}"
            if presence
            else "no presence"
        )
        return bool(
            presence
            and presence.online
            and presence.port == port
            and presence.seq > seq
        )

    home_renewed = None
    if published is not None:
        home_renewed = await poll(
            lambda: renewed_past(published.seq, 1000 + i), within=3 * LEASE
        )
        steps.append("lease renewed" if home_renewed else f"NOT renewed ({seen[0]})")
    lease = home._leases.get(key)
    lease_died = bool(lease is not None and lease.done() and not lease.cancelled())
    if lease_died:
        steps.append(f"lease task died: {lease.exception()!r}")
    # The victim logs out there (or its peer crashes), and logs in elsewhere.
    try:
        await home.set_presence(name, identity, (HOST, 1000 + i), False)
        steps.append("logout ok")
    except Exception as exc:
        raised.append(exc)
        steps.append(f"logout raised {type(exc).__name__}")
        for task in home._leases.values():  # as a crash would end it
            task.cancel()
    login_ok = elsewhere_renewed = False
    try:
        record = await elsewhere.set_presence(name, identity, (HOST, 2000 + i), True)
        login_ok = True
        elsewhere_renewed = await poll(
            lambda: renewed_past(record.seq, 2000 + i), within=3 * LEASE
        )
        steps.append(
            "login elsewhere ok, "
            + ("renewed" if elsewhere_renewed else f"NOT renewed ({seen[0]})")
        )
    except Exception as exc:
        raised.append(exc)
        steps.append(f"login elsewhere raised {type(exc).__name__}: {exc}")
    try:
        await elsewhere.set_presence(name, identity, (HOST, 2000 + i), False)
        steps.append("logout elsewhere ok")
    except Exception as exc:
        raised.append(exc)
        steps.append(f"logout elsewhere raised {type(exc).__name__}")
    return {
        "locked_out": home_renewed is False
        or not login_ok
        or not elsewhere_renewed
        or lease_died,
        "raised": raised,
        "lease_died": lease_died,
        "lies": lies,
        "summary": "; ".join(steps),
    }


# 2. Name hijacking


async def attack_far_claims() -> Result:
    figures: list[Figure] = []
    notes: list[str] = []
    for ksize in (8, 20):
        hijacked, readers, taken, far, failed = await _far_claims(ksize)
        figures.append(
            figure(
                f"readers hijacked, k={ksize}",
                hijacked,
                f"{hijacked}/{readers}",
            )
        )
        figures.append(
            figure(
                f"far nodes that took the forged claim, k={ksize}",
                taken,
                f"{taken}/{far}",
            )
        )
        if failed:
            notes.append(f"k={ksize}: {failed} reads failed or found no claim")
    return figures, notes


async def _far_claims(ksize: int) -> tuple[int, int, int, int, int]:
    async with contextlib.AsyncExitStack() as stack:
        nodes = await network(stack, ksize=ksize)
        alice, mallory = pt.Identity.generate(), pt.Identity.generate()
        while mallory.public_key > alice.public_key:  # the old tie-breaker
            mallory = pt.Identity.generate()
        await nodes[0].claim_username("alice", alice, SEALED)
        key = claim_key("alice")
        far = closest(nodes, key)[ksize:]
        forged = pt.CborSerializer().encode(
            RegistryValue(claim=pt.UsernameClaim.create(mallory, "alice", b"", seq=1))
        )
        client = await dht.RawClient.open()
        stack.callback(client.close)
        await speaks_plain(client, [n.address for n in far])
        answers = await limited(lambda n: client.store(n.address, key, forged), far, 16)
        taken = sum(stored(a) for a in answers)
        readers = nodes[1:]
        records = await limited(lambda n: n.get_user("alice"), readers, 16)
    hijacked = sum(
        1
        for r in records
        if not isinstance(r, BaseException)
        and r is not None
        and r.public_key == mallory.public_key
    )
    failed = sum(1 for r in records if isinstance(r, BaseException) or r is None)
    return hijacked, len(readers), taken, len(far), failed


HOSTILE_SHARE = 0.1
BIG_NETWORK = 300


NAMES = ["alice", "bob", "carol", "dave", "erin"]


async def attack_hostile_tenth() -> Result:
    figures: list[Figure] = []
    notes: list[str] = []
    for everywhere in (True, False):
        how = "greeting every node" if everywhere else "joined via one node"
        outcome = await _hostile_tenth(everywhere)
        reads = outcome["reads"]
        figures += [
            figure(
                f"reads hijacked, hostile nodes {how}",
                outcome["hijacked"],
                f"{outcome['hijacked']}/{reads:,}",
                target=0,
                target_text="0",
            ),
            figure(
                f"reads finding no claim, hostile nodes {how}",
                outcome["missing"],
                f"{outcome['missing']}/{reads:,}",
            ),
        ]
        notes.append(f"hostile nodes {how}: {outcome['note']}")
    return figures, notes


async def _hostile_tenth(everywhere: bool) -> dict[str, Any]:
    """Five users claim their names in a network where a tenth of the nodes
    are hostile (joined by greeting every node, or through one node as
    honest ones do); the attacker stores its claims of those names wherever
    it can; every other honest node reads each name once."""
    users = {name: pt.Identity.generate() for name in NAMES}
    mallory = pt.Identity.generate()
    while mallory.public_key > min(u.public_key for u in users.values()):
        mallory = pt.Identity.generate()  # wins the old tie-breaker
    serializer = pt.CborSerializer()
    forged = {
        claim_key(name): serializer.encode(
            RegistryValue(claim=pt.UsernameClaim.create(mallory, name, b"", seq=1))
        )
        for name in NAMES
    }
    hostile_count = int(BIG_NETWORK * HOSTILE_SHARE)
    async with contextlib.AsyncExitStack() as stack:
        honest = await network(stack, BIG_NETWORK - hostile_count)
        liars = [
            await dht.LyingNode.start(os.urandom(20)) for _ in range(hostile_count)
        ]
        for liar in liars:
            stack.callback(liar.close)
        triples = [[liar.node_id, *liar.address] for liar in liars]
        for liar in liars:
            liar.answer = _eclipse_answerer(liar, triples, forged)
        addresses = [n.address for n in honest]
        await join_all(liars, addresses if everywhere else addresses[:1])
        for name, identity in users.items():
            await honest[0].claim_username(name, identity, SEALED)
        holding = []
        for name, identity in users.items():
            key = claim_key(name)
            holding.append(
                sum(
                    1
                    for n in closest(honest, key)[:KSIZE]
                    if (v := n._started().storage.value(key)) is not None
                    and v.claim is not None
                    and v.claim.public_key == identity.public_key
                )
            )
        client = await dht.RawClient.open()
        stack.callback(client.close)
        await speaks_plain(client, addresses)
        stores = [(n, key, raw) for key, raw in forged.items() for n in honest]
        answers = await limited(
            lambda s: client.store(s[0].address, s[1], s[2]), stores, 16
        )
        taken = sum(stored(a) for a in answers)
        reads = [(n, name) for name in NAMES for n in honest[1:]]
        records = await limited(lambda r: r[0].get_user(r[1]), reads, 16)
        asked = sum(liar.requests["find_value"] for liar in liars)
    hijacked = collections.Counter(
        name
        for (_, name), r in zip(reads, records, strict=True)
        if not isinstance(r, BaseException)
        and r is not None
        and r.public_key == mallory.public_key
    )
    errors = [r for r in records if isinstance(r, BaseException)]
    return {
        "reads": len(reads),
        "hijacked": sum(hijacked.values()),
        "missing": sum(1 for r in records if r is None),
        "note": (
            f"{len(honest)} honest + {hostile_count} hostile nodes, {len(NAMES)} "
            f"names, {len(honest) - 1} readers each; hijacked reads by name: "
            + ", ".join(f"{name} {hijacked[name]}" for name in NAMES)
            + f"; the real claim held by {'/'.join(map(str, holding))} of the "
            f"{KSIZE} honest nodes closest to each name; {taken:,} of "
            f"{len(stores):,} forged stores taken; hostile nodes asked find_value "
            f"{asked:,} times"
            + (
                f"; {len(errors)} reads raised {exception_names(errors)}"
                if errors
                else ""
            )
        ),
    }


def _eclipse_answerer(
    liar: Any, triples: list[list[Any]], forged: dict[bytes, bytes]
) -> Callable[..., Any]:
    """Answers of a hostile node: to any lookup, the hostile nodes closest
    to the key (and for a name's key, the attacker's claim)."""
    others = [t for t in triples if t[0] != liar.node_id]

    def answer(name: str, args: list[Any], sender: tuple[str, int]) -> Any:
        if (
            not name.startswith("find")
            or len(args) < 2
            or not isinstance(args[1], bytes)
        ):
            return liar.honest(name, args, sender)
        target = int.from_bytes(args[1])
        nodes = sorted(others, key=lambda t: int.from_bytes(t[0]) ^ target)[:KSIZE]
        fields: dict[str, Any] = {"nodes": nodes}
        if name == "find_value" and args[1] in forged:
            fields["value"] = forged[args[1]]
        shaped = liar.shaped(name, args, **fields)
        if isinstance(shaped, dict) and "id" not in shaped:
            shaped["nodes"] = nodes  # our older nodes sent both
        return shaped

    return answer


# 3. A connection that never reads


REQUESTS = 600
WAVE = 100  # requests pipelined at once


async def attack_buffering() -> Result:
    config = pt.PeerConfig(seal_cost=10, pull_interval=3600.0)
    async with contextlib.AsyncExitStack() as stack:
        nodes = await network(stack)
        peer = pt.Peer(
            HOST, 0, [nodes[5].address], clock=pt.ClockSync(servers=[]), config=config
        )
        await peer.start()
        stack.push_async_callback(peer.stop)
        await peer.register("victim", PASSWORD)
        context = getattr(peer, "_context", None)  # None: a Peer before the split
        identity = (context.session if context else peer._session).identity
        store = context.store if context else peer._store
        await store.add(make_posts("victim", 3000, identity=identity, prefix="x" * 980))
        gc.collect()
        rss_before = rss_mib()
        attacker = await tcp.RawClient.connect(peer.address, receive_buffer=4096)
        ask = GetPosts(author="victim", since=None, limit=500)
        attacker.request(ask)
        transport = None
        deadline = time.monotonic() + 10
        while transport is None and time.monotonic() < deadline:
            transport = attacker.peer_side()
            await asyncio.sleep(0.05)
        assert transport is not None, "the peer's end of the connection not found"
        peak, peak_rss = 0, rss_before

        async def watch() -> None:
            """Until the peer buffers no more (1 s), or closes."""
            nonlocal peak, peak_rss
            last, changed = -1, time.monotonic()
            while not transport.is_closing() and time.monotonic() - changed < 1:
                size = transport.get_write_buffer_size()
                peak, peak_rss = max(peak, size), max(peak_rss, rss_mib())
                if size != last:
                    last, changed = size, time.monotonic()
                await asyncio.sleep(0.005)

        # In waves, each sent once the last is answered: the older server
        # refuses at once what comes beyond 128 requests waiting.
        sent = 1
        while sent < REQUESTS and not transport.is_closing():
            for _ in range(min(WAVE, REQUESTS - sent)):
                attacker.request(ask)
            sent += WAVE
            await watch()
        closed = transport.is_closing()
        attacker.close()
        honest = await tcp.RawClient.connect(peer.address)
        honest.request(GetPosts(author="victim", since=None, limit=10))
        replies = await honest.frames(1, within=30)
        honest.close()
        served = bool(replies) and isinstance(replies[0].message, PostBatch)
    figures = [
        figure(
            "MiB buffered for the connection (peak)",
            round(peak / MiB, 2),
            f"{peak / MiB:,.2f}",
            target=1,
            target_text="< 1 MiB",
        ),
        figure(
            "process RSS growth, MiB",
            round(peak_rss - rss_before, 1),
            f"{peak_rss - rss_before:,.1f}",
        ),
        figure("connection closed by the peer", int(closed), "yes" if closed else "no"),
    ]
    notes = [
        f"{min(sent, REQUESTS)} GetPosts(limit=500) pipelined in waves of {WAVE}; "
        f"an honest GetPosts afterwards "
        + ("was served" if served else "was NOT served")
    ]
    return figures, notes


# 4. Reflection


STORED_KEYS = 20_000
PINGS = 20


async def attack_reflection() -> Result:
    serializer = pt.CborSerializer()
    async with contextlib.AsyncExitStack() as stack:
        nodes = await network(stack)
        target = nodes[7]
        storage = target._started().storage
        owner = pt.Identity.generate()
        # Values the target would hold: names whose keys it is among the
        # ksize closest nodes to.
        names = near_names(nodes, target, STORED_KEYS)
        for name in names:
            claim = pt.UsernameClaim.create(owner, name, SEALED)
            storage.offer(
                claim_key(name), serializer.encode(RegistryValue(claim=claim))
            )
        kept = len(storage)
        protocol = target._started().protocol
        handling: list[float] = []
        watched: set[tuple[str, int]] = set()
        real = protocol.datagram_received

        def timed(data: bytes, addr: tuple[str, int]) -> None:
            started = time.process_time()
            real(data, addr)
            if addr in watched and data[:1] == b"\x00":
                handling.append(time.process_time() - started)

        protocol.datagram_received = timed

        # New ids next to the target's (values near it are handed over), each
        # at its own address that never answers anything, each sending one
        # request: a ping, find_node or find_value (of a held key), in
        # kademlia's shape or ours (with padding, or a made-up token).
        held = claim_key(names[1])
        requests = {
            "plain ping": ("ping", []),
            "ping": ("ping", [bytes(16)]),
            "plain find_node": ("find_node", [None]),
            "find_node": ("find_node", [None, bytes(16)]),
            "plain find_value": ("find_value", [held]),
            "find_value": ("find_value", [held, bytes(8)]),
        }
        clients = {}
        for i, (kind, (name, args)) in enumerate(requests.items()):
            client = await dht.RawClient.open(node_id=dht.near(target.node_id, 5 + i))
            stack.callback(client.close)
            me = client.node_id
            client.send(target.address, name, [me, *(a or me for a in args)])
            clients[kind] = client.endpoint

        def received() -> int:
            return sum(e.received_bytes for e in clients.values())

        await dht.quiet(received, silence=2.5, within=30)
        ratios = {
            kind: (e.received_bytes / e.sent_bytes, e.received_bytes, e.sent_bytes)
            for kind, e in clients.items()
        }
        datagrams = {kind: e.received for kind, e in clients.items()}
        worst = max(ratios, key=lambda kind: ratios[kind][0])

        # Pings from new ids, one at a time: the CPU each costs the target.
        pinger = await dht.RawClient.open()
        stack.callback(pinger.close)
        await speaks_plain(pinger, [target.address])
        watched.add(pinger.address)
        handling.clear()
        delays = []
        for _ in range(PINGS):
            pinger.node_id = os.urandom(20)
            started = time.perf_counter()
            await pinger.request(target.address, "ping", within=10)
            delays.append(time.perf_counter() - started)
        protocol.datagram_received = real
    cpu_ms = statistics.median(handling) * 1000 if handling else None
    figures = [
        figure(
            "bytes sent per byte received, a plain ping",
            round(ratios["plain ping"][0], 1),
            f"{ratios['plain ping'][0]:,.1f} ({ratios['plain ping'][1]:,} B "
            f"for {ratios['plain ping'][2]:,} B)",
            target=3,
            target_text="< 3",
        ),
        figure(
            "bytes sent per byte received, worst first request",
            round(ratios[worst][0], 2),
            f"{ratios[worst][0]:,.2f} ({worst}: {ratios[worst][1]:,} B "
            f"for {ratios[worst][2]:,} B)",
            target=3,
            target_text="< 3",
        ),
        figure(
            f"CPU ms per ping from a new id, {kept:,} keys held",
            None if cpu_ms is None else round(cpu_ms, 2),
            "-" if cpu_ms is None else f"{cpu_ms:,.2f}",
        ),
        figure(
            "ping answer delay, ms (median)",
            round(statistics.median(delays) * 1000, 2),
            f"{statistics.median(delays) * 1000:,.2f}",
        ),
    ]
    notes = [
        f"the target holds {kept:,} claims under keys it is among the {KSIZE} "
        f"closest to; one request from each of {len(requests)} new addresses, "
        f"ids next to the target's: "
        + ", ".join(
            f"{kind} {r:,.2f}x ({datagrams[kind]:,} datagrams)"
            for kind, (r, _, _) in ratios.items()
        )
        + f"; {PINGS} pings from new ids, CPU timed around the target's "
        f"datagram handler (median of {len(handling)})"
    ]
    return figures, notes


def near_names(nodes: Sequence[Any], node: Any, count: int) -> list[str]:
    """`count` usernames whose claim keys have `node` among the `KSIZE`
    nodes of `nodes` closest to them."""
    ids = [int.from_bytes(n.node_id) for n in nodes]
    mine = int.from_bytes(node.node_id)
    names: list[str] = []
    i = 0
    while len(names) < count:
        name, i = f"r{i}", i + 1
        key = int.from_bytes(claim_key(name))
        distance = mine ^ key
        if sum(1 for other in ids if other ^ key < distance) < KSIZE:
            names.append(name)
    return names


# 5. Lookup stall


READERS = 40
READ_DEADLINE = 300.0


async def attack_stall() -> Result:
    async with contextlib.AsyncExitStack() as stack:
        nodes = await network(stack)
        alice = pt.Identity.generate()
        await nodes[0].claim_username("alice", alice, SEALED)
        await nodes[0].set_presence("alice", alice, (HOST, 1001), True)
        key = claim_key("alice")
        sink = await dht.Sink.open(64)
        stack.callback(sink.close)
        liar = await dht.LyingNode.start(dht.near(key))
        stack.callback(liar.close)

        def answer(name: str, args: list[Any], sender: tuple[str, int]) -> Any:
            if not name.startswith("find") or len(args) < 2:
                return liar.honest(name, args, sender)
            invented = [
                [dht.near(args[1], i + 2), host, port]
                for i, (host, port) in enumerate(sink.addresses)
            ]
            return liar.shaped(name, args, nodes=invented)

        liar.answer = answer
        await join_all([liar], [n.address for n in nodes])
        before = sink.received

        async def read(node: Any) -> tuple[float, bool]:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(READ_DEADLINE):
                    record = await node.get_user("alice")
            except TimeoutError:
                return READ_DEADLINE, False
            right = record is not None and record.public_key == alice.public_key
            return time.perf_counter() - started, right

        readers = nodes[1 : 1 + READERS]
        results = await limited(read, readers, READERS)
        invented = sink.received - before
        asked = liar.requests["find_value"] + liar.requests["find_node"]
    errors = [r for r in results if isinstance(r, BaseException)]
    timings = [r for r in results if not isinstance(r, BaseException)]
    seconds = [t for t, _ in timings]
    right = sum(ok for _, ok in timings)
    p50, p99 = statistics.median(seconds), percentile(seconds, 99)
    figures = [
        figure("get_user p50, s", round(p50, 3), f"{p50:,.3f}"),
        figure(
            "get_user p99, s",
            round(p99, 3),
            f"{p99:,.3f}",
            target=3,
            target_text="< 3 s",
        ),
        figure("reads that found alice's key", right, f"{right}/{len(readers)}"),
        figure(
            "datagrams sent to invented addresses, per read",
            round(invented / len(readers), 1),
            f"{invented / len(readers):,.1f} ({invented:,} in all)",
        ),
    ]
    notes = [
        f"{len(readers)} readers at once, each reading once; the liar was asked "
        f"{asked:,} lookups"
        + (f"; {len(errors)} reads raised {exception_names(errors)}" if errors else "")
    ]
    return figures, notes


# 6. Push fan-out


class SocketWatch:
    """Counts this process's TCP connects to `port`, and how many of those
    sockets are open at once, by wrapping `socket.socket`'s `connect` and
    `close` (which asyncio calls for every outgoing connection). A context
    manager."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.attempts = 0
        self.peak = 0
        self._open: set[int] = set()
        self._real = (socket.socket.connect, socket.socket.close)

    def __enter__(self) -> SocketWatch:
        real_connect, real_close = self._real

        def connect(sock: socket.socket, address: Any) -> None:
            if isinstance(address, tuple) and address[1:2] == (self.port,):
                self.attempts += 1
                self._open.add(id(sock))
                self.peak = max(self.peak, len(self._open))
            return real_connect(sock, address)

        def close(sock: socket.socket) -> None:
            self._open.discard(id(sock))
            return real_close(sock)

        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.socket.close = close  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc_info: object) -> None:
        socket.socket.connect, socket.socket.close = self._real  # type: ignore[method-assign]


FRAME_LIMIT = 1 << 20  # the largest frame either version takes


async def attack_push() -> Result:
    config = pt.PeerConfig(seal_cost=10, pull_interval=3600.0)
    figures: list[Figure] = []
    notes: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        nodes = await network(stack)
        peers = []
        for i in range(2):
            peer = pt.Peer(
                HOST,
                0,
                [nodes[10 + i].address],
                clock=pt.ClockSync(servers=[]),
                config=config,
            )
            await peer.start()
            stack.push_async_callback(peer.stop)
            peers.append(peer)
        mallory, victim = peers
        await mallory.register("mallory", PASSWORD)
        port = push.closed_port()
        me = ("victim", HOST, victim.port)
        for size in ("4,000", "largest"):
            post = await mallory.post(f"mine, genuinely ({size})")
            members = 4000 if size == "4,000" else _largest_tree(post, port)
            frame = push.raw_push(post, [me, *push.unreachable_members(members, port)])
            idle = await _idle_cpu_rate(1.0)
            with SocketWatch(port) as watch:
                cpu, wall = time.process_time(), time.perf_counter()
                client = await tcp.RawClient.connect(victim.address)
                client.send_bytes(frame)
                try:
                    replies = await client.frames(1, within=60)
                except (TimeoutError, OSError):
                    replies = []
                client.close()
                answer = type(replies[0].message).__name__ if replies else "closed"
                await poll(lambda: _quiet(victim), within=180)
                wall = time.perf_counter() - wall
                cpu = time.process_time() - cpu - idle * wall
            label = f"{members:,} members"
            figures += [
                figure(
                    f"connection attempts, {label}",
                    watch.attempts,
                    f"{watch.attempts:,}",
                ),
                figure(
                    f"most sockets connecting at once, {label}",
                    watch.peak,
                    f"{watch.peak:,}",
                ),
                figure(f"CPU seconds, {label}", round(cpu, 2), f"{cpu:,.2f}"),
            ]
            notes.append(
                f"{label} ({len(frame):,} B frame): answered {answer}; quiet after "
                f"{wall:,.1f} s" + (" (still forwarding)" if victim._tasks else "")
            )
    return figures, notes


def _largest_tree(post: Any, port: int) -> int:
    """The most unreachable members a push of `post` can list in one frame."""

    low, high = 4000, 60000
    while low < high:
        middle = (low + high + 1) // 2
        tree = [("victim", HOST, 1), *push.unreachable_members(middle, port)]
        if len(push.raw_push(post, tree)) <= FRAME_LIMIT:
            low = middle
        else:
            high = middle - 1
    return low


async def _quiet(peer: Any) -> bool:
    """Whether `peer` has no forwarding left to do."""
    return not peer._tasks


async def _idle_cpu_rate(seconds: float) -> float:
    """CPU seconds per second this process spends while nothing is asked
    of it (the network's own upkeep), measured over `seconds`."""
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


# 7. Follow-set stuffing


GHOSTS = 3000
FANS = 5


async def attack_stuffing() -> Result:

    async with contextlib.AsyncExitStack() as stack:
        nodes = await network(stack)
        alice = pt.Identity.generate()
        await nodes[0].claim_username("alice", alice, SEALED)
        fans = {f"fan{i}" for i in range(FANS)}
        for i, name in enumerate(sorted(fans)):
            identity = pt.Identity.generate()
            await nodes[10 + i].claim_username(name, identity, SEALED)
            await nodes[10 + i].follow(name, "alice", identity)
        clean = nodes[20]
        listed, clean_rpcs, clean_s = await dht.count_requests(
            clean, lambda: clean.get_followers("alice")
        )
        assert listed == fans, listed
        ghosts = dht.ghost_entries(GHOSTS, "alice", alice.public_key)
        started = time.perf_counter()
        await nodes[2]._sets.add("followers", alice.public_key, ghosts)
        write_s = time.perf_counter() - started
        reader = nodes[30]
        reads = []
        for _ in range(2):
            listed, calls, seconds = await dht.count_requests(
                reader, lambda: reader.get_followers("alice")
            )
            reads.append((listed == fans, calls, seconds))
        sets = reader._started_sets()
        _, shard_rpcs, _ = await dht.count_requests(
            reader, lambda: sets.read("followers", alice.public_key)
        )
    figures = [
        figure("DHT requests, read of the clean set", clean_rpcs, f"{clean_rpcs:,}"),
        figure(
            "DHT requests, first read of the stuffed set",
            reads[0][1],
            f"{reads[0][1]:,}",
        ),
        figure("DHT requests, second read", reads[1][1], f"{reads[1][1]:,}"),
        figure(
            "DHT requests reading the set's shards alone",
            shard_rpcs,
            f"{shard_rpcs:,}",
        ),
        figure("seconds, first read", round(reads[0][2], 2), f"{reads[0][2]:,.2f}"),
        figure("seconds, second read", round(reads[1][2], 2), f"{reads[1][2]:,.2f}"),
    ]
    notes = [
        f"{GHOSTS:,} entries written in {write_s:,.1f} s; clean read {clean_s:,.2f} s; "
        f"the {FANS} real followers listed: "
        + ", ".join("yes" if ok else "NO" for ok, _, _ in reads)
    ]
    return figures, notes


# 8. Storage memory


SHARDS = 1500
SHARD_MEMBERS = 21  # ~6.6 KB encoded: a full shard


async def attack_storage() -> Result:
    serializer = pt.CborSerializer()
    async with contextlib.AsyncExitStack() as stack:
        nodes = await network(stack)
        target = nodes[9]
        followers = [pt.Identity.generate() for _ in range(SHARD_MEMBERS)]
        shards: list[tuple[bytes, bytes]] = []
        while len(shards) < SHARDS:
            owner = os.urandom(32)
            key = shard_key("followers", owner, "")
            if target not in closest(nodes, key)[:KSIZE]:
                continue  # a key this node would not be asked to hold
            shards.append((key, serializer.encode(dht.shard_of(owner, followers))))
        client = await dht.RawClient.open()
        stack.callback(client.close)
        await speaks_plain(client, [target.address])
        storage = target._started().storage
        keys_before, kept_before = len(storage), deep_size(storage._data)
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            taken = 0
            started = time.perf_counter()
            for key, raw in shards:
                taken += stored(await client.store(target.address, key, raw))
            seconds = time.perf_counter() - started
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        quota = getattr(storage, "max_bytes_per_source", None)
        cap = getattr(storage, "_max_keys", None)
        keys_after, kept = len(storage), deep_size(storage._data) - kept_before
    size = statistics.mean(len(raw) for _, raw in shards)
    per_key = kept / taken if taken else 0.0
    if quota is not None:
        ceiling = f"{quota / MiB:,.0f} MiB (quota per sender)"
        ceiling_value = quota / MiB
    elif cap is not None:
        ceiling_value = per_key * cap / MiB
        ceiling = (
            f"{ceiling_value / 1024:,.1f} GiB "
            f"({cap:,}-key cap x {per_key / 1024:,.1f} KiB)"
        )
    else:
        ceiling, ceiling_value = "-", None
    figures = [
        figure("keys taken from the sender", taken, f"{taken:,}/{len(shards):,}"),
        figure(
            "MiB its storage holds for them",
            round(kept / MiB, 1),
            f"{kept / MiB:,.1f}",
        ),
        figure(
            "KiB held per key taken", round(per_key / 1024, 1), f"{per_key / 1024:,.1f}"
        ),
        figure(
            "most one sender can make it hold",
            None if ceiling_value is None else round(ceiling_value, 1),
            ceiling,
        ),
    ]
    notes = [
        f"{len(shards):,} shards of {size / 1024:,.1f} KiB encoded, keys ground so "
        f"the node is among the {KSIZE} closest; {seconds:,.1f} s; keys held "
        f"{keys_before:,} -> {keys_after:,}; storage measured as the size of "
        f"every object its table reaches; all allocations the flood left alive: "
        f"{held / MiB:,.1f} MiB (with the signature-check cache, bounded at "
        f"16,384 entries in both versions)"
    ]
    return figures, notes


ATTACK_RUNNERS: dict[str, Callable[[], Awaitable[Result]]] = {
    "1": attack_lockout,
    "2a": attack_far_claims,
    "2b": attack_hostile_tenth,
    "3": attack_buffering,
    "4": attack_reflection,
    "5": attack_stall,
    "6": attack_push,
    "7": attack_stuffing,
    "8": attack_storage,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="d7d89c8", help="the commit before")
    parser.add_argument(
        "--only", nargs="+", choices=ATTACKS, help="run only these attacks"
    )
    parser.add_argument("--child", choices=ATTACKS, help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.library)
    else:
        parent(args)


if __name__ == "__main__":
    main()
