"""What the DHT stores, and the rules storage nodes and readers apply. Pure.

Every DHT value is a `RegistryValue` holding exactly one of:

* a `UsernameClaim`, under `claim_key(username)`: the first claim of a name
  wins; later claims by the same key with a higher `seq` replace it; once
  withdrawn by its key, a claim by any key replaces it;
* a `Presence`, under `presence_key(public_key)`: higher `seq` wins;
* a `SetShard`, under `shard_key(relation, owner key, prefix)`: one shard of a
  user's followers or following set (see below).

Each key is the SHA-1 of its parts joined by zero bytes, the first part
naming the kind (``b"p2ptimeline/claim"``, ...).

The DHT key is derived from the value's own content, and every record is
signed by the key it names, so a storage node can check a value completely
without asking anyone else: `check_value` is that check, and readers run it
again on every answer.

Follow sets are sets of signed `FollowEntry`s, merged last-writer-wins per
member; nobody ever rewrites a whole set, so concurrent follows never lose an
update. A set grows past the size of one UDP datagram by splitting like a
binary trie: a member's entry goes into the first shard along the path of its
hash bits (``""``, ``"0"``, ``"01"``, ...) that accepts it; a shard refuses new
members once it holds `capacity` entries (it still takes newer entries of the
members it holds). Readers merge all replicas of all shards they find,
descending into both children of every full shard.
"""

from __future__ import annotations

import collections
import enum
import hashlib
from collections.abc import Iterable, Sequence

import attrs

from .._errors import InvalidRecord
from .._models import FollowEntry, HybridTimestamp, Presence, UsernameClaim, sized_bytes
from .._serializer import Serializer

__all__ = [
    "MAX_SEQ_AHEAD_MS",
    "MAX_SHARD_DEPTH",
    "MAX_VALUE_SIZE",
    "Outcome",
    "RegistryValue",
    "SetShard",
    "check_value",
    "claim_key",
    "claim_winner",
    "member_path",
    "merge",
    "presence_key",
    "shard_capacity",
    "shard_key",
]

MAX_VALUE_SIZE = 7000
"""Largest encoded value a node stores: leaves room in an 8 KB datagram."""
MAX_SHARD_DEPTH = 32
"""Deepest shard of a set: up to 2**32 shards."""
MAX_SEQ_AHEAD_MS = 3600 * 1000
"""How far (ms) a claim's or presence's `seq` may run ahead of the checker's
clock. Writers take a fresh `seq` from their clock (milliseconds since the
epoch), so a `seq` far beyond it was not made by an honest clock; refusing
it keeps anyone from pushing a record's versions towards 2**63, where the
owner could never publish a newer one."""


@attrs.frozen(kw_only=True)
class SetShard:
    """One shard of a user's followers or following set."""

    relation: str = attrs.field(
        validator=attrs.validators.in_(("followers", "following"))
    )
    """``"followers"`` (entries signed by followers) or ``"following"``."""
    owner_key: bytes = attrs.field(validator=sized_bytes(32))
    """Public key of the user whose set this is."""
    prefix: str = attrs.field(
        validator=attrs.validators.and_(
            attrs.validators.max_len(MAX_SHARD_DEPTH),
            attrs.validators.matches_re(r"[01]*"),
        )
    )
    """The hash-bit path of this shard in the set's trie (``""`` is the root)."""
    entries: tuple[FollowEntry, ...]
    """The entries held, at most one per member."""


@attrs.frozen(kw_only=True)
class RegistryValue:
    """What one DHT key holds: exactly one of its fields is set."""

    claim: UsernameClaim | None = None
    """A username claim."""
    presence: Presence | None = None
    """A presence lease."""
    shard: SetShard | None = None
    """A shard of a follow set."""

    def __attrs_post_init__(self) -> None:
        if sum(x is not None for x in (self.claim, self.presence, self.shard)) != 1:
            raise ValueError("a registry value holds exactly one record")


class Outcome(enum.Enum):
    """What a storage node did with a value it was asked to store."""

    STORED = "stored"
    """Stored or merged: the node now holds it (or something newer)."""
    STALE = "stale"
    """Refused: the node holds a newer version."""
    TAKEN = "taken"
    """Refused: the name is claimed by another key."""
    INVALID = "invalid"
    """Refused: malformed, forged, too large, or under the wrong key."""
    REFUSED = "refused"
    """Refused, though valid: the node does not take this key from this
    sender now (it is far from the key, or the sender used up its quota)."""


def _digest(*parts: bytes) -> bytes:
    return hashlib.sha1(b"\x00".join(parts)).digest()


def claim_key(username: str) -> bytes:
    """The DHT key of `username`'s claim."""
    return _digest(b"p2ptimeline/claim", username.encode())


def presence_key(public_key: bytes) -> bytes:
    """The DHT key of the presence record of the user with `public_key`."""
    return _digest(b"p2ptimeline/presence", public_key)


def shard_key(relation: str, owner_key: bytes, prefix: str) -> bytes:
    """The DHT key of one shard of a follow set."""
    return _digest(b"p2ptimeline/" + relation.encode(), owner_key, prefix.encode())


def member_path(member_key: bytes) -> str:
    """The hash bits that place a member in a set's trie."""
    return format(int.from_bytes(hashlib.sha256(member_key).digest()), "0256b")[
        :MAX_SHARD_DEPTH
    ]


def owner_and_member(relation: str, entry: FollowEntry) -> tuple[bytes, bytes]:
    """The set owner's key and the member's key of `entry` in `relation`."""
    if relation == "followers":
        return entry.followee_key, entry.follower_key
    return entry.follower_key, entry.followee_key


def key_of(value: RegistryValue) -> bytes:
    """The DHT key under which `value` belongs."""
    if value.claim is not None:
        return claim_key(value.claim.username)
    if value.presence is not None:
        return presence_key(value.presence.public_key)
    assert value.shard is not None
    shard = value.shard
    return shard_key(shard.relation, shard.owner_key, shard.prefix)


def shard_capacity(serializer: Serializer) -> int:
    """How many entries fit in one shard under `serializer`, in the worst case."""
    biggest = FollowEntry(
        follower="x" * 32,
        follower_key=bytes(32),
        followee="x" * 32,
        followee_key=bytes(32),
        following=False,
        timestamp=HybridTimestamp(physical_ms=2**47 - 1, logical=0xFFFF),
        signature=bytes(64),
    )
    empty = RegistryValue(
        shard=SetShard(
            relation="following",
            owner_key=bytes(32),
            prefix="0" * MAX_SHARD_DEPTH,
            entries=(),
        )
    )
    overhead = len(serializer.encode(empty)) + 16
    return (MAX_VALUE_SIZE - overhead) // (len(serializer.encode(biggest)) + 2)


def check_value(dht_key: bytes, value: RegistryValue, *, now_ms: int) -> None:
    """Check that `value` is authentic and belongs under `dht_key`.

    Args:
        dht_key: The key it was stored or found under.
        value: The decoded value.
        now_ms: The checker's clock (ms since the epoch): a claim or
            presence whose `seq` is more than `MAX_SEQ_AHEAD_MS` beyond it
            is refused.

    Raises:
        InvalidRecord: It does not (the message says why).
    """
    if key_of(value) != dht_key:
        raise InvalidRecord("value stored under the wrong key")
    record = value.claim or value.presence
    if record is not None:
        if record.seq > now_ms + MAX_SEQ_AHEAD_MS:
            raise InvalidRecord(f"seq {record.seq} is far ahead of the clock")
        record.verify()
    else:
        assert value.shard is not None
        _check_shard(value.shard)


def claim_winner(claims: Sequence[UsernameClaim]) -> tuple[UsernameClaim | None, bool]:
    """Who owns a name, by the claims the nodes closest to it hold.

    Args:
        claims: One claim per replica that holds one, the replicas among
            the `ksize` closest to the name's key only, closest first.

    Returns:
        ``(winner, contested)``: the newest claim of the key most replicas
        vote for (None if no live claim is held), and whether replicas
        disagree (several keys, or withdrawals: a reader that asked only a
        few should ask them all). One vote per replica for the key of a
        live claim: one that is not withdrawn, of a key whose newest claim
        here is not a withdrawal. A tie goes to the key held by the closest
        replica of the tied keys: unlike a rule on the keys themselves, no
        one can choose a key that wins it.
    """
    newest: dict[bytes, UsernameClaim] = {}
    for claim in claims:
        if claim.public_key not in newest or claim.seq > newest[claim.public_key].seq:
            newest[claim.public_key] = claim
    voters = [
        c.public_key
        for c in claims
        if not c.withdrawn and not newest[c.public_key].withdrawn
    ]
    votes = collections.Counter(voters)
    contested = len(newest) > 1 or any(c.withdrawn for c in newest.values())
    if not votes:
        return (None, contested)
    top = max(votes.values())
    # `voters` is in replica order: the first of the tied keys is held closest.
    winner = next(key for key in voters if votes[key] == top)
    return (newest[winner], contested)


def _check_shard(shard: SetShard) -> None:
    members = set()
    for entry in shard.entries:
        owner, member = owner_and_member(shard.relation, entry)
        if owner != shard.owner_key:
            raise InvalidRecord("entry of another user's set")
        if not member_path(member).startswith(shard.prefix):
            raise InvalidRecord("entry in the wrong shard")
        if member in members:
            raise InvalidRecord("two entries for one member")
        members.add(member)
        entry.verify()


def merge(
    held: RegistryValue | None, incoming: RegistryValue, *, capacity: int
) -> tuple[RegistryValue, Outcome, list[int]]:
    """Apply a storage node's rules: what to keep when `incoming` arrives.

    Both values must already have passed `check_value` for the same key.

    Returns:
        ``(kept, outcome, refused)``: the value to keep, what happened, and,
        for a shard, the indices of incoming entries refused for lack of
        room (the writer sends those one level down).
    """
    if held is None and incoming.shard is None:
        return incoming, Outcome.STORED, []
    if incoming.claim is not None:
        assert held is not None
        assert held.claim is not None
        if held.claim.public_key != incoming.claim.public_key:
            if held.claim.withdrawn:
                return incoming, Outcome.STORED, []
            return held, Outcome.TAKEN, []
        return _newer_by_seq(held, incoming, held.claim.seq, incoming.claim.seq)
    if incoming.presence is not None:
        assert held is not None
        assert held.presence is not None
        return _newer_by_seq(held, incoming, held.presence.seq, incoming.presence.seq)
    assert incoming.shard is not None
    held_entries = () if held is None or held.shard is None else held.shard.entries
    entries, refused = merge_entries(
        incoming.shard.relation, held_entries, incoming.shard.entries, capacity
    )
    kept = RegistryValue(shard=attrs.evolve(incoming.shard, entries=entries))
    return kept, Outcome.STORED, refused


def _newer_by_seq(
    held: RegistryValue, incoming: RegistryValue, held_seq: int, incoming_seq: int
) -> tuple[RegistryValue, Outcome, list[int]]:
    if incoming_seq > held_seq:
        return incoming, Outcome.STORED, []
    if incoming == held:
        return held, Outcome.STORED, []
    return held, Outcome.STALE, []


def merge_entries(
    relation: str,
    held: Iterable[FollowEntry],
    incoming: Iterable[FollowEntry],
    capacity: int | None = None,
) -> tuple[tuple[FollowEntry, ...], list[int]]:
    """Merge entries last-writer-wins per member.

    With a `capacity`, incoming entries for members not yet held are refused
    once that many members are held; their indices are returned.
    """
    by_member = {owner_and_member(relation, e)[1]: e for e in held}
    refused = []
    for index, entry in enumerate(incoming):
        member = owner_and_member(relation, entry)[1]
        current = by_member.get(member)
        if current is None:
            if capacity is not None and len(by_member) >= capacity:
                refused.append(index)
            else:
                by_member[member] = entry
        elif entry.supersedes(current):
            by_member[member] = entry
    return tuple(sorted(by_member.values(), key=_entry_order)), refused


def _entry_order(entry: FollowEntry) -> tuple[bytes, bytes]:
    return (entry.follower_key, entry.followee_key)
