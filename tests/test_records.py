"""Registry rules (`_dht.records`) and `RecordStorage`: pure, no network."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs
import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import claims, keys, presences, usernames

import p2ptimeline as pt
from p2ptimeline._dht import storage as _dht_storage
from p2ptimeline._dht.records import (
    MAX_SEQ_AHEAD_MS,
    MAX_SHARD_DEPTH,
    MAX_VALUE_SIZE,
    Outcome,
    RegistryValue,
    SetShard,
    check_value,
    claim_key,
    member_path,
    merge,
    merge_entries,
    presence_key,
    shard_capacity,
    shard_key,
)
from p2ptimeline._dht.storage import RecordStorage, StoreResult

OWNER = pt.Identity.generate()
ALICE = pt.Identity.generate()
MALLORY = pt.Identity.generate()
MEMBERS = [pt.Identity.generate() for _ in range(4)]
MEMBER_KEYS = [m.public_key for m in MEMBERS]
CBOR = pt.CborSerializer()
NOW_MS = 1_800_000_000_000  # the checkers' clock in these tests
JSON = pt.JsonSerializer()
serializers = pytest.mark.parametrize(
    "serializer", [CBOR, JSON], ids=lambda s: type(s).__name__
)
MAX_TIMESTAMP = pt.HybridTimestamp(physical_ms=2**47 - 1, logical=2**16 - 1)


# Building records and values


def at(physical_ms: int, logical: int = 0) -> pt.HybridTimestamp:
    return pt.HybridTimestamp(physical_ms=physical_ms, logical=logical)


def make_claim(
    identity: pt.Identity,
    name: str = "alice",
    seq: int = 0,
    sealed: bytes = b"s",
    *,
    withdrawn: bool = False,
) -> RegistryValue:
    claim = pt.UsernameClaim.create(identity, name, sealed, seq, withdrawn=withdrawn)
    return RegistryValue(claim=claim)


def make_presence(
    identity: pt.Identity, seq: int, *, port: int = 4000, host: str = "peer.example"
) -> RegistryValue:
    presence = pt.Presence.create(
        identity, host=host, port=port, online=True, expires_ms=10**12, seq=seq
    )
    return RegistryValue(presence=presence)


def follows_owner(
    member: pt.Identity,
    *,
    following: bool = True,
    ms: int = 1,
    name: str = "member",
    owner: pt.Identity = OWNER,
) -> pt.FollowEntry:
    """An entry of `owner`'s followers set: `member` (un)follows `owner`."""
    return pt.FollowEntry.create(
        member,
        follower=name,
        followee="owner",
        followee_key=owner.public_key,
        following=following,
        timestamp=at(ms),
    )


def owner_follows(
    member_key: bytes, *, following: bool = True, ms: int = 1
) -> pt.FollowEntry:
    """An entry of OWNER's following set: OWNER (un)follows `member_key`."""
    return pt.FollowEntry.create(
        OWNER,
        follower="owner",
        followee="member",
        followee_key=member_key,
        following=following,
        timestamp=at(ms),
    )


def shard_value(
    entries: Sequence[pt.FollowEntry],
    *,
    relation: str = "followers",
    owner_key: bytes = OWNER.public_key,
    prefix: str = "",
) -> RegistryValue:
    return RegistryValue(
        shard=SetShard(
            relation=relation,
            owner_key=owner_key,
            prefix=prefix,
            entries=tuple(entries),
        )
    )


def home(value: RegistryValue) -> bytes:
    """The DHT key `value` belongs under, from the public key functions."""
    if value.claim is not None:
        return claim_key(value.claim.username)
    if value.presence is not None:
        return presence_key(value.presence.public_key)
    assert value.shard is not None
    shard = value.shard
    return shard_key(shard.relation, shard.owner_key, shard.prefix)


def member_of(relation: str, entry: pt.FollowEntry) -> bytes:
    return entry.follower_key if relation == "followers" else entry.followee_key


def winner(entries: Sequence[pt.FollowEntry]) -> pt.FollowEntry:
    """Last writer by timestamp; an unfollow wins a tie; then the signature."""
    return max(
        entries, key=lambda e: (e.timestamp.packed(), not e.following, e.signature)
    )


def other_prefix(member_key: bytes) -> str:
    """A one-bit shard prefix that does not lie on the member's path."""
    return "1" if member_path(member_key).startswith("0") else "0"


# The DHT value


def test_registry_value_holds_exactly_one_record() -> None:
    """A RegistryValue with no record, or with two, cannot be built."""
    claim = make_claim(ALICE).claim
    presence = make_presence(ALICE, 1).presence
    with pytest.raises(ValueError, match="exactly one"):
        RegistryValue()
    with pytest.raises(ValueError, match="exactly one"):
        RegistryValue(claim=claim, presence=presence)


@pytest.mark.parametrize("prefix", ["2", "0a", "0" * (MAX_SHARD_DEPTH + 1)])
def test_shard_prefix_is_a_bounded_bit_string(prefix: str) -> None:
    """A shard prefix is at most MAX_SHARD_DEPTH characters of '0' and '1'."""
    with pytest.raises(ValueError, match="prefix"):
        shard_value([], prefix=prefix)


# Keys


@given(name=usernames, key=keys, prefix=st.from_regex(r"[01]{0,32}", fullmatch=True))
def test_keys_are_deterministic_20_byte_digests(
    name: str, key: bytes, prefix: str
) -> None:
    """Every DHT key is a 20-byte digest that depends only on its inputs."""

    def all_keys() -> list[bytes]:
        return [
            claim_key(name),
            presence_key(key),
            shard_key("followers", key, prefix),
            shard_key("following", key, prefix),
        ]

    first = all_keys()
    assert all(type(k) is bytes and len(k) == 20 for k in first)
    assert all_keys() == first


@given(name=usernames, key=keys, prefix=st.from_regex(r"[01]{0,32}", fullmatch=True))
def test_keys_of_different_kinds_never_collide(
    name: str, key: bytes, prefix: str
) -> None:
    """Claim, presence and both shard kinds of the same inputs use distinct keys."""
    found = {
        claim_key(name),
        presence_key(key),
        shard_key("followers", key, prefix),
        shard_key("following", key, prefix),
    }
    assert len(found) == 4


@given(names=st.lists(usernames, min_size=2, max_size=2, unique=True))
def test_claim_keys_differ_between_names(names: list[str]) -> None:
    """Different usernames have different claim keys."""
    assert claim_key(names[0]) != claim_key(names[1])


@given(owners=st.lists(keys, min_size=2, max_size=2, unique=True))
def test_shard_keys_differ_by_owner_and_prefix(owners: list[bytes]) -> None:
    """A shard key depends on the owner and on the prefix."""
    a, b = owners
    found = {
        shard_key("followers", a, ""),
        shard_key("followers", b, ""),
        shard_key("followers", a, "0"),
        shard_key("followers", a, "1"),
        shard_key("followers", a, "01"),
        shard_key("followers", a, "10"),
    }
    assert len(found) == 6
    assert presence_key(a) != presence_key(b)


@given(key=keys)
def test_member_path_is_the_first_32_bits_of_sha256(key: bytes) -> None:
    """member_path is 32 characters of '0'/'1': the leading bits of sha256(key)."""
    path = member_path(key)
    assert len(path) == MAX_SHARD_DEPTH == 32
    assert set(path) <= {"0", "1"}
    expected = format(int.from_bytes(hashlib.sha256(key).digest()[:4], "big"), "032b")
    assert path == expected
    assert member_path(key) == path


def test_member_paths_spread_over_both_halves() -> None:
    """Members land in both children of the root shard."""
    firsts = {member_path(bytes([i]) * 32)[0] for i in range(32)}
    assert firsts == {"0", "1"}


# check_value: what a storage node and a reader accept


def authentic_values() -> list[RegistryValue]:
    member = MEMBERS[0]
    deep = member_path(member.public_key)[:5]
    return [
        make_claim(ALICE, "alice", seq=3),
        make_presence(ALICE, seq=9),
        shard_value([]),
        shard_value([follows_owner(m) for m in MEMBERS]),
        shard_value([follows_owner(member)], prefix=deep),
        shard_value(
            [owner_follows(k) for k in MEMBER_KEYS],
            relation="following",
        ),
        shard_value(
            [owner_follows(member.public_key, following=False)],
            relation="following",
            prefix=deep,
        ),
    ]


@pytest.mark.parametrize("value", authentic_values())
def test_check_value_accepts_authentic_values_under_their_key(
    value: RegistryValue,
) -> None:
    """A signed claim, presence or well-formed shard passes under its own key."""
    check_value(home(value), value, now_ms=NOW_MS)


@settings(max_examples=30)
@given(claim=claims)
def test_check_value_accepts_every_signed_claim(claim: pt.UsernameClaim) -> None:
    """Any signed claim passes under its name's key (checked by a clock as
    far as its seq) and fails under another."""
    value = RegistryValue(claim=claim)
    check_value(claim_key(claim.username), value, now_ms=claim.seq)
    with pytest.raises(pt.InvalidRecord, match="wrong key"):
        check_value(claim_key(claim.username + "!"), value, now_ms=claim.seq)


@settings(max_examples=30)
@given(presence=presences)
def test_check_value_accepts_every_signed_presence(presence: pt.Presence) -> None:
    """Any signed presence passes under its key's presence key (checked by a
    clock as far as its seq), not elsewhere."""
    value = RegistryValue(presence=presence)
    check_value(presence_key(presence.public_key), value, now_ms=presence.seq)
    with pytest.raises(pt.InvalidRecord, match="wrong key"):
        check_value(presence_key(MALLORY.public_key), value, now_ms=presence.seq)


@pytest.mark.parametrize("kind", ["claim", "presence"])
def test_check_value_refuses_a_seq_far_ahead_of_the_clock(kind: str) -> None:
    """A claim or presence whose seq runs more than MAX_SEQ_AHEAD_MS past the
    checker's clock is refused (nobody may push versions towards 2**63, where
    the owner could never publish a newer one); one just within passes."""
    limit = NOW_MS + MAX_SEQ_AHEAD_MS
    for seq, ok in [(limit, True), (limit + 1, False), (2**63 - 1, False)]:
        if kind == "claim":
            value = make_claim(ALICE, "alice", seq=seq)
        else:
            value = make_presence(ALICE, seq)
        if ok:
            check_value(home(value), value, now_ms=NOW_MS)
        else:
            with pytest.raises(pt.InvalidRecord, match="far ahead"):
                check_value(home(value), value, now_ms=NOW_MS)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (make_claim(ALICE, "alice"), claim_key("bob")),
        (make_claim(ALICE, "alice"), presence_key(ALICE.public_key)),
        (make_presence(ALICE, 1), presence_key(MALLORY.public_key)),
        (make_presence(ALICE, 1), claim_key("alice")),
        (shard_value([]), shard_key("followers", OWNER.public_key, "0")),
        (shard_value([]), shard_key("following", OWNER.public_key, "")),
        (shard_value([]), shard_key("followers", MALLORY.public_key, "")),
    ],
    ids=[
        "claim-other-name",
        "claim-presence-key",
        "presence-other-key",
        "presence-claim-key",
        "shard-other-prefix",
        "shard-other-relation",
        "shard-other-owner",
    ],
)
def test_check_value_refuses_a_value_under_another_key(
    value: RegistryValue, key: bytes
) -> None:
    """A valid value stored under a key that is not its own is refused."""
    with pytest.raises(pt.InvalidRecord, match="wrong key"):
        check_value(key, value, now_ms=NOW_MS)


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 4},
        {"sealed_key": b"other"},
        {"public_key": MALLORY.public_key},
        {"withdrawn": True},
        {"signature": bytes(64)},
    ],
    ids=["seq", "sealed_key", "public_key", "withdrawn", "signature"],
)
def test_check_value_refuses_a_tampered_claim(change: dict[str, object]) -> None:
    """Changing any field of a claim breaks its signature."""
    claim = make_claim(ALICE, "alice", seq=3).claim
    assert claim is not None
    value = RegistryValue(claim=attrs.evolve(claim, **change))  # type: ignore[arg-type]
    with pytest.raises(pt.InvalidSignature):
        check_value(claim_key("alice"), value, now_ms=NOW_MS)


def test_check_value_refuses_a_claim_hijacked_with_a_valid_signature() -> None:
    """Mallory cannot reuse Alice's signature on a claim naming Mallory's key."""
    theirs = pt.UsernameClaim.create(MALLORY, "alice", b"s", 3)
    ours = make_claim(ALICE, "alice", seq=3).claim
    assert ours is not None
    forged = attrs.evolve(theirs, signature=ours.signature)
    with pytest.raises(pt.InvalidSignature):
        check_value(claim_key("alice"), RegistryValue(claim=forged), now_ms=NOW_MS)


@pytest.mark.parametrize(
    "change",
    [
        {"host": "evil.example"},
        {"port": 4001},
        {"online": False},
        {"expires_ms": 1},
        {"seq": 10},
        {"signature": bytes(64)},
    ],
    ids=["host", "port", "online", "expires_ms", "seq", "signature"],
)
def test_check_value_refuses_a_tampered_presence(change: dict[str, object]) -> None:
    """Changing any field of a presence breaks its signature."""
    presence = make_presence(ALICE, 9).presence
    assert presence is not None
    value = RegistryValue(presence=attrs.evolve(presence, **change))  # type: ignore[arg-type]
    with pytest.raises(pt.InvalidSignature):
        check_value(presence_key(ALICE.public_key), value, now_ms=NOW_MS)


@pytest.mark.parametrize("relation", ["followers", "following"])
def test_check_value_refuses_an_entry_of_another_owners_set(relation: str) -> None:
    """A shard may only hold entries of its owner's set."""
    if relation == "followers":  # MEMBERS[0] follows ALICE, not OWNER
        stray = follows_owner(MEMBERS[0], owner=ALICE)
    else:  # ALICE follows MEMBERS[0]: that is ALICE's following set
        stray = pt.FollowEntry.create(
            ALICE,
            follower="alice",
            followee="member",
            followee_key=MEMBER_KEYS[0],
            following=True,
            timestamp=at(1),
        )
    value = shard_value([stray], relation=relation)
    with pytest.raises(pt.InvalidRecord, match="another user's set"):
        check_value(home(value), value, now_ms=NOW_MS)


@pytest.mark.parametrize("relation", ["followers", "following"])
def test_check_value_refuses_an_entry_in_the_wrong_shard(relation: str) -> None:
    """An entry must sit in a shard whose prefix lies on its member's path."""
    member = MEMBERS[0]
    if relation == "followers":
        entry = follows_owner(member)
    else:
        entry = owner_follows(member.public_key)
    value = shard_value(
        [entry], relation=relation, prefix=other_prefix(member.public_key)
    )
    with pytest.raises(pt.InvalidRecord, match="wrong shard"):
        check_value(home(value), value, now_ms=NOW_MS)
    deep = member_path(member.public_key)
    flipped = deep[:-1] + ("1" if deep[-1] == "0" else "0")
    value = shard_value([entry], relation=relation, prefix=flipped)
    with pytest.raises(pt.InvalidRecord, match="wrong shard"):
        check_value(home(value), value, now_ms=NOW_MS)


@pytest.mark.parametrize("relation", ["followers", "following"])
def test_check_value_refuses_two_entries_for_one_member(relation: str) -> None:
    """A shard holds at most one entry per member, even if both are signed."""
    member = MEMBERS[0]
    if relation == "followers":
        pair = [follows_owner(member, ms=1), follows_owner(member, ms=2)]
    else:
        pair = [
            owner_follows(member.public_key, ms=1),
            owner_follows(member.public_key, following=False, ms=2),
        ]
    value = shard_value(pair, relation=relation)
    with pytest.raises(pt.InvalidRecord, match="two entries"):
        check_value(home(value), value, now_ms=NOW_MS)


@pytest.mark.parametrize(
    "change",
    [
        {"following": False},
        {"timestamp": at(999)},
        {"follower": "someone"},
        {"followee": "someone"},
        {"signature": bytes(64)},
    ],
    ids=["following", "timestamp", "follower", "followee", "signature"],
)
def test_check_value_refuses_a_forged_entry(change: dict[str, object]) -> None:
    """An entry whose signature does not cover its content is refused."""
    genuine = [follows_owner(m) for m in MEMBERS]
    genuine[2] = attrs.evolve(genuine[2], **change)  # type: ignore[arg-type]
    value = shard_value(genuine)
    with pytest.raises(pt.InvalidSignature):
        check_value(home(value), value, now_ms=NOW_MS)


def test_check_value_refuses_an_entry_signed_by_someone_else() -> None:
    """Mallory cannot put a follow in a member's name: the member must sign it."""
    real = follows_owner(MEMBERS[0])
    by_mallory = follows_owner(MALLORY)
    forged = attrs.evolve(by_mallory, follower_key=real.follower_key)
    value = shard_value([forged])
    with pytest.raises(pt.InvalidSignature):
        check_value(home(value), value, now_ms=NOW_MS)


# merge: claims and presences


def test_merge_stores_a_first_claim_or_presence() -> None:
    """With nothing held, a claim or presence is stored as is."""
    for value in (make_claim(ALICE), make_presence(ALICE, 3)):
        assert merge(None, value, capacity=4) == (value, Outcome.STORED, [])


def test_first_claim_of_a_name_wins() -> None:
    """Another key's claim of a held name is TAKEN, whatever its seq."""
    held = make_claim(ALICE, "alice", seq=5)
    for seq in (0, 5, 6, 2**63 - 1):
        other = make_claim(MALLORY, "alice", seq=seq)
        assert merge(held, other, capacity=4) == (held, Outcome.TAKEN, [])


def test_a_withdrawn_claim_gives_the_name_to_any_key() -> None:
    """Once its key withdrew it (with a higher seq), a claim yields to any
    other key's claim; an older seq of the withdrawn key is still stale."""
    held = make_claim(ALICE, "alice", seq=0)
    withdrawal = make_claim(ALICE, "alice", seq=1, sealed=b"", withdrawn=True)
    assert merge(held, withdrawal, capacity=4) == (withdrawal, Outcome.STORED, [])
    assert merge(withdrawal, held, capacity=4) == (withdrawal, Outcome.STALE, [])
    other = make_claim(MALLORY, "alice", seq=0)
    assert merge(withdrawal, other, capacity=4) == (other, Outcome.STORED, [])
    assert merge(other, withdrawal, capacity=4) == (other, Outcome.TAKEN, [])


def test_owner_replaces_its_claim_with_a_higher_seq() -> None:
    """The same key's claim with a higher seq replaces the held one."""
    held = make_claim(ALICE, "alice", seq=5, sealed=b"old")
    newer = make_claim(ALICE, "alice", seq=6, sealed=b"new")
    assert merge(held, newer, capacity=4) == (newer, Outcome.STORED, [])


@pytest.mark.parametrize("seq", [4, 5])
def test_older_or_rival_claim_of_the_owner_is_stale(seq: int) -> None:
    """A lower seq, or the same seq with other content, leaves the held claim."""
    held = make_claim(ALICE, "alice", seq=5, sealed=b"held")
    older = make_claim(ALICE, "alice", seq=seq, sealed=b"other")
    assert merge(held, older, capacity=4) == (held, Outcome.STALE, [])


def test_identical_restore_is_stored() -> None:
    """Storing exactly what is held again reports STORED and keeps it."""
    for held in (make_claim(ALICE, seq=2), make_presence(ALICE, 2)):
        again = attrs.evolve(held)
        kept, outcome, refused = merge(held, again, capacity=4)
        assert (kept, outcome, refused) == (held, Outcome.STORED, [])


def test_newer_presence_wins() -> None:
    """A presence with a higher seq replaces the held one."""
    held = make_presence(ALICE, 5, port=1)
    newer = make_presence(ALICE, 6, port=2)
    assert merge(held, newer, capacity=4) == (newer, Outcome.STORED, [])


@pytest.mark.parametrize("seq", [0, 4, 5])
def test_older_presence_is_stale(seq: int) -> None:
    """A presence with a lower (or equal but different) seq is STALE."""
    held = make_presence(ALICE, 5, port=1)
    older = make_presence(ALICE, seq, port=2)
    assert merge(held, older, capacity=4) == (held, Outcome.STALE, [])


# merge: shards


def test_shard_merge_is_last_writer_wins_per_member() -> None:
    """Each member keeps its newest entry, from whichever side it came."""
    a, b, c = MEMBERS[:3]
    held = shard_value([follows_owner(a, ms=5), follows_owner(b, ms=5)])
    incoming = shard_value(
        [
            follows_owner(a, following=False, ms=6),  # newer: wins
            follows_owner(b, following=False, ms=4),  # older: loses
            follows_owner(c, ms=1),  # new member
        ]
    )
    kept, outcome, refused = merge(held, incoming, capacity=10)
    assert outcome is Outcome.STORED
    assert refused == []
    assert kept.shard is not None
    by_member = {e.follower_key: e for e in kept.shard.entries}
    assert by_member == {
        a.public_key: follows_owner(a, following=False, ms=6),
        b.public_key: follows_owner(b, ms=5),
        c.public_key: follows_owner(c, ms=1),
    }
    check_value(home(kept), kept, now_ms=NOW_MS)


def test_shard_merge_with_nothing_held_applies_capacity() -> None:
    """A first shard keeps `capacity` members and refuses the rest by index."""
    entries = [follows_owner(m) for m in MEMBERS]
    kept, outcome, refused = merge(None, shard_value(entries), capacity=3)
    assert outcome is Outcome.STORED
    assert refused == [3]
    assert kept.shard is not None
    assert set(kept.shard.entries) == set(entries[:3])


def test_full_shard_refuses_new_members_but_updates_held_ones() -> None:
    """A full shard refuses new members (their indices) and updates its own."""
    a, b, c, d = MEMBERS
    held = shard_value([follows_owner(a, ms=1), follows_owner(b, ms=1)])
    incoming = shard_value(
        [
            follows_owner(c),
            follows_owner(b, following=False, ms=2),
            follows_owner(d),
            follows_owner(a, following=False, ms=0),
        ]
    )
    kept, outcome, refused = merge(held, incoming, capacity=2)
    assert outcome is Outcome.STORED
    assert refused == [0, 2]
    assert kept.shard is not None
    assert set(kept.shard.entries) == {
        follows_owner(a, ms=1),
        follows_owner(b, following=False, ms=2),
    }


def test_shard_merge_keeps_the_shard_identity() -> None:
    """The merged shard keeps the relation, owner and prefix of its key."""
    member = MEMBERS[0]
    prefix = member_path(member.public_key)[:3]
    held = shard_value([], relation="following", prefix=prefix)
    incoming = shard_value(
        [owner_follows(member.public_key)], relation="following", prefix=prefix
    )
    kept, _, _ = merge(held, incoming, capacity=5)
    assert home(kept) == home(held)
    check_value(home(held), kept, now_ms=NOW_MS)


# merge_entries: properties

small_timestamps = st.builds(
    pt.HybridTimestamp,
    physical_ms=st.integers(0, 3),
    logical=st.integers(0, 1),
)


def entries_of(relation: str) -> st.SearchStrategy[pt.FollowEntry]:
    """Signed entries of OWNER's set, with few members and many timestamp ties."""
    if relation == "followers":
        return st.builds(
            pt.FollowEntry.create,
            identity=st.sampled_from(MEMBERS),
            follower=st.sampled_from(["amy", "ben"]),
            followee=st.just("owner"),
            followee_key=st.just(OWNER.public_key),
            following=st.booleans(),
            timestamp=small_timestamps,
        )
    return st.builds(
        pt.FollowEntry.create,
        identity=st.just(OWNER),
        follower=st.just("owner"),
        followee=st.sampled_from(["amy", "ben"]),
        followee_key=st.sampled_from(MEMBER_KEYS),
        following=st.booleans(),
        timestamp=small_timestamps,
    )


relations = st.sampled_from(["followers", "following"])


@st.composite
def relation_and_lists(
    draw: st.DrawFn, count: int
) -> tuple[str, list[list[pt.FollowEntry]]]:
    relation = draw(relations)
    lists = [draw(st.lists(entries_of(relation), max_size=6)) for _ in range(count)]
    return relation, lists


def merged(
    relation: str, *batches: Sequence[pt.FollowEntry]
) -> tuple[pt.FollowEntry, ...]:
    held: tuple[pt.FollowEntry, ...] = ()
    for batch in batches:
        held, refused = merge_entries(relation, held, batch)
        assert refused == []
    return held


@settings(max_examples=60)
@given(case=relation_and_lists(1))
def test_merge_entries_keeps_the_winner_of_each_member(
    case: tuple[str, list[list[pt.FollowEntry]]],
) -> None:
    """Without capacity, the result holds exactly each member's last writer."""
    relation, (entries,) = case
    result = merged(relation, entries)
    expected: dict[bytes, list[pt.FollowEntry]] = {}
    for entry in entries:
        expected.setdefault(member_of(relation, entry), []).append(entry)
    assert {member_of(relation, e): e for e in result} == {
        m: winner(es) for m, es in expected.items()
    }
    assert len(result) == len(expected)


@settings(max_examples=60)
@given(case=relation_and_lists(2), data=st.data())
def test_merge_entries_ignores_order_of_arrival(
    case: tuple[str, list[list[pt.FollowEntry]]], data: st.DataObject
) -> None:
    """Merging is commutative: any arrival order and batching gives one result."""
    relation, (a, b) = case
    everything = merged(relation, a + b)
    assert merged(relation, a, b) == everything
    assert merged(relation, b, a) == everything
    shuffled = data.draw(st.permutations(a + b))
    assert merged(relation, shuffled) == everything
    one_by_one = [[e] for e in reversed(shuffled)]
    assert merged(relation, *one_by_one) == everything


@settings(max_examples=60)
@given(case=relation_and_lists(1))
def test_merge_entries_is_idempotent(
    case: tuple[str, list[list[pt.FollowEntry]]],
) -> None:
    """Merging what is held, or the same entries again, changes nothing."""
    relation, (entries,) = case
    once = merged(relation, entries)
    assert merge_entries(relation, once, once) == (once, [])
    assert merge_entries(relation, once, entries) == (once, [])
    assert merge_entries(relation, once, ()) == (once, [])


@settings(max_examples=60)
@given(
    case=relation_and_lists(1),
    follow_at=small_timestamps,
    later=st.integers(0, 2),
    data=st.data(),
)
def test_newer_unfollow_always_wins(
    case: tuple[str, list[list[pt.FollowEntry]]],
    follow_at: pt.HybridTimestamp,
    later: int,
    data: st.DataObject,
) -> None:
    """An unfollow newer than (or tied with) a follow wins in any arrival order."""
    relation, (others,) = case
    identity = MEMBERS[0]
    member = identity.public_key
    unfollow_at = at(follow_at.physical_ms + later, follow_at.logical)
    if relation == "followers":
        follow = pt.FollowEntry.create(
            identity,
            follower="amy",
            followee="owner",
            followee_key=OWNER.public_key,
            following=True,
            timestamp=follow_at,
        )
        unfollow = pt.FollowEntry.create(
            identity,
            follower="amy",
            followee="owner",
            followee_key=OWNER.public_key,
            following=False,
            timestamp=unfollow_at,
        )
    else:
        follow = pt.FollowEntry.create(
            OWNER,
            follower="owner",
            followee="amy",
            followee_key=member,
            following=True,
            timestamp=follow_at,
        )
        unfollow = pt.FollowEntry.create(
            OWNER,
            follower="owner",
            followee="amy",
            followee_key=member,
            following=False,
            timestamp=unfollow_at,
        )
    rest = [e for e in others if member_of(relation, e) != member]
    arrivals = data.draw(st.permutations([follow, unfollow, *rest]))
    split = data.draw(st.integers(0, len(arrivals)))
    result = merged(relation, arrivals[:split], arrivals[split:])
    assert [e for e in result if member_of(relation, e) == member] == [unfollow]


@settings(max_examples=60)
@given(
    case=relation_and_lists(4),
    limit=st.integers(1, 3),
)
def test_capacity_bounds_the_held_set(
    case: tuple[str, list[list[pt.FollowEntry]]], limit: int
) -> None:
    """With a capacity, a shard never holds more members and never drops one."""
    relation, batches = case
    held: tuple[pt.FollowEntry, ...] = ()
    for batch in batches:
        before = {member_of(relation, e) for e in held}
        held, refused = merge_entries(relation, held, batch, limit)
        after = {member_of(relation, e) for e in held}
        assert len(held) == len(after) <= limit
        assert before <= after
        for index, entry in enumerate(batch):
            member = member_of(relation, entry)
            if index in refused:
                assert member not in after
                assert len(after) == limit
            else:
                assert member in after
        assert refused == sorted(set(refused))


# Shard capacity under each serializer


def worst_entry(number: int) -> pt.FollowEntry:
    """The largest possible encoding of an entry (unsigned: size is what counts)."""
    return pt.FollowEntry(
        follower="x" * pt.MAX_USERNAME_CHARS,
        follower_key=number.to_bytes(32, "big"),
        followee="y" * pt.MAX_USERNAME_CHARS,
        followee_key=bytes(32),
        following=False,
        timestamp=MAX_TIMESTAMP,
        signature=bytes(range(64)),
    )


def worst_shard(count: int) -> RegistryValue:
    return shard_value(
        [worst_entry(i) for i in range(count)],
        relation="followers",
        owner_key=bytes(32),
        prefix="1" * MAX_SHARD_DEPTH,
    )


@serializers
def test_a_full_shard_of_worst_case_entries_fits(serializer: pt.Serializer) -> None:
    """`shard_capacity` worst-case entries in the deepest shard fit in a value."""
    limit = shard_capacity(serializer)
    assert limit >= 8
    assert len(serializer.encode(worst_shard(limit))) <= MAX_VALUE_SIZE


@serializers
def test_shard_capacity_wastes_less_than_two_entries(serializer: pt.Serializer) -> None:
    """Two worst-case entries more than the capacity would not fit in a value."""
    limit = shard_capacity(serializer)
    assert len(serializer.encode(worst_shard(limit + 2))) > MAX_VALUE_SIZE


@serializers
def test_a_full_signed_shard_is_stored_and_refuses_one_more(
    serializer: pt.Serializer,
) -> None:
    """A storage node takes a full shard of real entries, then refuses a new member."""
    limit = shard_capacity(serializer)
    followers = [pt.Identity.generate() for _ in range(limit + 1)]
    entries = [
        pt.FollowEntry.create(
            f,
            follower="f" * 31 + "x",
            followee="o" * 32,
            followee_key=OWNER.public_key,
            following=False,
            timestamp=MAX_TIMESTAMP,
        )
        for f in followers
    ]
    storage = RecordStorage(serializer, limit)
    full = shard_value(entries[:limit])
    key = home(full)
    raw = serializer.encode(full)
    assert len(raw) <= MAX_VALUE_SIZE
    assert summary(storage.offer(key, raw)) == (Outcome.STORED, [])
    one_more = shard_value(entries[limit:])
    assert summary(storage.offer(key, serializer.encode(one_more))) == (
        Outcome.STORED,
        [0],
    )
    held = storage.value(key)
    assert held is not None
    assert held.shard is not None
    assert set(held.shard.entries) == set(entries[:limit])
    stored = storage.get(key)
    assert stored is not None
    assert len(stored) <= MAX_VALUE_SIZE


# RecordStorage


class FakeClock:
    """Stands in for the `time` module in `_dht.storage`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_dht_storage, "time", fake)
    return fake


def summary(result: StoreResult) -> tuple[Outcome, object]:
    """An offer's outcome and its detail: the reason if invalid or refused,
    the `seq` of the record held when stale or taken (its proof), else the
    refused entries."""
    if result.outcome in (Outcome.INVALID, Outcome.REFUSED):
        return (result.outcome, result.reason)
    if result.held is not None:
        held = CBOR.decode(result.held, RegistryValue)
        record = held.claim or held.presence
        assert record is not None
        return (result.outcome, record.seq)
    return (result.outcome, list(result.refused))


def offer(storage: RecordStorage, value: RegistryValue) -> tuple[Outcome, object]:
    return summary(storage.offer(home(value), CBOR.encode(value)))


@serializers
@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff",
        b"garbage that is not an encoding",
        cbor2.dumps({"claim": None, "presence": None, "shard": None}),
        cbor2.dumps([1, 2, 3]),
        b'{"claim":null,"presence":null,"shard":null}',
        b"[]",
    ],
)
def test_garbage_is_invalid_and_not_stored(
    serializer: pt.Serializer, raw: bytes
) -> None:
    """Bytes that are not a registry value are refused and nothing is stored."""
    storage = RecordStorage(serializer, 4)
    outcome, detail = summary(storage.offer(claim_key("alice"), raw))
    assert outcome is Outcome.INVALID
    assert isinstance(detail, str)
    assert len(storage) == 0
    assert storage.get(claim_key("alice")) is None


@serializers
@settings(max_examples=100)
@given(raw=st.binary(max_size=200))
def test_random_bytes_are_invalid(serializer: pt.Serializer, raw: bytes) -> None:
    """Random bytes never raise out of `offer`: they are INVALID, nothing stored."""
    storage = RecordStorage(serializer, 4)
    assert storage.offer(presence_key(ALICE.public_key), raw).outcome is Outcome.INVALID
    assert len(storage) == 0


FLIP_TARGETS = [
    make_claim(ALICE, "alice", seq=2, sealed=b"sealed key"),
    make_presence(ALICE, 3),
    shard_value([follows_owner(m) for m in MEMBERS[:2]]),
]


@serializers
@settings(max_examples=150)
@given(
    value=st.sampled_from(FLIP_TARGETS),
    where=st.floats(0, 1, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_a_flipped_byte_never_stores_a_different_value(
    serializer: pt.Serializer, value: RegistryValue, where: float, mask: int
) -> None:
    """A corrupted encoding is refused, or decodes to exactly the original value."""
    raw = bytearray(serializer.encode(value))
    raw[int(where * len(raw))] ^= mask
    storage = RecordStorage(serializer, 4)
    outcome, _ = summary(storage.offer(home(value), bytes(raw)))
    if outcome is Outcome.INVALID:
        assert len(storage) == 0
    else:
        assert storage.value(home(value)) == value


@serializers
@settings(max_examples=30)
@given(record=st.one_of(claims, presences))
def test_signed_records_are_stored_and_read_back(
    serializer: pt.Serializer, record: pt.UsernameClaim | pt.Presence
) -> None:
    """An authentic claim or presence is STORED and read back byte for byte."""
    if isinstance(record, pt.UsernameClaim):
        value = RegistryValue(claim=record)
    else:
        value = RegistryValue(presence=record)
    storage = RecordStorage(serializer, 4)
    raw = serializer.encode(value)
    stored = storage.offer(home(value), raw, now_ms=record.seq)
    assert summary(stored) == (Outcome.STORED, [])
    assert storage.value(home(value)) == value
    assert storage[home(value)] == raw
    assert storage.get(home(value)) == raw


def test_oversized_values_are_refused() -> None:
    """A value over MAX_VALUE_SIZE bytes is refused before it is decoded."""
    followers = [pt.Identity.generate() for _ in range(30)]
    value = shard_value(
        [follows_owner(f, name="n" * 32, ms=2**47 - 1) for f in followers]
    )
    raw = CBOR.encode(value)
    assert len(raw) > MAX_VALUE_SIZE
    check_value(home(value), value, now_ms=NOW_MS)  # authentic, just too big
    storage = RecordStorage(CBOR, 100)
    outcome, detail = summary(storage.offer(home(value), raw))
    assert outcome is Outcome.INVALID
    assert "too large" in str(detail)
    assert len(storage) == 0
    padded = b"\x00" * (MAX_VALUE_SIZE + 1)
    assert storage.offer(home(value), padded).outcome is Outcome.INVALID


def test_value_under_the_wrong_key_is_invalid() -> None:
    """A storage node refuses an authentic value offered under another key."""
    storage = RecordStorage(CBOR, 4)
    value = make_claim(ALICE, "alice")
    outcome, detail = summary(storage.offer(claim_key("bob"), CBOR.encode(value)))
    assert outcome is Outcome.INVALID
    assert "wrong key" in str(detail)
    assert len(storage) == 0


def test_forged_values_are_invalid_and_keep_what_is_held() -> None:
    """A forged newer record is refused and the held one stays."""
    storage = RecordStorage(CBOR, 4)
    held = make_presence(ALICE, 5)
    assert offer(storage, held) == (Outcome.STORED, [])
    assert held.presence is not None
    forged = RegistryValue(presence=attrs.evolve(held.presence, seq=6, port=666))
    assert offer(storage, forged)[0] is Outcome.INVALID
    assert storage.value(home(held)) == held


def test_stale_presence_reports_the_held_seq() -> None:
    """Refusing an older presence answers STALE with the seq it holds."""
    storage = RecordStorage(CBOR, 4)
    held = make_presence(ALICE, 7)
    assert offer(storage, held) == (Outcome.STORED, [])
    assert offer(storage, make_presence(ALICE, 3)) == (Outcome.STALE, 7)
    assert storage.value(home(held)) == held
    newer = make_presence(ALICE, 8)
    assert offer(storage, newer) == (Outcome.STORED, [])
    assert storage.value(home(held)) == newer


def test_stale_claim_reports_the_held_seq_and_taken_keeps_the_claim() -> None:
    """An older claim is STALE with the held seq; a rival key's claim is TAKEN."""
    storage = RecordStorage(CBOR, 4)
    held = make_claim(ALICE, "alice", seq=4)
    assert offer(storage, held) == (Outcome.STORED, [])
    assert offer(storage, make_claim(ALICE, "alice", seq=1)) == (Outcome.STALE, 4)
    assert offer(storage, make_claim(MALLORY, "alice", seq=9)) == (Outcome.TAKEN, 4)
    assert storage.value(claim_key("alice")) == held


def test_refused_shard_entries_are_reported() -> None:
    """A shard offer beyond capacity answers the indices of the refused entries."""
    storage = RecordStorage(CBOR, 2)
    a, b, c, d = MEMBERS
    first = shard_value([follows_owner(a), follows_owner(b), follows_owner(c)])
    assert offer(storage, first) == (Outcome.STORED, [2])
    second = shard_value([follows_owner(d), follows_owner(a, following=False, ms=5)])
    assert offer(storage, second) == (Outcome.STORED, [0])
    held = storage.value(home(first))
    assert held is not None
    assert held.shard is not None
    assert set(held.shard.entries) == {
        follows_owner(a, following=False, ms=5),
        follows_owner(b),
    }


@serializers
def test_storage_keeps_the_encoding_of_the_merged_value(
    serializer: pt.Serializer,
) -> None:
    """What `get` and `[]` return is the encoding of the merged value."""
    storage = RecordStorage(serializer, 8)
    a, b = MEMBERS[:2]
    left, right = shard_value([follows_owner(a)]), shard_value([follows_owner(b)])
    key = home(left)
    assert summary(storage.offer(key, serializer.encode(left))) == (Outcome.STORED, [])
    assert summary(storage.offer(key, serializer.encode(right))) == (Outcome.STORED, [])
    both = shard_value(merged("followers", [follows_owner(a), follows_owner(b)]))
    assert storage.value(key) == both
    assert storage[key] == storage.get(key) == serializer.encode(both)
    assert serializer.decode(storage[key], RegistryValue) == both


def test_offer_value_merges_an_already_checked_value() -> None:
    """`offer_value` applies the merge rules without decoding."""
    storage = RecordStorage(CBOR, 4)
    value = make_presence(ALICE, 2)
    assert summary(storage.offer_value(home(value), value)) == (Outcome.STORED, [])
    assert summary(storage.offer_value(home(value), make_presence(ALICE, 1))) == (
        Outcome.STALE,
        2,
    )
    assert storage.get(home(value)) == CBOR.encode(value)


def test_get_getitem_and_missing_keys() -> None:
    """`get` returns the default and `[]` raises KeyError for a missing key."""
    storage = RecordStorage(CBOR, 4)
    missing = claim_key("nobody")
    assert storage.get(missing) is None
    assert storage.get(missing, b"default") == b"default"
    assert storage.value(missing) is None
    with pytest.raises(KeyError):
        storage[missing]


def test_setitem_goes_through_validation() -> None:
    """kademlia's `storage[key] = raw` stores valid values and drops garbage."""
    storage = RecordStorage(CBOR, 4)
    value = make_claim(ALICE, "alice")
    storage[claim_key("alice")] = b"garbage"
    assert len(storage) == 0
    storage[claim_key("alice")] = CBOR.encode(value)
    assert storage.value(claim_key("alice")) == value
    storage[claim_key("alice")] = CBOR.encode(make_claim(MALLORY, "alice", seq=9))
    assert storage.value(claim_key("alice")) == value


def test_iteration_lists_every_key_with_its_bytes() -> None:
    """Iterating yields each (key, encoded value) pair once, in write order."""
    storage = RecordStorage(CBOR, 4)
    values = [make_claim(ALICE, "alice"), make_presence(ALICE, 1), shard_value([])]
    for value in values:
        offer(storage, value)
    assert len(storage) == 3
    assert list(storage) == [(home(v), CBOR.encode(v)) for v in values]


def test_iter_older_than_lists_keys_not_written_recently(clock: FakeClock) -> None:
    """`iter_older_than` lists keys whose value has not changed for that long."""
    storage = RecordStorage(CBOR, 4)
    old, fresh = make_presence(ALICE, 1), make_claim(ALICE, "alice")
    offer(storage, old)
    clock.now += 100
    offer(storage, fresh)
    clock.now += 3550
    assert storage.iter_older_than(3600) == [(home(old), CBOR.encode(old))]
    assert len(storage.iter_older_than(0)) == 2
    assert storage.iter_older_than(10_000) == []
    newer = make_presence(ALICE, 2)
    offer(storage, newer)  # a change makes the key young again
    assert storage.iter_older_than(3600) == []
    clock.now += 100
    assert storage.iter_older_than(3600) == [(home(fresh), CBOR.encode(fresh))]


def test_stale_offers_do_not_make_a_key_young(clock: FakeClock) -> None:
    """A refused (stale or invalid) offer leaves the key's age alone."""
    storage = RecordStorage(CBOR, 4)
    held = make_presence(ALICE, 5)
    offer(storage, held)
    clock.now += 4000
    offer(storage, make_presence(ALICE, 1))
    storage.offer(home(held), b"garbage")
    assert storage.iter_older_than(3600) == [(home(held), CBOR.encode(held))]


def test_identical_restore_makes_a_key_young(clock: FakeClock) -> None:
    """Receiving the same value again counts as a write for republishing."""
    storage = RecordStorage(CBOR, 4)
    held = make_presence(ALICE, 5)
    offer(storage, held)
    clock.now += 3000
    assert offer(storage, held) == (Outcome.STORED, [])
    clock.now += 1000
    assert storage.iter_older_than(3600) == []


def test_a_full_storage_evicts_the_heaviest_senders_oldest_key() -> None:
    """Past `max_bytes`, the least recently written key of the sender holding
    the most bytes is dropped: a sender filling the storage evicts its own
    keys first, not other senders'."""
    claims = {name: make_claim(ALICE, name) for name in "abcdef"}
    size = RecordStorage.cost(CBOR.encode(claims["a"]))
    storage = RecordStorage(CBOR, 4, max_bytes=4 * size, max_bytes_per_source=10**9)
    storage.offer(home(claims["a"]), CBOR.encode(claims["a"]), source="honest")
    for name in "bcd":  # the hog's first three, then it goes on
        storage.offer(home(claims[name]), CBOR.encode(claims[name]), source="hog")
    assert len(storage) == 4
    assert summary(
        storage.offer(home(claims["e"]), CBOR.encode(claims["e"]), source="hog")
    ) == (Outcome.STORED, [])
    assert storage.get(home(claims["b"])) is None  # the hog's oldest went
    assert storage.value(home(claims["a"])) == claims["a"]  # the honest one stayed
    assert storage.bytes_held <= storage.max_bytes
    storage.offer(claim_key("x"), b"garbage", source="hog")  # refused: evicts nothing
    assert {k for k, _ in storage} == {home(claims[n]) for n in "acde"}


def test_a_sender_over_its_quota_stores_no_new_keys() -> None:
    """A sender that stored `max_bytes_per_source` bytes of keys is refused
    new ones (REFUSED), while its keys still take newer versions and other
    senders are not affected."""
    first, second = make_presence(ALICE, 1), make_presence(MALLORY, 1)
    quota = RecordStorage.cost(CBOR.encode(first)) + 10
    storage = RecordStorage(CBOR, 4, max_bytes_per_source=quota)
    assert (
        storage.offer(home(first), CBOR.encode(first), source="s").outcome
        is Outcome.STORED
    )
    refused = storage.offer(home(second), CBOR.encode(second), source="s")
    assert (refused.outcome, refused.reason) == (
        Outcome.REFUSED,
        "sender over its quota",
    )
    newer = make_presence(ALICE, 2)
    assert (
        storage.offer(home(newer), CBOR.encode(newer), source="s").outcome
        is Outcome.STORED
    )
    assert (
        storage.offer(home(second), CBOR.encode(second), source="t").outcome
        is Outcome.STORED
    )
    assert storage.bytes_of("s") == RecordStorage.cost(CBOR.encode(newer))


def test_keys_between_finds_keys_by_number() -> None:
    """The sorted key index answers range queries (hand-over to newcomers)."""
    storage = RecordStorage(CBOR, 4)
    values = [make_claim(ALICE, name) for name in "abcdefgh"]
    for value in values:
        offer(storage, value)
    numbers = sorted(int.from_bytes(home(v)) for v in values)
    low, high = numbers[2], numbers[6]
    assert storage.keys_between(low, high) == [
        n.to_bytes(20, "big") for n in numbers[2:6]
    ]
    storage.forget(numbers[3].to_bytes(20, "big"))
    assert len(storage.keys_between(low, high)) == 3
    assert storage.keys_between(0, 2**160) == [
        k for k, _ in sorted(storage, key=lambda kv: kv[0])
    ]


def test_json_lone_surrogate_is_invalid_not_a_crash() -> None:
    """A JSON value with a lone surrogate in a string is INVALID, not an exception."""
    value = make_presence(ALICE, 1, host="h")
    raw = JSON.encode(value).replace(b'"host":"h"', b'"host":"\\ud800"')
    storage = RecordStorage(JSON, 4)
    outcome, _ = summary(storage.offer(home(value), raw))
    assert outcome is Outcome.INVALID
    assert len(storage) == 0
