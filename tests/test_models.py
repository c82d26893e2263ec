"""The data model: validation, signing, canonical encoding."""

from __future__ import annotations

import datetime

import attrs
import pytest
from hypothesis import given
from strategies import follow_entries, posts, timestamps

import p2ptimeline as pt

ALICE = pt.Identity.generate()
MALLORY = pt.Identity.generate()
T0 = pt.HybridTimestamp(physical_ms=1_700_000_000_000, logical=3)


def test_timestamps_order_by_physical_then_logical() -> None:
    """Timestamps compare by physical time, then by the logical counter."""
    a = pt.HybridTimestamp(physical_ms=10, logical=5)
    b = pt.HybridTimestamp(physical_ms=11, logical=0)
    c = pt.HybridTimestamp(physical_ms=11, logical=1)
    assert a < b < c
    assert sorted([c, a, b]) == [a, b, c]


def test_a_timestamp_reads_as_a_utc_datetime() -> None:
    """`HybridTimestamp.datetime` is the aware UTC time of `physical_ms`."""
    moment = T0.datetime
    assert moment == datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.UTC)
    assert moment.timestamp() * 1000 == T0.physical_ms
    later = pt.HybridTimestamp(physical_ms=T0.physical_ms + 1_500)
    assert later.datetime - moment == datetime.timedelta(seconds=1.5)


@given(timestamps, timestamps)
def test_packed_timestamps_keep_order(
    a: pt.HybridTimestamp, b: pt.HybridTimestamp
) -> None:
    """packed() is an order-preserving, invertible 63-bit encoding."""
    assert (a < b) == (a.packed() < b.packed())
    assert pt.HybridTimestamp.unpack(a.packed()) == a
    assert 0 <= a.packed() < 2**63


@pytest.mark.parametrize(
    "bad",
    [
        {"physical_ms": -1},
        {"physical_ms": 2**47},
        {"physical_ms": True},
        {"physical_ms": 1.5},
        {"physical_ms": 1, "logical": 2**16},
    ],
)
def test_timestamp_fields_are_checked(bad: dict[str, object]) -> None:
    """Out-of-range or mistyped timestamp fields are refused."""
    with pytest.raises((TypeError, ValueError)):
        pt.HybridTimestamp(**bad)  # type: ignore[arg-type]


def test_post_create_signs_and_verifies() -> None:
    """A created post verifies with its author's key and not with another."""
    post = pt.Post.create(ALICE, "alice", "hello", T0)
    post.verify(ALICE.public_key)
    with pytest.raises(pt.InvalidSignature):
        post.verify(MALLORY.public_key)


@pytest.mark.parametrize(
    "change",
    [
        {"text": "hellO"},
        {"author": "mallory"},
        {"timestamp": pt.HybridTimestamp(physical_ms=1)},
    ],
)
def test_tampered_post_fails_verification(change: dict[str, object]) -> None:
    """Changing any signed field of a post makes verification fail."""
    post = pt.Post.create(ALICE, "alice", "hello", T0)
    tampered = attrs.evolve(post, **change)
    with pytest.raises(pt.InvalidRecord):
        tampered.verify(ALICE.public_key)


def test_post_with_recomputed_id_but_old_signature_fails() -> None:
    """A forger who fixes up the id still lacks the signature."""
    post = pt.Post.create(ALICE, "alice", "hello", T0)
    forged = pt.Post.create(MALLORY, "alice", "evil", T0)
    spliced = attrs.evolve(forged, signature=post.signature)
    with pytest.raises(pt.InvalidSignature):
        spliced.verify(ALICE.public_key)


def test_post_id_is_hash_of_content() -> None:
    """Two posts differing only in text have different ids; same content, same id."""
    a = pt.Post.create(ALICE, "alice", "a", T0)
    b = pt.Post.create(ALICE, "alice", "b", T0)
    again = pt.Post.create(ALICE, "alice", "a", T0)
    assert a.id != b.id
    assert a.id == again.id  # Ed25519 is deterministic, so is the whole post
    assert a == again


def test_canonical_encoding_is_stable() -> None:
    """The signed payload of a post is fixed bytes: other implementations rely on it."""
    key = pt.Identity.from_private_bytes(bytes(range(32)))
    post = pt.Post.create(
        key, "alice", "hi", pt.HybridTimestamp(physical_ms=5, logical=1)
    )
    # CBOR of ["p2ptimeline/post/1", "alice", "hi", [5, 1]]
    assert post.signed_payload().hex() == (
        "847270327074696d656c696e652f706f73742f3165616c696365626869820501"
    )


@pytest.mark.parametrize(
    "name", ["", "Alice", "a" * 33, ".hidden", "-x", "white space", "émile", "a/b"]
)
def test_invalid_usernames_are_refused(name: str) -> None:
    """Usernames outside the allowed alphabet or length are refused everywhere."""
    assert not pt.check_username(name)
    with pytest.raises(ValueError, match="username"):
        pt.Post.create(ALICE, name, "x", T0)


@pytest.mark.parametrize("name", ["a", "alice", "bob_2", "x.y-z", "_", "a" * 32])
def test_valid_usernames(name: str) -> None:
    """Lowercase names with digits, _ . - are valid."""
    assert pt.check_username(name)


def test_post_text_limit() -> None:
    """Texts up to MAX_POST_CHARS are accepted, longer ones refused."""
    pt.Post.create(ALICE, "alice", "x" * pt.MAX_POST_CHARS, T0)
    with pytest.raises(ValueError, match="text"):
        pt.Post.create(ALICE, "alice", "x" * (pt.MAX_POST_CHARS + 1), T0)


def test_self_signed_records_verify_and_detect_tampering() -> None:
    """Claims and presence verify with their own key; tampering is detected."""
    claim = pt.UsernameClaim.create(ALICE, "alice", b"sealed", seq=1)
    claim.verify()
    with pytest.raises(pt.InvalidSignature):
        attrs.evolve(claim, public_key=MALLORY.public_key).verify()
    with pytest.raises(pt.InvalidSignature):
        attrs.evolve(claim, seq=2).verify()
    presence = pt.Presence.create(
        ALICE, host="127.0.0.1", port=9001, online=True, expires_ms=100, seq=7
    )
    presence.verify()
    assert presence.address == ("127.0.0.1", 9001)
    assert presence.is_online(99)
    assert not presence.is_online(100)
    with pytest.raises(pt.InvalidSignature):
        attrs.evolve(presence, port=9002).verify()


def test_records_of_different_kinds_never_share_a_payload() -> None:
    """Domain separation: a signature for one record type is useless for another."""
    entry = pt.FollowEntry.create(
        ALICE,
        follower="alice",
        followee="bob",
        followee_key=MALLORY.public_key,
        following=True,
        timestamp=T0,
    )
    post = pt.Post.create(ALICE, "alice", "bob", T0)
    assert entry.signed_payload() != post.signed_payload()
    assert entry.signed_payload()[:40].find(b"follow") >= 0


@given(follow_entries, follow_entries)
def test_follow_entry_supersedes_is_a_strict_order(
    a: pt.FollowEntry, b: pt.FollowEntry
) -> None:
    """For two distinct entries exactly one supersedes the other."""
    if a.signature != b.signature:
        assert a.supersedes(b) != b.supersedes(a)
    assert not a.supersedes(a)


def test_unfollow_wins_a_timestamp_tie() -> None:
    """An unfollow and a follow with the same timestamp resolve to the unfollow."""
    kwargs = {"follower": "alice", "followee": "bob", "timestamp": T0}
    follow = pt.FollowEntry.create(
        ALICE, followee_key=MALLORY.public_key, following=True, **kwargs
    )
    unfollow = pt.FollowEntry.create(
        ALICE, followee_key=MALLORY.public_key, following=False, **kwargs
    )
    assert unfollow.supersedes(follow)
    assert not follow.supersedes(unfollow)


@given(posts)
def test_every_generated_post_verifies(post: pt.Post) -> None:
    """Posts built by Post.create always verify (for their author's key)."""
    from strategies import IDENTITIES

    assert any(_verifies(post, identity.public_key) for identity in IDENTITIES)


def _verifies(post: pt.Post, key: bytes) -> bool:
    try:
        post.verify(key)
    except pt.InvalidSignature:
        return False
    return True
