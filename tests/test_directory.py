"""FollowerDirectory: follow entries applied in any order, newest wins."""

from __future__ import annotations

import itertools

import p2ptimeline as pt
from p2ptimeline._p2p.directory import FollowerDirectory

FAN = pt.Identity.generate()
STAR_KEY = pt.Identity.generate().public_key


def entry(following: bool, ms: int) -> pt.FollowEntry:
    return pt.FollowEntry.create(
        FAN,
        follower="fan",
        followee="star",
        followee_key=STAR_KEY,
        following=following,
        timestamp=pt.HybridTimestamp(physical_ms=ms),
    )


def test_the_newest_entry_wins_in_any_order() -> None:
    """Whatever order a follow, an unfollow and a follow again arrive in (as
    notices or registry reads), the follower ends up following."""
    entries = [entry(True, 1000), entry(False, 2000), entry(True, 3000)]
    for order in itertools.permutations(entries):
        directory = FollowerDirectory()
        for e in order:
            directory.apply(e)
        assert directory.names() == {"fan"}


def test_changes_are_reported_once() -> None:
    """A repeated or older entry changes nothing and reports nothing."""
    directory = FollowerDirectory()
    assert directory.apply(entry(True, 1000)) == "follow"
    assert directory.apply(entry(True, 1000)) is None
    assert directory.apply(entry(False, 2000)) == "unfollow"
    assert directory.apply(entry(True, 1500)) is None  # older than the unfollow
    assert directory.names() == frozenset()
