"""`DisseminationTree`: who forwards a post to whom. Pure: no I/O.

A post travels down a k-ary tree over the author's online followers. Trees
travel as arrays in heap order: position 0 is the root, and the children of
position i are positions k*i+1 .. k*i+k. The subtree of any position is again
such an array (its levels are contiguous runs of the parent array), so every
node handles its part the same way: `children(tree)` gives the subtrees to
send, one per child, and when a child cannot be reached, the sender sends to
`children(that child's subtree)` instead: the failed node's subtree is
re-homed under the sender, not planned again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from ._errors import UsageError

__all__ = ["DisseminationTree"]

T = TypeVar("T")


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
        order = sorted(members, key=lambda m: hashlib.sha256(key(m).encode()).digest())
        turns = 2 * self.fanout
        turn = int.from_bytes(post_id[:8], "big") % turns
        shift = turn * len(order) // turns
        return self.children([root, *order[shift:], *order[:shift]])

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
