"""The peer protocol's frame codec: round trips, stream splitting, bad input."""

from __future__ import annotations

import contextlib
import json
import struct

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import follow_entries, posts, presences, timestamps, usernames

import p2ptimeline as pt
from p2ptimeline._p2p.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_BATCH_POSTS,
    MAX_TREE_SIZE,
    PROTOCOL_VERSION,
    Ack,
    FollowNotice,
    Frame,
    FrameDecoder,
    GetPosts,
    Message,
    PostBatch,
    PostPush,
    PresenceNotice,
    Refusal,
    TreeMember,
    check_host,
    encode_frame,
)
from p2ptimeline.testing import make_posts

SERIALIZERS = [pt.CborSerializer(), pt.JsonSerializer()]
serializers = pytest.mark.parametrize(
    "serializer", SERIALIZERS, ids=lambda s: type(s).__name__
)

ALICE = pt.Identity.generate()
BOB = pt.Identity.generate()
POSTS = make_posts("alice", 3, identity=ALICE)
PRESENCE = pt.Presence.create(
    BOB, host="127.0.0.1", port=4100, online=True, expires_ms=1_700_000_060_000, seq=7
)
ENTRY = pt.FollowEntry.create(
    BOB,
    follower="bob",
    followee="alice",
    followee_key=ALICE.public_key,
    following=True,
    timestamp=pt.HybridTimestamp(physical_ms=1_700_000_000_000, logical=2),
)
TREE = tuple(
    TreeMember(name=name, host="127.0.0.1", port=4100 + i)
    for i, name in enumerate(["bob", "carol", "dave", "erin"])
)

MESSAGES: list[Message] = [
    PostPush(post=POSTS[0], fanout=2, tree=TREE),
    PostPush(post=POSTS[1], fanout=64, tree=TREE[:1]),
    GetPosts(author="alice", since=None, limit=100),
    GetPosts(author="alice", since=POSTS[0].timestamp, limit=1),
    PostBatch(posts=tuple(POSTS), more=True),
    PostBatch(posts=(), more=False),
    FollowNotice(entry=ENTRY, presence=PRESENCE),
    FollowNotice(entry=ENTRY, presence=None),
    PresenceNotice(username="bob", presence=PRESENCE),
    Ack(),
    Refusal(reason="not following"),
    Refusal(reason="x" * 200),
]
FRAMES = [
    Frame.of(message, request_id=i + 1)
    if i % 2 == 0
    else Frame.of(message, reply_to=i + 1)
    for i, message in enumerate(MESSAGES)
]
frames_param = pytest.mark.parametrize(
    "frame",
    FRAMES,
    ids=lambda f: f"{type(f.message).__name__}-{f.request_id or f.reply_to}",
)

# Hypothesis strategies for every message type.
hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(
        r"[a-z0-9_]([a-z0-9_-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?)*",
        fullmatch=True,
    ).filter(lambda host: not host.split(".")[-1].isdigit()),
)
tree_members = st.builds(
    TreeMember,
    name=usernames,
    host=hosts,
    port=st.integers(0, 65535),
)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        PostPush,
        post=posts,
        fanout=st.integers(1, 64),
        tree=st.lists(tree_members, min_size=1, max_size=8).map(tuple),
    ),
    st.builds(
        GetPosts,
        author=usernames,
        since=st.none() | timestamps,
        limit=st.integers(1, 10_000),
    ),
    st.builds(
        PostBatch, posts=st.lists(posts, max_size=3).map(tuple), more=st.booleans()
    ),
    st.builds(FollowNotice, entry=follow_entries, presence=st.none() | presences),
    st.builds(PresenceNotice, username=usernames, presence=presences),
    st.just(Ack()),
    st.builds(Refusal, reason=st.text(max_size=200)),
)
frames = st.one_of(
    st.builds(Frame.of, messages, request_id=st.integers(1, 2**63 - 1)),
    st.builds(Frame.of, messages, reply_to=st.integers(1, 2**63 - 1)),
)


def _prefixed(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def _frame_tree(serializer: pt.Serializer, frame: Frame) -> dict[str, object]:
    """The plain map a serializer makes of `frame`, to tamper with."""
    if isinstance(serializer, pt.CborSerializer):
        tree = cbor2.loads(serializer.encode(frame))
    else:
        tree = json.loads(serializer.encode(frame))
    assert isinstance(tree, dict)
    return tree


def _dump(serializer: pt.Serializer, tree: object) -> bytes:
    if isinstance(serializer, pt.CborSerializer):
        return cbor2.dumps(tree)
    return json.dumps(tree).encode()


def _feed_chunks(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame]:
    """Feed `data` cut at the sorted positions `cuts`; all frames decoded."""
    out: list[Frame] = []
    start = 0
    for cut in [*cuts, len(data)]:
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    return out


# Frames and messages


@frames_param
def test_frame_message_returns_the_message(frame: Frame) -> None:
    """Frame.of sets exactly the matching field and Frame.message returns it."""
    message = MESSAGES[(frame.request_id or frame.reply_to) - 1]
    assert frame.message is message
    assert frame.version == PROTOCOL_VERSION
    assert [m for m in frame.messages() if m is not None] == [message]


def test_frame_of_sets_ids() -> None:
    """A frame is a request (request_id > 0) or a reply (reply_to > 0), not both."""
    request = Frame.of(GetPosts(author="a", since=None, limit=1), request_id=5)
    assert (request.request_id, request.reply_to) == (5, 0)
    reply = Frame.of(Ack(), reply_to=9)
    assert (reply.request_id, reply.reply_to) == (0, 9)
    for ids in ({}, {"request_id": 5, "reply_to": 9}):
        with pytest.raises(ValueError, match="request"):
            Frame.of(Ack(), **ids)


def test_frame_needs_exactly_one_message() -> None:
    """Building a frame with no message or two messages is a ValueError."""
    with pytest.raises(ValueError, match="exactly one"):
        Frame(version=PROTOCOL_VERSION, request_id=1)
    with pytest.raises(ValueError, match="exactly one"):
        Frame(
            version=PROTOCOL_VERSION,
            request_id=1,
            ack=Ack(),
            refusal=Refusal(reason="no"),
        )


def test_message_validators() -> None:
    """Message fields are checked: fanout 1..64, limit 1..10000, reason <= 200."""
    with pytest.raises(ValueError, match="fanout"):
        PostPush(post=POSTS[0], fanout=0, tree=TREE)
    with pytest.raises(ValueError, match="fanout"):
        PostPush(post=POSTS[0], fanout=65, tree=TREE)
    with pytest.raises(ValueError, match="limit"):
        GetPosts(author="alice", since=None, limit=0)
    with pytest.raises(ValueError, match="limit"):
        GetPosts(author="alice", since=None, limit=10_001)
    with pytest.raises(ValueError, match="reason"):
        Refusal(reason="x" * 201)
    with pytest.raises(ValueError, match="request_id"):
        Frame.of(Ack(), request_id=-1)
    with pytest.raises(ValueError, match="reply_to"):
        Frame.of(Ack(), reply_to=-1)


# Round trips


@serializers
@frames_param
def test_round_trip_every_message(serializer: pt.Serializer, frame: Frame) -> None:
    """encode_frame then FrameDecoder gives back an equal frame, message and all."""
    decoder = FrameDecoder(serializer)
    (decoded,) = decoder.feed(encode_frame(serializer, frame))
    assert decoded == frame
    assert type(decoded.message) is type(frame.message)
    assert decoder.buffered == 0


@serializers
def test_round_trip_keeps_signatures_valid(serializer: pt.Serializer) -> None:
    """Signed records inside frames still verify after the trip."""
    stream = b"".join(encode_frame(serializer, frame) for frame in FRAMES)
    decoded = FrameDecoder(serializer).feed(stream)
    assert decoded == FRAMES
    push, batch, notice = decoded[0].message, decoded[4].message, decoded[6].message
    assert isinstance(push, PostPush)
    assert isinstance(batch, PostBatch)
    assert isinstance(notice, FollowNotice)
    push.post.verify(ALICE.public_key)
    for post in batch.posts:
        post.verify(ALICE.public_key)
    notice.entry.verify()
    assert notice.presence is not None
    notice.presence.verify()


@serializers
@given(frame=frames)
def test_round_trip_any_frame(serializer: pt.Serializer, frame: Frame) -> None:
    """Any frame of any message type survives encode_frame + FrameDecoder."""
    assert FrameDecoder(serializer).feed(encode_frame(serializer, frame)) == [frame]


def test_length_prefix_is_big_endian_body_length() -> None:
    """The first 4 bytes are the body length, big-endian; the body follows."""
    serializer = pt.CborSerializer()
    data = encode_frame(serializer, FRAMES[0])
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert data[4:] == serializer.encode(FRAMES[0])


# Splitting the stream


@serializers
def test_split_at_every_byte_boundary(serializer: pt.Serializer) -> None:
    """Cutting a stream of frames in two at any byte yields the same frames."""
    stream = b"".join(encode_frame(serializer, f) for f in FRAMES[8:])
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(serializer)
        assert _feed_chunks(decoder, stream, [cut]) == FRAMES[8:], cut
        assert decoder.buffered == 0


@serializers
def test_one_byte_at_a_time(serializer: pt.Serializer) -> None:
    """Feeding every byte on its own yields each frame as its last byte arrives."""
    decoder = FrameDecoder(serializer)
    for frame in FRAMES:
        data = encode_frame(serializer, frame)
        for i, byte in enumerate(data):
            got = decoder.feed(bytes([byte]))
            if i < len(data) - 1:
                assert got == []
                assert decoder.buffered == i + 1
            else:
                assert got == [frame]
                assert decoder.buffered == 0


@serializers
@given(
    data=st.data(),
    chosen=st.lists(frames, min_size=1, max_size=4),
)
def test_random_chunkings(
    serializer: pt.Serializer, data: st.DataObject, chosen: list[Frame]
) -> None:
    """However the stream is chunked, the decoder yields the same frames in order."""
    stream = b"".join(encode_frame(serializer, f) for f in chosen)
    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    )
    decoder = FrameDecoder(serializer)
    assert _feed_chunks(decoder, stream, cuts) == chosen
    assert decoder.buffered == 0


@serializers
def test_several_frames_in_one_chunk(serializer: pt.Serializer) -> None:
    """One chunk holding many frames yields them all, in order."""
    decoder = FrameDecoder(serializer)
    stream = b"".join(encode_frame(serializer, f) for f in FRAMES)
    assert decoder.feed(stream) == FRAMES
    assert decoder.buffered == 0


@serializers
def test_frames_and_a_partial_one_in_one_chunk(serializer: pt.Serializer) -> None:
    """Complete frames come out; the partial tail stays buffered until completed."""
    decoder = FrameDecoder(serializer)
    first, second, third = (encode_frame(serializer, f) for f in FRAMES[:3])
    tail = 5
    assert decoder.feed(first + second + third[:tail]) == FRAMES[:2]
    assert decoder.buffered == tail
    assert decoder.feed(third[tail:]) == [FRAMES[2]]
    assert decoder.buffered == 0


def test_empty_feed() -> None:
    """Feeding no bytes yields nothing and buffers nothing."""
    decoder = FrameDecoder(pt.CborSerializer())
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


@pytest.mark.parametrize("size", [1, 2, 3])
def test_truncated_length_prefix_is_buffered(size: int) -> None:
    """Fewer than 4 bytes of length prefix at the end is no error, just buffered."""
    decoder = FrameDecoder(pt.CborSerializer())
    data = encode_frame(pt.CborSerializer(), FRAMES[9])
    assert decoder.feed(data + data[:size]) == [FRAMES[9]]
    assert decoder.buffered == size
    assert decoder.feed(data[size:]) == [FRAMES[9]]
    assert decoder.buffered == 0


def test_buffered_counts_partial_body() -> None:
    """buffered counts the prefix and the body bytes of an incomplete frame."""
    data = encode_frame(pt.CborSerializer(), FRAMES[0])
    for end in range(len(data)):
        decoder = FrameDecoder(pt.CborSerializer())
        assert decoder.feed(data[:end]) == []
        assert decoder.buffered == end


# Size limits


def test_oversized_length_prefix_raises_before_body() -> None:
    """A length prefix above max_size is a ProtocolError from the prefix alone."""
    decoder = FrameDecoder(pt.CborSerializer(), max_size=100)
    with pytest.raises(pt.ProtocolError, match="exceeds"):
        decoder.feed(struct.pack("!I", 101))
    decoder = FrameDecoder(pt.CborSerializer())
    with pytest.raises(pt.ProtocolError, match="exceeds"):
        decoder.feed(struct.pack("!I", DEFAULT_MAX_FRAME_SIZE + 1))
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(pt.CborSerializer()).feed(b"\xff\xff\xff\xff")


def test_oversized_frame_after_good_frames_raises() -> None:
    """An oversized prefix after good frames in the same chunk still raises."""
    data = encode_frame(pt.CborSerializer(), FRAMES[9])
    decoder = FrameDecoder(pt.CborSerializer(), max_size=len(data))
    with pytest.raises(pt.ProtocolError):
        decoder.feed(data + struct.pack("!I", len(data) + 1))


@serializers
def test_max_size_is_inclusive(serializer: pt.Serializer) -> None:
    """A body of exactly max_size bytes is accepted on both sides; one less is not."""
    frame = FRAMES[0]
    size = len(serializer.encode(frame))
    data = encode_frame(serializer, frame, max_size=size)
    assert FrameDecoder(serializer, max_size=size).feed(data) == [frame]
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(serializer, max_size=size - 1).feed(data[:4])


@serializers
def test_encode_refuses_oversized_frames(serializer: pt.Serializer) -> None:
    """encode_frame raises ProtocolError for a frame whose body exceeds max_size."""
    frame = FRAMES[4]
    size = len(serializer.encode(frame))
    with pytest.raises(pt.ProtocolError, match="exceeds"):
        encode_frame(serializer, frame, max_size=size - 1)
    host = ("h" * 62 + ".") * 4  # 252 characters
    tree = tuple(TreeMember(name=f"u{i}", host=host, port=i) for i in range(4096))
    big = Frame.of(PostPush(post=POSTS[0], fanout=2, tree=tree), request_id=1)
    with pytest.raises(pt.ProtocolError, match="exceeds"):
        encode_frame(serializer, big)  # over the default 1 MiB


# Bad input


@serializers
@pytest.mark.parametrize(
    "body",
    [b"", b"\x00", b"\xff\xff\xff", b"{", b"[]", b"null", b"not a frame" * 3],
    ids=repr,
)
def test_garbage_body_is_protocol_error(serializer: pt.Serializer, body: bytes) -> None:
    """A body that is not a valid frame raises ProtocolError."""
    with pytest.raises(pt.ProtocolError, match="undecodable"):
        FrameDecoder(serializer).feed(_prefixed(body))


@serializers
def test_frame_with_no_message_is_protocol_error(serializer: pt.Serializer) -> None:
    """A frame body with every message field empty is refused."""
    tree = _frame_tree(serializer, FRAMES[9])
    tree["ack"] = None
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(serializer).feed(_prefixed(_dump(serializer, tree)))


@serializers
def test_frame_with_two_messages_is_protocol_error(serializer: pt.Serializer) -> None:
    """A frame body carrying two messages is refused."""
    tree = _frame_tree(serializer, FRAMES[9])
    tree["refusal"] = {"reason": "both"}
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(serializer).feed(_prefixed(_dump(serializer, tree)))


@serializers
def test_frame_with_unknown_or_missing_fields_is_protocol_error(
    serializer: pt.Serializer,
) -> None:
    """A frame map with an extra or a missing field is refused."""
    tree = _frame_tree(serializer, FRAMES[9])
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(serializer).feed(
            _prefixed(_dump(serializer, {**tree, "extra": 1}))
        )
    del tree["version"]
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(serializer).feed(_prefixed(_dump(serializer, tree)))


@serializers
@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 2**32])
def test_wrong_version_is_protocol_error(
    serializer: pt.Serializer, version: int
) -> None:
    """A well-formed frame of another protocol version is refused."""
    frame = Frame(version=version, request_id=1, ack=Ack())
    with pytest.raises(pt.ProtocolError, match="version"):
        FrameDecoder(serializer).feed(encode_frame(serializer, frame))


@serializers
def test_invalid_message_inside_frame_is_protocol_error(
    serializer: pt.Serializer,
) -> None:
    """Message validators run on decode: an out-of-range fanout is refused."""
    tree = _frame_tree(serializer, FRAMES[0])
    push = tree["push"]
    assert isinstance(push, dict)
    push["fanout"] = 0
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(serializer).feed(_prefixed(_dump(serializer, tree)))


def test_serializer_mismatch_is_protocol_error() -> None:
    """A CBOR frame fed to a JSON decoder (and back) is a ProtocolError."""
    cbor, json_ = pt.CborSerializer(), pt.JsonSerializer()
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(json_).feed(encode_frame(cbor, FRAMES[0]))
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(cbor).feed(encode_frame(json_, FRAMES[0]))


def test_protocol_error_chains_the_decode_error() -> None:
    """An undecodable body's ProtocolError is raised from the DecodeError."""
    with pytest.raises(pt.ProtocolError) as info:
        FrameDecoder(pt.CborSerializer()).feed(_prefixed(b"\xff"))
    assert isinstance(info.value.__cause__, pt.DecodeError)
    assert isinstance(info.value, pt.RemoteError)


def _decode_or_protocol_error(
    serializer: pt.Serializer, data: bytes, cuts: list[int], max_size: int
) -> None:
    decoder = FrameDecoder(serializer, max_size=max_size)
    try:
        got = _feed_chunks(decoder, data, cuts)
    except pt.ProtocolError:
        return
    for frame in got:
        assert isinstance(frame, Frame)
        assert frame.version == PROTOCOL_VERSION
        assert sum(m is not None for m in frame.messages()) == 1
    assert 0 <= decoder.buffered <= len(data)


@serializers
@given(
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=5).map(sorted),
    max_size=st.sampled_from([16, 1000, DEFAULT_MAX_FRAME_SIZE]),
)
def test_random_bytes_yield_frames_or_protocol_error(
    serializer: pt.Serializer, data: bytes, cuts: list[int], max_size: int
) -> None:
    """Random bytes yield valid frames or raise ProtocolError, nothing else."""
    _decode_or_protocol_error(
        serializer, data, [min(c, len(data)) for c in cuts], max_size
    )


@serializers
@given(
    bodies=st.lists(st.binary(max_size=200), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 1000), max_size=5).map(sorted),
)
def test_random_bodies_yield_frames_or_protocol_error(
    serializer: pt.Serializer, bodies: list[bytes], cuts: list[int]
) -> None:
    """Well-framed random bodies yield valid frames or raise ProtocolError."""
    data = b"".join(_prefixed(body) for body in bodies)
    _decode_or_protocol_error(serializer, data, [min(c, len(data)) for c in cuts], 1000)


@serializers
@given(data=st.data(), frame=frames)
def test_mutated_frames_yield_frames_or_protocol_error(
    serializer: pt.Serializer, data: st.DataObject, frame: Frame
) -> None:
    """Bit flips and truncations of a real frame never raise but ProtocolError."""
    body = bytearray(serializer.encode(frame))
    flips = data.draw(st.lists(st.integers(0, len(body) - 1), max_size=4))
    for i in flips:
        body[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(body)))
    decoder = FrameDecoder(serializer)
    with contextlib.suppress(pt.ProtocolError):
        for got in decoder.feed(_prefixed(bytes(body[:cut]))):
            assert got.version == PROTOCOL_VERSION
            assert sum(m is not None for m in got.messages()) == 1


def test_unencodable_ids_and_ports_are_refused_locally() -> None:
    """Ids of 2**63 and more and ports past 65535 fail when the frame is built."""
    with pytest.raises(ValueError, match="request_id"):
        Frame.of(Ack(), request_id=2**64)
    with pytest.raises(ValueError, match="reply_to"):
        Frame.of(Ack(), reply_to=2**63)
    with pytest.raises(ValueError, match="port"):
        TreeMember(name="alice", host="127.0.0.1", port=70000)


# Every field is bounded (remote input never reaches a handler unchecked)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "::1",
        "fe80::1%eth0",
        "localhost",
        "peer-1.example.org",
        "example.org.",
        "my_host",
        "a" * 63 + ".b",
        ("h" * 62 + ".") * 4,
    ],
)
def test_hosts_are_ip_addresses_or_dns_names(host: str) -> None:
    """IPv4, IPv6 and DNS names (underscores and a final dot allowed) are hosts."""
    assert check_host(host)
    assert TreeMember(name="bob", host=host, port=1).host == host


@pytest.mark.parametrize(
    "host",
    [
        "",
        " ",
        "bad host",
        "host\nERROR forged line",
        "a..b",
        ".a",
        "-a.b",
        "a-.b",
        "a" * 64 + ".b",
        "h" * 254,
        "exa mple.org",
        "ex/ample",
        "ñandú.org",
        "127.0.0.1:80",
        "[::1]",
        "0x7f.1",
        "2130706433",
        "999.1.1.1",
    ],
)
def test_other_hosts_are_refused(host: str) -> None:
    """Empty, spaced, control-character, over-long and malformed hosts are not."""
    assert not check_host(host)
    with pytest.raises(ValueError, match="host"):
        TreeMember(name="bob", host=host, port=1)


def test_a_tree_has_one_to_max_tree_size_members() -> None:
    """A push carries its receiver at least, and at most MAX_TREE_SIZE members."""
    member = TREE[0]
    PostPush(post=POSTS[0], fanout=2, tree=(member,) * MAX_TREE_SIZE)
    for size in (0, MAX_TREE_SIZE + 1):
        with pytest.raises(ValueError, match="tree"):
            PostPush(post=POSTS[0], fanout=2, tree=(member,) * size)


def test_names_in_messages_are_usernames() -> None:
    """GetPosts.author and PresenceNotice.username must be valid usernames."""
    for bad in ("", "Alice", "a b", "x" * 33, "../etc", "-dash"):
        with pytest.raises(ValueError, match="author"):
            GetPosts(author=bad, since=None, limit=1)
        with pytest.raises(ValueError, match="username"):
            PresenceNotice(username=bad, presence=PRESENCE)
        with pytest.raises(ValueError, match="name"):
            TreeMember(name=bad, host="127.0.0.1", port=1)


def test_a_batch_holds_at_most_max_batch_posts() -> None:
    """A PostBatch of more than MAX_BATCH_POSTS posts is refused."""
    PostBatch(posts=(POSTS[0],) * MAX_BATCH_POSTS, more=False)
    with pytest.raises(ValueError, match="posts"):
        PostBatch(posts=(POSTS[0],) * (MAX_BATCH_POSTS + 1), more=False)


@given(reason=st.text(max_size=200))
def test_a_refusal_reason_cannot_forge_log_lines(reason: str) -> None:
    """Control and line-separating characters in a reason are replaced, so a
    logged reason is one line; printable text is kept as it is."""
    refusal = Refusal(reason=reason)
    assert refusal.reason.isprintable()
    assert len(refusal.reason) == len(reason)
    if reason.isprintable():
        assert refusal.reason == reason
    assert Refusal(reason="a\nb\r\x00c\u2028").reason == "a\ufffdb\ufffd\ufffdc\ufffd"


@serializers
@pytest.mark.parametrize(
    ("message", "field", "bad"),
    [
        ("get", "author", "Not A Name"),
        ("get", "author", ""),
        ("presence", "username", "x" * 5000),
        ("push", "tree", []),
        ("refusal", "reason", "x" * 201),
    ],
)
def test_out_of_bounds_fields_are_refused_on_decode(
    serializer: pt.Serializer, message: str, field: str, bad: object
) -> None:
    """A received frame with a field out of bounds is a ProtocolError."""
    frame = next(f for f in FRAMES if _frame_tree(serializer, f).get(message))
    tree = _frame_tree(serializer, frame)
    body = tree[message]
    assert isinstance(body, dict)
    body[field] = bad
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(serializer).feed(_prefixed(_dump(serializer, tree)))


@serializers
@pytest.mark.parametrize("host", ["", "bad host", "a\nb", 7])
def test_a_tree_member_with_a_bad_host_is_refused_on_decode(
    serializer: pt.Serializer, host: object
) -> None:
    """A tree member whose host is not an address or a name fails the frame."""
    tree = _frame_tree(serializer, FRAMES[0])
    push = tree["push"]
    assert isinstance(push, dict)
    push["tree"][1]["host"] = host  # type: ignore[index]
    with pytest.raises(pt.ProtocolError):
        FrameDecoder(serializer).feed(_prefixed(_dump(serializer, tree)))
