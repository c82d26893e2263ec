"""`DisseminationTree`: who forwards a post to whom. Pure: no I/O.

A post travels down a k-ary tree over the author's online followers. Trees
travel as arrays in heap order: position 0 is the root, and the children of
position i are positions k*i+1 .. k*i+k. The subtree of any position is again
such an array (its levels are contiguous runs of the parent array), so every
node handles its part the same way: `children(tree)` gives the subtrees to
send, one per child, and when a child cannot be reached, the sender sends to
`children(that child's subtree)` instead: the failed node's subtree is
re-homed under the sender, not planned again.

The tree in a push is not signed: whoever sends one chooses it. So a peer
decides what to send for a tree it received through a `Relay`, which bounds
its part: it contacts the root's children and at most `spare` members in
place of unreachable ones, however large the tree, and leaves the rest of a
lost subtree to catch up by pulling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from .._errors import UsageError

__all__ = ["REHOME_PER_FANOUT", "DisseminationTree", "Relay"]

T = TypeVar("T")

REHOME_PER_FANOUT = 8
"""A forwarding relay's budget (`Relay.spare`) per unit of the tree's fanout
k. With a fifth of 1,000 followers unreachable (the churn of
benchmarks/dissemination.py) and the author re-homing any of its own
followers, 8k lets a push reach every live follower at k = 1 and 2, and all
but about one in a hundred at k = 3 and 4; the rest catch up by pulling."""


class DisseminationTree:
    """Plans k-ary dissemination trees.

    Args:
        fanout: k, the most children any node sends a post to (the author
            included): 2 gives the seed's binary tree.
    """

    def __init__(self, fanout: int = 2) -> None:
        if not 1 <= fanout <= 64:
            raise UsageError("fanout must be between 1 and 64")
        self.fanout = fanout

    def plan(
        self, root: T, members: Sequence[T], *, post_id: bytes, key: Callable[[T], str]
    ) -> list[list[T]]:
        """The subtrees the root (the author) sends a post to, at most `fanout`.

        Members are placed in one order, drawn from their names, and a post
        uses one of `2 * fanout` rotations of it, each shifted by a
        `2 * fanout`-th of its length, chosen by the post id. The interior
        positions (the nodes that forward) are the first `1 / fanout` of the
        order, so every follower forwards in about one post in `fanout`, and
        no follower is always the busy one. Yet the trees, and so the
        connections along their edges, recur from post to post: a tree drawn
        afresh for each post would need a new connection for nearly every
        hop.

        Args:
            root: The author.
            members: The followers to reach (each once).
            post_id: The post's id, which picks the rotation.
            key: A stable name for a member (its username).
        """
        return self.children(self.arrange(root, members, post_id=post_id, key=key))

    def arrange(
        self, root: T, members: Sequence[T], *, post_id: bytes, key: Callable[[T], str]
    ) -> list[T]:
        """The whole tree `plan` sends, as one array in heap order, root first."""
        order = sorted(members, key=lambda m: hashlib.sha256(key(m).encode()).digest())
        turns = 2 * self.fanout
        turn = int.from_bytes(post_id[:8], "big") % turns
        shift = turn * len(order) // turns
        return [root, *order[shift:], *order[:shift]]

    def children(self, tree: Sequence[T]) -> list[list[T]]:
        """The subtrees of the children of `tree[0]`, in heap order each."""
        return [
            self.subtree(tree, child)
            for child in range(1, min(self.fanout, len(tree) - 1) + 1)
        ]

    def subtree(self, tree: Sequence[T], index: int) -> list[T]:
        """The subtree rooted at `tree[index]`, as an array in heap order."""
        k = self.fanout
        nodes: list[T] = []
        first = last = index
        while first < len(tree):
            nodes.extend(tree[first : min(last, len(tree) - 1) + 1])
            first, last = k * first + 1, k * last + k
        return nodes

    def depth(self, size: int) -> int:
        """Hops from the root to the deepest node of a tree of `size` nodes."""
        depth, reach, width = 0, 1, 1
        while reach < size:
            width *= self.fanout
            reach += width
            depth += 1
        return depth


class Relay(Generic[T]):
    """One peer's part in spreading one post: what to send, and what to do
    when a send fails. Pure: the peer sends, and reports each failure here.

    The peer sends each subtree `start` gives to its root. When a root cannot
    be reached, `unreachable` says what to send instead: its children's
    subtrees (its subtree re-homed here), as long as the budget of `spare`
    members lasts; each member sent to in place of an unreachable one spends
    one. Beyond the budget, a lost subtree is dropped (its members catch up
    by pulling) and counted in `dropped`. So however large the tree a sender
    chose, a relay contacts at most `fanout + spare` members, plus those of
    splits (see `too_large`).

    A subtree of more than `max_size` members is split before it is sent:
    its root gets the post alone, and this peer sends to its children. Honest
    trees need this only at the author, whose followers may be many; a tree
    received in a push is no larger than `max_size`, nor are its subtrees.

    Args:
        shape: The tree's arity (the author's fanout).
        spare: Most members sent to in place of unreachable ones.
        max_size: Most members of a subtree sent in one push (root included).
    """

    def __init__(self, shape: DisseminationTree, *, spare: int, max_size: int) -> None:
        if spare < 0 or max_size < 1:
            raise UsageError("a relay needs spare >= 0 and max_size >= 1")
        self.shape = shape
        self.spare = spare
        """Members that may still be sent to in place of unreachable ones."""
        self.max_size = max_size
        self.dropped = 0
        """Members left out: in subtrees of unreachable members past the budget."""

    def start(self, tree: Sequence[T]) -> list[list[T]]:
        """The subtrees to send for `tree`, whose root (`tree[0]`) is this peer."""
        return self._sized(self.shape.children(tree))

    def unreachable(self, subtree: Sequence[T]) -> list[list[T]]:
        """`subtree[0]` could not be reached: the subtrees to send instead.

        Its children's subtrees, as many as the budget allows; the others are
        dropped.
        """
        children = self.shape.children(subtree)
        taken = children[: self.spare]
        self.spare -= len(taken)
        self.dropped += sum(len(child) for child in children[len(taken) :])
        return self._sized(taken)

    def too_large(self, subtree: Sequence[T]) -> list[list[T]]:
        """The push carrying `subtree` does not fit in a frame: send its root
        the post alone, and its children their subtrees. Empty if `subtree`
        is its root alone (the post itself does not fit)."""
        if len(subtree) <= 1:
            return []
        return [[subtree[0]], *self._sized(self.shape.children(subtree))]

    def _sized(self, subtrees: list[list[T]]) -> list[list[T]]:
        """`subtrees`, each larger than `max_size` split (see `too_large`)."""
        sized: list[list[T]] = []
        pending = list(reversed(subtrees))
        while pending:
            subtree = pending.pop()
            if len(subtree) <= self.max_size:
                sized.append(subtree)
            else:
                sized.append([subtree[0]])
                pending.extend(reversed(self.shape.children(subtree)))
        return sized
