"""`NameCache`: what a peer remembers of who owns which name. Pure.

A name's key never changes once claimed, so readers cache it; but a read
can be wrong (a lost race, a hostile majority among the nodes it asked),
so a cached key is read again after `ttl` seconds, and earlier when
something signed under the name fails to verify with it (`may_recheck`).
Names read as unregistered are cached too, for `absent_ttl` seconds, so
that a follow set stuffed with unregistered names does not cost one DHT
read per name every time it is read.
"""

from __future__ import annotations

import collections

from .._models import UsernameClaim

__all__ = ["NameCache"]


class NameCache:
    """Claims by name, and names known to be unregistered, with ages.

    Args:
        size: Most names remembered (the least recently used are dropped).
        ttl: Seconds a claim is trusted without reading it again.
        absent_ttl: Seconds a name read as unregistered stays so.
        recheck_after: Least seconds between forced re-reads of one name.
    """

    def __init__(
        self, *, size: int, ttl: float, absent_ttl: float, recheck_after: float
    ) -> None:
        self._size = size
        self._ttl = ttl
        self._absent_ttl = absent_ttl
        self._recheck_after = recheck_after
        # name -> (claim, or None if unregistered; when it was read)
        self._entries: collections.OrderedDict[
            str, tuple[UsernameClaim | None, float]
        ] = collections.OrderedDict()
        self._rechecked: collections.OrderedDict[str, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, name: str, now: float) -> tuple[bool, UsernameClaim | None]:
        """``(known, claim)``: whether a fresh answer is cached, and what it
        is (None: unregistered)."""
        entry = self._entries.get(name)
        if entry is None:
            return (False, None)
        claim, read_at = entry
        if now - read_at >= (self._ttl if claim is not None else self._absent_ttl):
            return (False, claim)
        self._entries.move_to_end(name)
        return (True, claim)

    def cached(self, name: str) -> UsernameClaim | None:
        """The claim cached for `name`, however old (None if none)."""
        entry = self._entries.get(name)
        return None if entry is None else entry[0]

    def put(self, name: str, claim: UsernameClaim | None, now: float) -> None:
        """Remember what a read of `name` found."""
        self._entries[name] = (claim, now)
        self._entries.move_to_end(name)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def may_recheck(self, name: str, now: float) -> bool:
        """Whether `name` may be read again now, out of turn (at most once
        per `recheck_after` seconds; a yes counts as that once)."""
        last = self._rechecked.get(name)
        if last is not None and now - last < self._recheck_after:
            return False
        self._rechecked[name] = now
        self._rechecked.move_to_end(name)
        while len(self._rechecked) > self._size:
            self._rechecked.popitem(last=False)
        return True
