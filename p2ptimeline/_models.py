"""The data model: posts, timestamps and the signed registry records.

Every class is a frozen `attrs` class whose validators enforce the shape of
each field, so a value that exists is well formed (whether it is *authentic*
is what `verify()` checks). What a signature covers is the record's canonical
encoding: deterministic CBOR of a list holding a per-type domain string and
the signed fields in declaration order. That encoding is fixed; it does not
depend on the pluggable `Serializer` used for transport and storage.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import Any, ClassVar, Literal, Self, TypeVar

import attrs
import cbor2

from ._errors import InvalidRecord
from ._identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify

__all__ = [
    "MAX_POST_CHARS",
    "MAX_USERNAME_CHARS",
    "FollowEntry",
    "HybridTimestamp",
    "Post",
    "Presence",
    "Relation",
    "UsernameClaim",
    "check_username",
]

MAX_USERNAME_CHARS = 32
"""Longest username allowed."""
MAX_POST_CHARS = 1000
"""Longest post text allowed, in characters."""
MAX_SEALED_KEY_SIZE = 256

Relation = Literal["followers", "following"]
"""One side of a user's follow graph: the users following them, or those
they follow (a follow set in the registry, a cached set of names in a store)."""
_USERNAME = re.compile(rf"[a-z0-9_][a-z0-9_.-]{{0,{MAX_USERNAME_CHARS - 1}}}")
_UNSIGNED = {"unsigned": True}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def check_username(name: str) -> bool:
    """Whether `name` is a valid username.

    Usernames are 1 to 32 characters of lowercase ASCII letters, digits,
    ``_``, ``.`` and ``-``, not starting with ``.`` or ``-``.
    """
    return isinstance(name, str) and _USERNAME.fullmatch(name) is not None


def username(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    """attrs validator: a valid username (see `check_username`)."""
    if not check_username(value):  # type: ignore[arg-type]
        raise ValueError(f"{attribute.name}: invalid username {value!r}")


def uint(bits: int) -> Any:
    """attrs validator: an int (not a bool) in [0, 2**bits)."""
    limit = 1 << bits

    def check(_: object, attribute: attrs.Attribute[int], value: object) -> None:
        if type(value) is not int or not 0 <= value < limit:
            raise ValueError(f"{attribute.name}: want an integer in [0, 2**{bits})")

    return check


def sized_bytes(size: int) -> Any:
    """attrs validator: exactly `size` bytes."""

    def check(_: object, attribute: attrs.Attribute[bytes], value: object) -> None:
        if type(value) is not bytes or len(value) != size:
            raise ValueError(f"{attribute.name}: want {size} bytes")

    return check


def _exact(kind: type) -> Any:
    """Like `attrs.validators.instance_of`, but refuses subclasses (bool for int)."""

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if type(value) is not kind:
            raise TypeError(f"{attribute.name}: want {kind.__name__}")

    return check


def _max_len(limit: int) -> Any:
    return attrs.validators.max_len(limit)


@attrs.frozen(kw_only=True, order=False)
class HybridTimestamp:
    """A hybrid logical clock timestamp (Kulkarni et al., 2014).

    Orders like ``(physical_ms, logical)``. `physical_ms` follows the
    (NTP-corrected) wall clock; `logical` breaks ties between events within
    one millisecond, so timestamps from one clock never repeat or go back.
    """

    physical_ms: int = attrs.field(validator=uint(47))
    """Milliseconds since the Unix epoch, as seen by the issuing clock."""
    logical: int = attrs.field(default=0, validator=uint(16))
    """Counter that orders events sharing `physical_ms`."""

    # Hand-written comparisons: timelines and merges compare timestamps a lot,
    # and these are several times faster than the generic ones attrs writes.
    def __lt__(self, other: HybridTimestamp) -> bool:
        return (self.physical_ms, self.logical) < (other.physical_ms, other.logical)

    def __le__(self, other: HybridTimestamp) -> bool:
        return (self.physical_ms, self.logical) <= (other.physical_ms, other.logical)

    def __gt__(self, other: HybridTimestamp) -> bool:
        return (self.physical_ms, self.logical) > (other.physical_ms, other.logical)

    def __ge__(self, other: HybridTimestamp) -> bool:
        return (self.physical_ms, self.logical) >= (other.physical_ms, other.logical)

    @property
    def datetime(self) -> datetime.datetime:
        """The wall-clock time of `physical_ms`, as an aware UTC datetime
        (to millisecond precision; `logical` is not part of it).

        Use ``timestamp.datetime.astimezone()`` for local time.
        """
        return _EPOCH + datetime.timedelta(milliseconds=self.physical_ms)

    def packed(self) -> int:
        """This timestamp as one 63-bit integer with the same order."""
        return self.physical_ms << 16 | self.logical

    @classmethod
    def unpack(cls, value: int) -> HybridTimestamp:
        """The inverse of `packed()`."""
        return cls(physical_ms=value >> 16, logical=value & 0xFFFF)


def _signature_field() -> Any:
    """An Ed25519 signature field, outside what it signs."""
    return attrs.field(
        validator=sized_bytes(SIGNATURE_SIZE), metadata=_UNSIGNED, repr=False
    )


class _Signed:
    """Mixin for records signed over their canonical encoding."""

    DOMAIN: ClassVar[str]

    def signed_payload(self) -> bytes:
        """The canonical bytes the signature covers."""
        return signing_payload(self)


def signing_payload(record: Any) -> bytes:
    """Deterministic CBOR of the record's domain and its signed fields."""
    values: list[Any] = [type(record).DOMAIN]
    for field in attrs.fields(type(record)):
        if not field.metadata.get("unsigned"):
            value = getattr(record, field.name)
            if isinstance(value, HybridTimestamp):
                value = [value.physical_ms, value.logical]
            values.append(value)
    return cbor2.dumps(values, canonical=True)


_R = TypeVar("_R", bound=_Signed)


def _sign(record: _R, identity: Identity, **derived: Any) -> _R:
    payload = record.signed_payload()
    return attrs.evolve(record, signature=identity.sign(payload), **derived)  # type: ignore[misc]


_NO_SIGNATURE = bytes(SIGNATURE_SIZE)


@attrs.frozen(kw_only=True)
class Post(_Signed):
    """A post: signed by its author, identified by the hash of its content."""

    DOMAIN: ClassVar[str] = "p2ptimeline/post/1"

    id: bytes = attrs.field(validator=sized_bytes(32), metadata=_UNSIGNED)
    """SHA-256 of the signed payload; unique per post."""
    author: str = attrs.field(validator=username)
    """Username of the author."""
    text: str = attrs.field(validator=[_exact(str), _max_len(MAX_POST_CHARS)])
    """The text of the post."""
    timestamp: HybridTimestamp = attrs.field(
        validator=attrs.validators.instance_of(HybridTimestamp)
    )
    """When the author posted it, on the author's hybrid logical clock."""
    signature: bytes = _signature_field()
    """The author's Ed25519 signature of the signed payload."""

    @classmethod
    def create(
        cls, identity: Identity, author: str, text: str, timestamp: HybridTimestamp
    ) -> Self:
        """Make a post signed by `identity`.

        Raises:
            ValueError: A field is invalid (for example the text is too long).
        """
        draft = cls(
            id=bytes(32),
            author=author,
            text=text,
            timestamp=timestamp,
            signature=_NO_SIGNATURE,
        )
        return _sign(
            draft, identity, id=hashlib.sha256(draft.signed_payload()).digest()
        )

    def verify(self, public_key: bytes) -> None:
        """Check the id and the author's signature.

        Raises:
            InvalidRecord: The id does not match the content.
            InvalidSignature: The signature is not `public_key`'s.
        """
        payload = self.signed_payload()
        if hashlib.sha256(payload).digest() != self.id:
            raise InvalidRecord("post id does not match its content")
        verify(public_key, payload, self.signature)

    @property
    def sort_key(self) -> tuple[HybridTimestamp, bytes]:
        """Total order of posts used by timelines: timestamp, then id."""
        return (self.timestamp, self.id)


class _SelfSigned(_Signed):
    """A record carrying the key that signed it in its `public_key` field."""

    public_key: bytes
    signature: bytes

    def verify(self) -> None:
        """Check the signature against the record's own `public_key`.

        Raises:
            InvalidSignature: It does not verify.
        """
        verify(self.public_key, self.signed_payload(), self.signature)


@attrs.frozen(kw_only=True)
class UsernameClaim(_SelfSigned):
    """Binds a username to a public key; the first claim of a name wins.

    It also carries the password-sealed private key, so that the user can
    log in from a peer that has never seen them. Later claims by the same key
    (a higher `seq`) may replace the sealed key, for a password change, or
    withdraw the claim: a key that lost a race for a name gives up the
    replicas it got, so that the winner's claim can take their place.
    """

    DOMAIN: ClassVar[str] = "p2ptimeline/claim/2"

    username: str = attrs.field(validator=username)
    """The claimed name."""
    public_key: bytes = attrs.field(validator=sized_bytes(PUBLIC_KEY_SIZE))
    """The owner's Ed25519 public key."""
    sealed_key: bytes = attrs.field(
        validator=[_exact(bytes), _max_len(MAX_SEALED_KEY_SIZE)], repr=False
    )
    """The private key sealed with the owner's password (`Identity.seal`)."""
    seq: int = attrs.field(validator=uint(63))
    """Version of this claim; higher replaces lower."""
    withdrawn: bool = attrs.field(default=False, validator=_exact(bool))
    """True: the key gave the name up; any key may claim it again."""
    signature: bytes = _signature_field()
    """Signature by `public_key`."""

    @classmethod
    def create(
        cls,
        identity: Identity,
        username: str,
        sealed_key: bytes,
        seq: int = 0,
        *,
        withdrawn: bool = False,
    ) -> Self:
        """Make a claim of `username` signed by `identity` (or, `withdrawn`,
        a withdrawal of it)."""
        draft = cls(
            username=username,
            public_key=identity.public_key,
            sealed_key=sealed_key,
            seq=seq,
            withdrawn=withdrawn,
            signature=_NO_SIGNATURE,
        )
        return _sign(draft, identity)


@attrs.frozen(kw_only=True)
class Presence(_SelfSigned):
    """Where a user's peer listens and whether it is online (a lease).

    The user is online while `online` is true and `expires_ms` has not
    passed; a peer refreshes the lease while it runs, so a crashed peer
    reads as offline once the lease lapses.
    """

    DOMAIN: ClassVar[str] = "p2ptimeline/presence/1"

    public_key: bytes = attrs.field(validator=sized_bytes(PUBLIC_KEY_SIZE))
    """The user's public key (the record is keyed by it)."""
    host: str = attrs.field(validator=[_exact(str), _max_len(253)])
    """Host the user's peer listens on (TCP)."""
    port: int = attrs.field(validator=uint(16))
    """Port the user's peer listens on (TCP)."""
    online: bool = attrs.field(validator=_exact(bool))
    """False once the user logged out."""
    expires_ms: int = attrs.field(validator=uint(48))
    """Wall-clock time (ms since the epoch) at which the lease lapses."""
    seq: int = attrs.field(validator=uint(63))
    """Version of this record; higher replaces lower."""
    signature: bytes = _signature_field()
    """Signature by `public_key`."""

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        host: str,
        port: int,
        online: bool,
        expires_ms: int,
        seq: int,
    ) -> Self:
        """Make a presence record signed by `identity`."""
        draft = cls(
            public_key=identity.public_key,
            host=host,
            port=port,
            online=online,
            expires_ms=expires_ms,
            seq=seq,
            signature=_NO_SIGNATURE,
        )
        return _sign(draft, identity)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the user's peer."""
        return (self.host, self.port)

    def is_online(self, now_ms: int) -> bool:
        """Whether the lease holds at wall-clock time `now_ms`."""
        return self.online and now_ms < self.expires_ms


@attrs.frozen(kw_only=True)
class FollowEntry(_Signed):
    """One follow (or unfollow) of `followee` by `follower`, signed by the follower.

    Follower and following sets are sets of these entries, merged
    last-writer-wins per pair by `timestamp`: an unfollow is an entry with
    `following` false that is newer than the follow.
    """

    DOMAIN: ClassVar[str] = "p2ptimeline/follow/1"

    follower: str = attrs.field(validator=username)
    """Username of the user who follows."""
    follower_key: bytes = attrs.field(validator=sized_bytes(PUBLIC_KEY_SIZE))
    """Public key of the follower; it signs the entry."""
    followee: str = attrs.field(validator=username)
    """Username of the user who is followed."""
    followee_key: bytes = attrs.field(validator=sized_bytes(PUBLIC_KEY_SIZE))
    """Public key of the followee."""
    following: bool = attrs.field(validator=_exact(bool))
    """True for a follow, false for an unfollow."""
    timestamp: HybridTimestamp = attrs.field(
        validator=attrs.validators.instance_of(HybridTimestamp)
    )
    """When it happened, on the follower's hybrid logical clock."""
    signature: bytes = _signature_field()
    """Signature by `follower_key`."""

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        follower: str,
        followee: str,
        followee_key: bytes,
        following: bool,
        timestamp: HybridTimestamp,
    ) -> Self:
        """Make an entry signed by the follower's `identity`."""
        draft = cls(
            follower=follower,
            follower_key=identity.public_key,
            followee=followee,
            followee_key=followee_key,
            following=following,
            timestamp=timestamp,
            signature=_NO_SIGNATURE,
        )
        return _sign(draft, identity)

    def verify(self) -> None:
        """Check the follower's signature.

        Raises:
            InvalidSignature: It does not verify with `follower_key`.
        """
        verify(self.follower_key, self.signed_payload(), self.signature)

    def supersedes(self, other: FollowEntry) -> bool:
        """Whether this entry wins over `other` for the same pair.

        Last writer wins by timestamp; on a tie an unfollow wins, then the
        signature bytes decide, so every replica picks the same entry.
        """
        return (self.timestamp, not self.following, self.signature) > (
            other.timestamp,
            not other.following,
            other.signature,
        )
