"""DisseminationTree: k-ary plans in heap order, re-homing and rotation."""

from __future__ import annotations

import collections
import hashlib
import random
from collections.abc import Sequence
from typing import TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import p2ptimeline as pt
from p2ptimeline._p2p.tree import REHOME_PER_FANOUT, Relay
from p2ptimeline._p2p.wire import TreeMember

fanouts = st.integers(1, 8)
member_counts = st.integers(0, 2000)
post_ids = st.binary(min_size=32, max_size=32)

T = TypeVar("T")


def _members(n: int) -> list[str]:
    return [f"user{i}" for i in range(n)]


def _key(member: str) -> str:
    return member


def _post_id(i: int) -> bytes:
    return hashlib.sha256(b"post %d" % i).digest()


def _heap_subtree(tree: Sequence[T], index: int, k: int) -> list[T]:
    """Oracle: the subtree at `index`, level by level, from explicit child lists."""
    nodes: list[T] = []
    level = [index]
    while level:
        nodes.extend(tree[i] for i in level)
        level = [
            c for i in level for c in range(k * i + 1, k * i + k + 1) if c < len(tree)
        ]
    return nodes


def _check(planner: pt.DisseminationTree, tree: list[str]) -> int:
    """Check every node of a heap-ordered `tree`; returns its depth in hops.

    At each node, children() must be the oracle's subtrees of its k children,
    and together they hold the subtree minus its root, each member once.
    """
    k = planner.fanout
    deepest = 0
    stack = [(tree, 0)]
    while stack:
        sub, depth = stack.pop()
        deepest = max(deepest, depth)
        children = planner.children(sub)
        assert len(children) == min(k, len(sub) - 1)
        assert children == [
            _heap_subtree(sub, c, k) for c in range(1, len(children) + 1)
        ]
        assert sorted(m for child in children for m in child) == sorted(sub[1:])
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _plan(k: int, n: int, post_id: bytes) -> list[list[str]]:
    return pt.DisseminationTree(k).plan(
        "author", _members(n), post_id=post_id, key=_key
    )


def _heap_of(
    planner: pt.DisseminationTree, root: str, subtrees: list[list[str]]
) -> list[str]:
    """The heap array whose children() are `subtrees` (inverse of children)."""
    k = planner.fanout
    size = 1 + sum(len(s) for s in subtrees)
    tree: list[str | None] = [None] * size
    tree[0] = root
    for j, sub in enumerate(subtrees, start=1):
        positions = _heap_subtree(range(size), j, k)
        for position, member in zip(positions, sub, strict=True):
            tree[position] = member
    assert None not in tree
    return [m for m in tree if m is not None]


# Construction


@pytest.mark.parametrize("fanout", [0, -1, 65])
def test_fanout_out_of_range_is_usage_error(fanout: int) -> None:
    """A fanout outside 1..64 is a UsageError (and a ValueError)."""
    with pytest.raises(pt.UsageError, match="fanout"):
        pt.DisseminationTree(fanout)
    with pytest.raises(ValueError, match="fanout"):
        pt.DisseminationTree(fanout)


def test_default_fanout_is_binary() -> None:
    """The default tree is binary, and 1 and 64 are accepted."""
    assert pt.DisseminationTree().fanout == 2
    assert pt.DisseminationTree(1).fanout == 1
    assert pt.DisseminationTree(64).fanout == 64


# Heap order, by example


def test_children_of_a_binary_heap() -> None:
    """Positions 1 and 2 root the subtrees; their levels are contiguous runs."""
    tree = [str(i) for i in range(10)]
    assert pt.DisseminationTree(2).children(tree) == [
        ["1", "3", "4", "7", "8", "9"],
        ["2", "5", "6"],
    ]


def test_children_of_a_ternary_heap() -> None:
    """With k=3, node i has children 3i+1..3i+3."""
    tree = [str(i) for i in range(14)]
    assert pt.DisseminationTree(3).children(tree) == [
        ["1", "4", "5", "6", "13"],
        ["2", "7", "8", "9"],
        ["3", "10", "11", "12"],
    ]


def test_fanout_one_is_a_chain() -> None:
    """With k=1 the tree is a chain: one child carrying everyone else."""
    tree = ["a", "b", "c", "d"]
    planner = pt.DisseminationTree(1)
    assert planner.children(tree) == [["b", "c", "d"]]
    assert planner.subtree(tree, 2) == ["c", "d"]
    assert planner.depth(4) == 3
    (chain,) = _plan(1, 2000, _post_id(0))
    assert len(chain) == 2000
    assert planner.children(chain) == [chain[1:]]
    assert planner.depth(2001) == 2000


def test_leaves_and_empty_trees_have_no_children() -> None:
    """A lone root (or an empty array) has no subtrees to send."""
    planner = pt.DisseminationTree(3)
    assert planner.children(["a"]) == []
    assert planner.children([]) == []


def test_plan_with_no_followers_sends_nothing() -> None:
    """An author without online followers sends no frame."""
    assert _plan(2, 0, _post_id(0)) == []


def test_plan_with_few_followers_sends_one_each() -> None:
    """With at most k followers, each gets a subtree of just itself."""
    plan = _plan(4, 3, _post_id(0))
    assert sorted(plan) == [["user0"], ["user1"], ["user2"]]


def test_subtree_of_a_subtree() -> None:
    """A subtree is a heap array of the same arity: subtrees nest."""
    k = 3
    planner = pt.DisseminationTree(k)
    tree = [str(i) for i in range(200)]
    for i in range(len(tree)):
        sub = planner.subtree(tree, i)
        assert sub == _heap_subtree(tree, i, k)
        for j in range(1, k + 1):
            if k * i + j < len(tree):
                assert planner.subtree(sub, j) == planner.subtree(tree, k * i + j)


@pytest.mark.parametrize(
    ("k", "size", "depth"),
    [
        *[(2, 0, 0), (2, 1, 0), (2, 2, 1), (2, 3, 1), (2, 4, 2), (2, 7, 2), (2, 8, 3)],
        *[(3, 4, 1), (3, 5, 2), (3, 13, 2), (3, 14, 3), (1, 1, 0), (1, 5, 4)],
    ],
)
def test_depth_examples(k: int, size: int, depth: int) -> None:
    """depth(size) is the number of hops to the deepest node of a full k-ary heap."""
    assert pt.DisseminationTree(k).depth(size) == depth


def test_works_with_tree_members() -> None:
    """Plans work on the TreeMember values the peer sends, keyed by name."""
    members = [TreeMember(name=f"u{i}", host="127.0.0.1", port=i) for i in range(50)]
    root = TreeMember(name="author", host="127.0.0.1", port=9)
    plan = pt.DisseminationTree(3).plan(
        root, members, post_id=_post_id(1), key=lambda m: m.name
    )
    assert len(plan) == 3
    assert sorted(m.port for sub in plan for m in sub) == list(range(50))


# Properties of plans


@settings(max_examples=60)
@given(k=fanouts, n=member_counts, post_id=post_ids)
@example(k=1, n=2000, post_id=bytes(32))
@example(k=8, n=2000, post_id=bytes(32))
def test_plan_reaches_every_member_once(k: int, n: int, post_id: bytes) -> None:
    """At most k subtrees, each member in exactly one, the author in none."""
    plan = _plan(k, n, post_id)
    assert len(plan) == min(k, n)
    flat = [m for sub in plan for m in sub]
    assert len(flat) == n
    assert sorted(flat) == sorted(_members(n))
    assert all(sub for sub in plan)


@settings(max_examples=60)
@given(
    k=fanouts,
    n=member_counts,
    post_id=post_ids,
)
@example(k=2, n=2000, post_id=bytes(32))
@example(k=3, n=1999, post_id=bytes(32))
@example(k=8, n=2000, post_id=bytes(32))
def test_plan_is_heap_ordered_with_logarithmic_depth(
    k: int, n: int, post_id: bytes
) -> None:
    """Every subtree is heap ordered all the way down, and depth(n+1) hops deep."""
    if k == 1:
        n = min(n, 300)  # a chain: checking every node is quadratic in n
    planner = pt.DisseminationTree(k)
    plan = planner.plan("author", _members(n), post_id=post_id, key=_key)
    tree = _heap_of(planner, "author", plan)
    assert planner.children(tree) == plan
    depth = _check(planner, tree)
    assert depth == planner.depth(n + 1)
    # The levels are full but the last: the fewest levels that hold n + 1 nodes.
    levels = [k**i for i in range(depth + 1)]
    assert sum(levels[:-1]) < n + 1 <= sum(levels)
    if k >= 2 and n:
        assert k ** (depth - 1) <= n  # O(log_k n) hops


@pytest.mark.parametrize("k", range(1, 9))
def test_author_sends_at_most_k_frames(k: int) -> None:
    """The author sends min(k, n) frames, however many followers there are."""
    for n in [0, 1, k, k + 1, 100, 2000]:
        assert len(_plan(k, n, _post_id(n))) == min(k, n)


@settings(max_examples=60)
@given(data=st.data(), k=fanouts, n=st.integers(1, 2000), post_id=post_ids)
def test_rehoming_a_subtree_loses_no_one(
    data: st.DataObject, k: int, n: int, post_id: bytes
) -> None:
    """For any node, children() of its subtree is that subtree minus the node."""
    planner = pt.DisseminationTree(k)
    plan = _plan(k, n, post_id)
    tree = _heap_of(planner, "author", plan)
    for _ in range(5):
        position = data.draw(st.integers(1, n), label="position")
        sub = planner.subtree(tree, position)
        rehomed = [m for child in planner.children(sub) for m in child]
        assert sorted(rehomed) == sorted(sub[1:])
        assert tree[position] not in rehomed


@settings(max_examples=40)
@given(
    k=fanouts,
    n=st.integers(0, 400),
    post_id=post_ids,
    failed=st.sets(st.integers(0, 399), max_size=60),
)
def test_dissemination_with_failures_delivers_each_live_member_once(
    k: int, n: int, post_id: bytes, failed: set[int]
) -> None:
    """Simulated push with unreachable nodes: each live member gets it exactly once.

    A sender whose child is unreachable sends to children() of that child's
    subtree instead, exactly as the peer does.
    """
    planner = pt.DisseminationTree(k)
    down = {f"user{i}" for i in failed}
    received: collections.Counter[str] = collections.Counter()

    def push(sub: list[str]) -> None:
        if sub[0] in down:
            for child in planner.children(sub):
                push(child)
            return
        received[sub[0]] += 1
        for child in planner.children(sub):
            push(child)

    for sub in planner.plan("author", _members(n), post_id=post_id, key=_key):
        push(sub)
    live = {m for m in _members(n) if m not in down}
    assert set(received) == live
    assert all(count == 1 for count in received.values())


@given(k=fanouts, n=member_counts, post_id=post_ids)
def test_plan_is_deterministic(k: int, n: int, post_id: bytes) -> None:
    """The same post id gives the same plan, whatever the input order."""
    members = _members(n)
    shuffled = random.Random(post_id).sample(members, len(members))
    planner = pt.DisseminationTree(k)
    assert planner.plan("a", members, post_id=post_id, key=_key) == planner.plan(
        "a", shuffled, post_id=post_id, key=_key
    )
    assert pt.DisseminationTree(k).plan(
        "a", members, post_id=post_id, key=_key
    ) == planner.plan("a", members, post_id=post_id, key=_key)


def _interior(plan: list[list[str]], k: int) -> set[str]:
    """The members of a plan that forward the post to someone."""
    planner = pt.DisseminationTree(k)
    forwarders: set[str] = set()
    pending = list(plan)
    while pending:
        sub = pending.pop()
        children = planner.children(sub)
        if children:
            forwarders.add(sub[0])
        pending += children
    return forwarders


@pytest.mark.parametrize(("k", "n"), [(2, 100), (2, 1001), (3, 100), (4, 37)])
def test_every_member_forwards_in_about_one_post_in_k(k: int, n: int) -> None:
    """Across posts the forwarders change: of the 2k trees a post can use,
    every member forwards in at least one and at most 3 (about 2)."""
    rng = random.Random(1234)
    forwards: collections.Counter[str] = collections.Counter()
    plans = set()
    for _ in range(400):
        plan = _plan(k, n, rng.randbytes(32))
        plans.add(tuple(tuple(sub) for sub in plan))
    for plan in plans:
        forwards.update(_interior([list(sub) for sub in plan], k))
    assert len(plans) == 2 * k
    assert max(forwards.values()) <= 3
    assert len(forwards) == n


def test_the_trees_of_a_membership_recur() -> None:
    """Posts use a few trees, again and again (their connections are reused);
    the post id picks which."""
    plans = [_plan(2, 30, _post_id(i)) for i in range(40)]
    distinct = {tuple(tuple(sub) for sub in plan) for plan in plans}
    assert len(distinct) == 4
    assert _plan(2, 30, _post_id(3)) == plans[3]


# Relays: one peer's bounded part in a push


def _relay_run(
    relay: Relay[str], tree: list[str], down: set[str]
) -> tuple[list[list[str]], list[str]]:
    """Drive `relay` as a peer does: send each subtree it gives, and report
    each root in `down` as unreachable. Returns the subtrees delivered, and
    every member contacted."""
    delivered: list[list[str]] = []
    contacted: list[str] = []
    pending = relay.start(tree)
    while pending:
        sub = pending.pop()
        contacted.append(sub[0])
        if sub[0] in down:
            pending += relay.unreachable(sub)
        else:
            delivered.append(sub)
    return delivered, contacted


def test_arrange_is_the_tree_plan_sends() -> None:
    """plan() is children() of arrange(): the author's whole tree, root first."""
    planner = pt.DisseminationTree(3)
    tree = planner.arrange("author", _members(40), post_id=_post_id(5), key=_key)
    assert tree[0] == "author"
    assert sorted(tree[1:]) == sorted(_members(40))
    assert planner.children(tree) == _plan(3, 40, _post_id(5))


def test_a_relay_rehomes_an_unreachable_child_within_its_budget() -> None:
    """An unreachable child's children are sent to instead, each spending one
    of the spare members; past the budget, the rest is dropped and counted."""
    shape = pt.DisseminationTree(2)
    tree = [str(i) for i in range(15)]  # 0 is this peer
    relay = Relay(shape, spare=3, max_size=100)
    assert relay.start(tree) == shape.children(tree)
    sub = shape.subtree(tree, 1)  # 1, 3, 4, 7, 8, 9, 10
    assert relay.unreachable(sub) == shape.children(sub)  # 3 and 4 take over
    assert relay.spare == 1
    sub3 = shape.subtree(tree, 3)  # 3, 7, 8
    assert relay.unreachable(sub3) == [["7"]]  # one left: 8 is dropped
    assert (relay.spare, relay.dropped) == (0, 1)
    assert relay.unreachable(shape.subtree(tree, 4)) == []  # 9, 10 dropped
    assert relay.dropped == 3


def test_a_relay_splits_subtrees_larger_than_a_push_may_carry() -> None:
    """Subtrees over max_size go out as their root alone plus its children's
    subtrees, recursively; too_large splits on demand; nothing is lost."""
    shape = pt.DisseminationTree(2)
    tree = [str(i) for i in range(31)]
    relay = Relay(shape, spare=0, max_size=4)
    sent = relay.start(tree)
    assert all(len(sub) <= 4 for sub in sent)
    assert sorted(m for sub in sent for m in sub) == sorted(tree[1:])
    small = shape.subtree(tree, 5)  # 5, 11, 12, 23, 24, 25, 26
    assert relay.too_large(small[:3]) == [["5"], ["11"], ["12"]]
    assert relay.too_large(["5"]) == []


@settings(max_examples=60)
@given(
    k=fanouts,
    n=st.integers(0, 3000),
    spare=st.integers(0, 70),
    data=st.data(),
)
def test_a_relay_contacts_at_most_fanout_plus_spare_members(
    k: int, n: int, spare: int, data: st.DataObject
) -> None:
    """Whatever the tree and whoever is unreachable (all of them, even), a
    relay contacts at most k + spare members, each once, never itself, and
    every member is reached, dropped or unreachable."""
    shape = pt.DisseminationTree(k)
    tree = ["me", *_members(n)]
    everyone = data.draw(st.booleans(), label="all down")
    down = (
        set(tree[1:])
        if everyone
        else set(
            data.draw(st.lists(st.sampled_from(tree[1:]), max_size=200), label="down")
            if n
            else []
        )
    )
    relay = Relay(shape, spare=spare, max_size=10_000)
    delivered, contacted = _relay_run(relay, tree, down)
    assert len(contacted) <= k + spare
    assert len(set(contacted)) == len(contacted)
    assert "me" not in contacted
    unreachable = [m for m in contacted if m in down]
    assert sum(map(len, delivered)) + len(unreachable) + relay.dropped == n
    if not down:
        assert len(contacted) == min(k, n)


@pytest.mark.parametrize(
    ("k", "worst", "mean"),
    [(1, 1.0, 1.0), (2, 1.0, 1.0), (3, 0.99, 0.999), (4, 0.9, 0.99)],
)
def test_bounded_relays_still_reach_nearly_everyone_when_a_fifth_crashed(
    k: int, worst: float, mean: float
) -> None:
    """Simulated push with 20% of 1,000 followers unreachable, the author's
    relay re-homing any of its own followers and every other relay bounded by
    REHOME_PER_FANOUT * k spare members: at k = 1 and 2 every live follower
    gets it in each of 10 trees; at k = 3 and 4 all but one in a hundred on
    average (the rest catch up by pulling)."""
    shape = pt.DisseminationTree(k)
    shares = []
    for seed in range(10):
        rng = random.Random(seed)
        members = _members(1000)
        down = set(rng.sample(members, 200))
        tree = shape.arrange("author", members, post_id=rng.randbytes(32), key=_key)
        reached: list[str] = []
        relays = [tree]
        while relays:
            sub = relays.pop()
            spare = len(sub) if sub is tree else REHOME_PER_FANOUT * k
            relay = Relay(shape, spare=spare, max_size=4096)
            delivered, _ = _relay_run(relay, sub, down)
            reached += [child[0] for child in delivered]
            relays += delivered
        assert len(reached) == len(set(reached))
        shares.append(len(reached) / 800)
    assert min(shares) >= worst
    assert sum(shares) / len(shares) >= mean
