"""The peer protocol's frames and their codec. Sans-I/O: bytes in, frames out.

A frame on the TCP stream is a 4-byte big-endian length followed by that
many bytes: a `Frame` encoded with the network's `Serializer` (CBOR by
default). A `Frame` carries a protocol version, a request id and exactly one
message. Requests get exactly one reply, a frame whose `reply_to` is the
request's id. `FrameDecoder` turns a byte stream into frames and raises
`ProtocolError` for anything malformed: a bad length, an oversized frame, an
undecodable body, an unknown version, or a field out of its bounds. Every
field of every message is checked as it is decoded (names, hosts, sizes,
counts), so a handler never sees a value it would have to refuse later.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from typing import Any

import attrs

from .._errors import DecodeError, ProtocolError
from .._models import FollowEntry, HybridTimestamp, Post, Presence, uint, username
from .._serializer import Serializer

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_BATCH_POSTS",
    "MAX_REASON_CHARS",
    "MAX_TREE_SIZE",
    "PROTOCOL_VERSION",
    "Ack",
    "FollowNotice",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "GetPosts",
    "Message",
    "PostBatch",
    "PostPush",
    "PresenceNotice",
    "Refusal",
    "TreeMember",
    "check_host",
    "encode_frame",
]

PROTOCOL_VERSION = 1
"""Version of the peer protocol this library speaks."""
DEFAULT_MAX_FRAME_SIZE = 1 << 20
"""Largest frame accepted by default: 1 MiB."""
MAX_TREE_SIZE = 4096
"""Most members of the tree in one `PostPush`, its receiver included. Larger
trees are split by their sender (see `Relay`)."""
MAX_BATCH_POSTS = 10_000
"""Most posts in one `PostBatch` (the largest `GetPosts.limit`)."""
MAX_REASON_CHARS = 200
"""Longest `Refusal.reason`."""
_LENGTH = struct.Struct("!I")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_host(host: str) -> bool:
    """Whether `host` is an IP address or a DNS name: at most 253 characters
    of dot-separated labels of ASCII letters, digits, ``-`` and ``_``, the
    last not all digits (so no legacy forms of addresses, like ``0x7f.1``)."""
    if not isinstance(host, str) or not 0 < len(host) <= 253:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return not labels[-1].isdigit() and all(
            _LABEL.fullmatch(label) for label in labels
        )
    return True


def _host(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    """attrs validator: a host to connect to (see `check_host`)."""
    if not check_host(value):  # type: ignore[arg-type]
        raise ValueError(f"{attribute.name}: invalid host {value!r}")


def _loggable(text: str) -> str:
    """`text` with control and separator characters (line breaks among
    them) replaced by U+FFFD, so that it cannot forge log lines."""
    if not isinstance(text, str) or text.isprintable():
        return text
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


@attrs.frozen(kw_only=True)
class TreeMember:
    """A follower in a dissemination tree, with where to reach it."""

    name: str = attrs.field(validator=username)
    """The follower's username."""
    host: str = attrs.field(validator=_host)
    """Host of the follower's peer: an IP address or a DNS name."""
    port: int = attrs.field(validator=uint(16))
    """TCP port of the follower's peer."""


@attrs.frozen(kw_only=True)
class PostPush:
    """A post on its way down a dissemination tree.

    `tree` is the receiver's subtree in heap order: `tree[0]` is the
    receiver, and the children of position i are positions k*i+1 .. k*i+k
    (see `DisseminationTree`). The receiver stores the post and forwards it
    to its children, each with its own subtree.
    """

    post: Post
    """The post."""
    fanout: int = attrs.field(validator=attrs.validators.in_(range(1, 65)))
    """The tree's arity k."""
    tree: tuple[TreeMember, ...] = attrs.field(
        validator=[attrs.validators.min_len(1), attrs.validators.max_len(MAX_TREE_SIZE)]
    )
    """The receiver's subtree, receiver first: 1 to `MAX_TREE_SIZE` members."""


@attrs.frozen(kw_only=True)
class GetPosts:
    """Ask for the posts held of `author` stamped after `since`."""

    author: str = attrs.field(validator=username)
    """Whose posts."""
    since: HybridTimestamp | None
    """Only posts stamped strictly after this (None: from the start)."""
    limit: int = attrs.field(validator=attrs.validators.in_(range(1, 10_001)))
    """At most this many, oldest first."""


@attrs.frozen(kw_only=True)
class PostBatch:
    """The reply to `GetPosts`."""

    posts: tuple[Post, ...] = attrs.field(
        validator=attrs.validators.max_len(MAX_BATCH_POSTS)
    )
    """Posts, oldest first: at most `MAX_BATCH_POSTS`."""
    more: bool
    """Whether more posts follow the last one: ask again from there."""


@attrs.frozen(kw_only=True)
class FollowNotice:
    """Tells a user that someone followed or unfollowed them."""

    entry: FollowEntry
    """The signed follow entry, as written to the registry."""
    presence: Presence | None
    """The follower's signed presence, so the followee can reach it at once."""


@attrs.frozen(kw_only=True)
class PresenceNotice:
    """Tells a followee where a follower listens now (at login)."""

    username: str = attrs.field(validator=username)
    """The follower's name."""
    presence: Presence
    """The follower's signed presence record."""


@attrs.frozen(kw_only=True)
class Ack:
    """A request was taken."""


@attrs.frozen(kw_only=True)
class Refusal:
    """A request was refused; the reason is for logs, not for machines."""

    reason: str = attrs.field(
        converter=_loggable,
        validator=attrs.validators.max_len(MAX_REASON_CHARS),
    )
    """Why: at most `MAX_REASON_CHARS` characters, with control and
    line-separating characters replaced (see `_loggable`)."""


@attrs.frozen(kw_only=True)
class Frame:
    """One frame of the peer protocol: exactly one message field is set."""

    version: int = attrs.field(validator=uint(63))
    """Protocol version of the sender."""
    request_id: int = attrs.field(validator=uint(63))
    """The sender's id for a request, from 1 (0 in replies)."""
    reply_to: int = attrs.field(default=0, validator=uint(63))
    """In a reply, the id of the request it answers (0 in requests)."""
    push: PostPush | None = None
    get: GetPosts | None = None
    batch: PostBatch | None = None
    follow: FollowNotice | None = None
    presence: PresenceNotice | None = None
    ack: Ack | None = None
    refusal: Refusal | None = None

    def __attrs_post_init__(self) -> None:
        if len([m for m in self.messages() if m is not None]) != 1:
            raise ValueError("a frame carries exactly one message")
        if (self.request_id == 0) == (self.reply_to == 0):
            raise ValueError("a frame is a request (request_id > 0) or a reply")

    def messages(self) -> tuple[object, ...]:
        """The message fields, in declaration order."""
        return (
            self.push,
            self.get,
            self.batch,
            self.follow,
            self.presence,
            self.ack,
            self.refusal,
        )

    @property
    def message(self) -> Message:
        """The one message this frame carries."""
        return next(m for m in self.messages() if m is not None)  # type: ignore[return-value]

    @classmethod
    def of(cls, message: Message, *, request_id: int = 0, reply_to: int = 0) -> Frame:
        """A frame carrying `message`."""
        fields: dict[str, Any] = {_FIELD_OF[type(message)]: message}
        return cls(
            version=PROTOCOL_VERSION,
            request_id=request_id,
            reply_to=reply_to,
            **fields,
        )


Message = (
    PostPush | GetPosts | PostBatch | FollowNotice | PresenceNotice | Ack | Refusal
)
"""Any message of the peer protocol."""

_FIELD_OF: dict[type, str] = {
    PostPush: "push",
    GetPosts: "get",
    PostBatch: "batch",
    FollowNotice: "follow",
    PresenceNotice: "presence",
    Ack: "ack",
    Refusal: "refusal",
}


class FrameTooLarge(ProtocolError):
    """A frame of ours would exceed the frame size limit; nothing was sent.

    A `ProtocolError`, since the receiver would refuse it as one; its own
    type lets a sender split what it sends instead of retrying.
    """


def encode_frame(
    serializer: Serializer, frame: Frame, max_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """A frame as bytes for the stream: length prefix and body.

    Raises:
        FrameTooLarge: The encoded frame is larger than `max_size`.
    """
    body = serializer.encode(frame)
    if len(body) > max_size:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds {max_size}")
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frames.

    Args:
        serializer: Decodes frame bodies.
        max_size: Largest frame body accepted.
    """

    def __init__(
        self, serializer: Serializer, max_size: int = DEFAULT_MAX_FRAME_SIZE
    ) -> None:
        self._serializer = serializer
        self._max_size = max_size
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; returns the frames they complete.

        Raises:
            ProtocolError: The stream is malformed. It cannot be resumed:
                close the connection.
        """
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > self._max_size:
                raise ProtocolError(f"frame of {size} bytes exceeds {self._max_size}")
            if len(self._buffer) < _LENGTH.size + size:
                break
            body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + size])
            del self._buffer[: _LENGTH.size + size]
            try:
                frame = self._serializer.decode(body, Frame)
            except DecodeError as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from exc
            if frame.version != PROTOCOL_VERSION:
                raise ProtocolError(f"unsupported protocol version {frame.version}")
            frames.append(frame)
        return frames
