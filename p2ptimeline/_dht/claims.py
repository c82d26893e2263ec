"""Names: who owns which, decided by the votes of the closest nodes.

A name is claimed by writing a signed claim to the `ksize` nodes closest to
its key; a claimer that finds another key's claim there reads the vote of
all of them (`claim_winner`) and, if it lost, withdraws the replicas it
got. A reader counts the replicas of the closest nodes that answered, one
vote each, and reads patiently from all of them when the answers disagree.
A name's key never changes once claimed, so reads are cached (`NameCache`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .._errors import AuthError, RegistryUnavailable, UnknownUser, UsernameTaken
from .._identity import Identity
from .._models import FollowEntry, UsernameClaim
from .names import NameCache
from .node import DhtNode
from .records import Outcome, RegistryValue, claim_key, claim_winner
from .wire import StoreReply, newer_seq

__all__ = ["MAX_WRITE_ROUNDS", "Claims"]

log = logging.getLogger("p2ptimeline.registry")

MAX_WRITE_ROUNDS = 4
"""Writes of one claim or presence, passing stale versions of our own."""
_MAX_CONCURRENT_READS = 32
_MAX_NAME_FAILURES = 64  # names read as forged or absent per set read


class Claims:
    """Claims and reads of names through one DHT node.

    Args:
        node: The started node.
        names: The cache of names read (kept by the registry across
            restarts of its node).
        next_seq: A fresh `seq` for a record under a DHT key, past a `seq`
            shown to be held.
    """

    def __init__(
        self,
        node: DhtNode,
        names: NameCache,
        next_seq: Callable[[bytes, int], int],
    ) -> None:
        self._node = node
        self._names = names
        self._next_seq = next_seq
        self._reads = asyncio.Semaphore(_MAX_CONCURRENT_READS)

    async def claim(
        self, username: str, identity: Identity, sealed_key: bytes
    ) -> UsernameClaim:
        """See `DhtRegistry.claim_username`."""
        node = self._node
        key = claim_key(username)
        seq = self._next_seq(key, -1)
        for _ in range(MAX_WRITE_ROUNDS):
            claim = UsernameClaim.create(identity, username, sealed_key, seq=seq)
            # Not into this node's own storage yet: if another key holds the
            # name, our own copy would be one vote for us in the decision.
            replies = await node.write(
                key, RegistryValue(claim=claim), patient=True, local=False
            )
            outcomes = [reply for _, reply in replies if reply is not None]
            if any(_rival_claim(r, identity) for r in outcomes):
                # Held by another key, or claimed by someone else at this
                # very moment: the claim most of the closest nodes hold wins.
                # The loser withdraws the replicas it got, so that readers
                # asking only a few of the closest nodes agree on the winner.
                winner = await self.read(username, everywhere=True)
                if winner is None or winner.public_key != identity.public_key:
                    if any(r.outcome is Outcome.STORED for r in outcomes):
                        await self._withdraw(claim, identity)
                    raise UsernameTaken(f"{username!r} is taken")
            newer = newer_seq(outcomes, claim)
            if newer is None:
                break
            seq = self._next_seq(key, newer)  # our own later claim: pass it
        node.keep_if_close(key, RegistryValue(claim=claim))
        self.remember(claim)
        return claim

    async def _withdraw(self, claim: UsernameClaim, identity: Identity) -> None:
        """Give up the replicas of `claim` that a race for its name lost."""
        withdrawal = UsernameClaim.create(
            identity, claim.username, b"", claim.seq + 1, withdrawn=True
        )
        key = claim_key(claim.username)
        try:
            await self._node.write(key, RegistryValue(claim=withdrawal))
        except RegistryUnavailable as exc:  # readers still outvote those replicas
            log.warning(
                "could not withdraw a lost claim of %r: %s", claim.username, exc
            )

    async def read(
        self, username: str, *, everywhere: bool = False
    ) -> UsernameClaim | None:
        """The live claim of `username` held by most of the closest nodes.

        The read asks the `ksize` closest nodes (not just the read quorum,
        as reads of other records do: nodes that sit in many routing tables
        near a name could otherwise be all a reader asks). Only their
        replicas count (this node's own storage only if it is one of them),
        one vote each (see `claim_winner`). If any answer shows another
        key's claim or a withdrawal (a race's leftovers, or a liar
        somewhere), or with `everywhere`, the read waits for each of the
        `ksize` closest nodes even when slow, so that two claimers of one
        name, each reading once both writes landed, count the same votes
        and agree on who won.
        """
        key = claim_key(username)
        node = self._node
        replicas = await node.read(key, node.ksize, patient=everywhere)
        held = [(r.close, r.value.claim) for r in replicas if r.value and r.value.claim]
        winner, contested = claim_winner([claim for close, claim in held if close])
        if not everywhere and (contested or _disagree([c for _, c in held])):
            return await self.read(username, everywhere=True)
        self._names.put(username, winner, time.monotonic())
        if winner is not None:
            node.repair_if_stale(key, RegistryValue(claim=winner), replicas)
        return winner

    async def cached(
        self, username: str, *, trust_absent: bool = False
    ) -> UsernameClaim | None:
        """The claim of `username`, from the cache if read lately.

        The key of a name never changes once claimed, so a cached claim is as
        good as a fresh one for telling who owns a name; it is read again
        after an hour all the same (a first read can be wrong). A name read
        as unregistered is read again, since it may be registered since,
        unless `trust_absent` (checks of many names at once, where one read
        per name every ten minutes is plenty).
        """
        known, claim = self._names.lookup(username, time.monotonic())
        if known and (claim is not None or trust_absent):
            return claim
        async with self._reads:
            try:
                return await self.read(username)
            except RegistryUnavailable:
                if claim is None:
                    raise
                return claim  # the old answer is better than none

    async def recheck(self, username: str) -> bytes | None:
        """Read the owner of `username` again, from all the closest nodes,
        if it was not re-read in the last minute; the key it is bound to.

        For a caller that holds something signed under the name that does
        not verify with the key it got: that key may have come from a read
        that was wrong, and the cache is corrected.

        Raises:
            RegistryUnavailable: No DHT node could be reached.
        """
        if self._names.may_recheck(username, time.monotonic()):
            before = self._names.cached(username)
            claim = await self.read(username, everywhere=True)
            if before and claim and before.public_key != claim.public_key:
                log.warning("the key of %r was read wrong before", username)
            return None if claim is None else claim.public_key
        claim = await self.cached(username)
        return None if claim is None else claim.public_key

    def remember(self, claim: UsernameClaim) -> None:
        """Cache `claim`, as just read or written."""
        self._names.put(claim.username, claim, time.monotonic())

    async def owned(self, username: str, identity: Identity) -> UsernameClaim:
        """The claim of `username`, checked to be `identity`'s.

        Raises:
            UnknownUser: No such user.
            AuthError: Another key owns the name.
        """
        claim = await self.cached(username)
        if claim is None:
            raise UnknownUser(f"no user {username!r}")
        if claim.public_key != identity.public_key:
            raise AuthError(f"this identity does not own {username!r}")
        return claim

    async def genuine(
        self, entries: tuple[FollowEntry, ...]
    ) -> tuple[FollowEntry, ...]:
        """Keep the entries whose follower name is really the signer's.

        Names are looked up through the cache, which remembers names read as
        unregistered for ten minutes. Once `_MAX_NAME_FAILURES` names of one
        read turned out unregistered or another key's, the names not cached
        are no longer looked up in that read (their entries are left out
        this time, and checked on later reads): an honest set names
        registered users, so this only cuts short a set stuffed with made-up
        names, which would otherwise cost a lookup per entry.
        """
        failures = 0
        slots = asyncio.Semaphore(_MAX_CONCURRENT_READS)

        async def genuine(entry: FollowEntry) -> bool:
            nonlocal failures
            async with slots:
                known, _ = self._names.lookup(entry.follower, time.monotonic())
                if not known and failures >= _MAX_NAME_FAILURES:
                    return False
                try:
                    claim = await self.cached(entry.follower, trust_absent=True)
                except RegistryUnavailable:
                    return False
            if claim is None or claim.public_key != entry.follower_key:
                failures += 1
                if failures == _MAX_NAME_FAILURES:
                    log.info("a follow set names many unregistered users: skipped")
                log.debug("dropped a follow entry forging the name %r", entry.follower)
                return False
            return True

        verdicts = await asyncio.gather(*(genuine(e) for e in entries))
        return tuple(e for e, ok in zip(entries, verdicts, strict=True) if ok)


def _disagree(claims: list[UsernameClaim]) -> bool:
    """Whether claims (from any replicas, close or not) name more than one
    key, or include a withdrawal."""
    return len({c.public_key for c in claims}) > 1 or any(c.withdrawn for c in claims)


def _rival_claim(reply: StoreReply, identity: Identity) -> bool:
    """Whether a store reply proves the name is held by another key."""
    held = reply.held.claim if reply.held else None
    return (
        reply.outcome is Outcome.TAKEN
        and held is not None
        and held.public_key != identity.public_key
        and not held.withdrawn
    )
