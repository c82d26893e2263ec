"""An author's view of its followers: who they are and where to reach them."""

from __future__ import annotations

from typing import Literal

import attrs

from .._models import FollowEntry, HybridTimestamp, Presence

__all__ = ["Follower", "FollowerDirectory"]


@attrs.define
class Follower:
    """One follower, as the author knows it."""

    name: str
    public_key: bytes
    presence: Presence | None = None
    """The newest signed presence record seen (from the DHT or the follower)."""
    checked_ms: int = 0
    """When the DHT was last asked for its presence."""
    unreachable_seq: int | None = None
    """Set when pushes to it failed: the seq of the presence that failed.
    A newer presence (it came back) clears it."""


class FollowerDirectory:
    """The followers of the logged-in user and their presence. No I/O.

    The peer fills it from the registry at login, keeps it current from
    follow and presence notices, refreshes stale entries from the DHT before
    a post goes out, and marks followers that could not be reached.
    """

    def __init__(self) -> None:
        self._followers: dict[str, Follower] = {}
        # follower -> timestamp of the newest follow entry applied
        self._applied: dict[str, HybridTimestamp] = {}

    def __len__(self) -> int:
        return len(self._followers)

    def names(self) -> frozenset[str]:
        """The followers' names."""
        return frozenset(self._followers)

    def get(self, name: str) -> Follower | None:
        """The entry of `name`, if it follows."""
        return self._followers.get(name)

    def add(self, name: str, public_key: bytes) -> Follower:
        """Record a follower (keeping what is known if it is already there)."""
        follower = self._followers.get(name)
        if follower is None or follower.public_key != public_key:
            follower = self._followers[name] = Follower(name, public_key)
        return follower

    def remove(self, name: str) -> None:
        """Forget a follower that unfollowed."""
        self._followers.pop(name, None)

    def apply(self, entry: FollowEntry) -> Literal["follow", "unfollow"] | None:
        """Take in a (verified) follow or unfollow entry of a follower, unless
        one at least as new was taken in before: notices and registry reads
        may arrive in any order, and the newest entry wins, as in the
        registry. Returns what changed, if anything."""
        newest = self._applied.get(entry.follower)
        if newest is not None and entry.timestamp <= newest:
            return None
        self._applied[entry.follower] = entry.timestamp
        known = entry.follower in self._followers
        if entry.following:
            self.add(entry.follower, entry.follower_key)
            return None if known else "follow"
        self.remove(entry.follower)
        return "unfollow" if known else None

    def update_presence(self, name: str, presence: Presence) -> bool:
        """Take a presence record of `name` if it is newer; returns whether it was.

        The record must already be verified as `name`'s.
        """
        follower = self._followers.get(name)
        if follower is None or follower.public_key != presence.public_key:
            return False
        if follower.presence is not None and presence.seq <= follower.presence.seq:
            return False
        follower.presence = presence
        if (
            follower.unreachable_seq is not None
            and presence.seq > follower.unreachable_seq
        ):
            follower.unreachable_seq = None
        return True

    def mark_unreachable(self, name: str) -> None:
        """Pushes to `name` failed: leave it out until it announces itself again."""
        follower = self._followers.get(name)
        if follower is not None:
            follower.unreachable_seq = (
                follower.presence.seq if follower.presence else -1
            )

    def stale(self, now_ms: int, recheck_ms: int) -> list[Follower]:
        """Followers whose presence may have changed in the DHT since last seen.

        That is, those with no live lease that were not checked within
        `recheck_ms`.
        """
        return [
            f
            for f in self._followers.values()
            if (f.presence is None or not f.presence.is_online(now_ms))
            and now_ms - f.checked_ms >= recheck_ms
        ]

    def online(self, now_ms: int) -> list[Follower]:
        """Followers with a live lease that were not marked unreachable."""
        return [
            f
            for f in self._followers.values()
            if f.presence is not None
            and f.presence.is_online(now_ms)
            and f.unreachable_seq is None
        ]
