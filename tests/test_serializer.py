"""Serializers: round trips, and untrusted bytes that only ever raise DecodeError."""

from __future__ import annotations

import base64
import contextlib
import json

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import claims, follow_entries, posts, presences, records

import p2ptimeline as pt

SERIALIZERS = [pt.CborSerializer(), pt.JsonSerializer()]
KINDS = [pt.Post, pt.UsernameClaim, pt.Presence, pt.FollowEntry, pt.HybridTimestamp]
serializers = pytest.mark.parametrize(
    "serializer", SERIALIZERS, ids=lambda s: type(s).__name__
)


@serializers
@given(record=records)
def test_round_trip(serializer: pt.Serializer, record: object) -> None:
    """decode(encode(x)) == x for every record type and serializer."""
    assert serializer.decode(serializer.encode(record), type(record)) == record


@serializers
@given(data=st.binary(max_size=300), kind=st.sampled_from(KINDS))
def test_garbage_raises_decode_error_only(
    serializer: pt.Serializer, data: bytes, kind: type
) -> None:
    """Random bytes decode to a valid value or raise DecodeError, nothing else."""
    try:
        value = serializer.decode(data, kind)
    except pt.DecodeError:
        return
    assert isinstance(value, kind)


@serializers
@given(data=st.data(), record=records)
def test_mutated_encodings_raise_decode_error_only(
    serializer: pt.Serializer, data: st.DataObject, record: object
) -> None:
    """Truncated or bit-flipped encodings never raise anything but DecodeError."""
    encoded = bytearray(serializer.encode(record))
    cut = data.draw(st.integers(0, len(encoded)))
    flips = data.draw(st.lists(st.integers(0, len(encoded) - 1), max_size=4))
    for i in flips:
        encoded[i] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(pt.DecodeError):
        serializer.decode(bytes(encoded[:cut]), type(record))


@given(
    tree=st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    )
)
def test_any_cbor_tree_decodes_or_raises_decode_error(tree: object) -> None:
    """Well-formed CBOR of the wrong shape is a DecodeError."""
    for kind in KINDS:
        with contextlib.suppress(pt.DecodeError):
            pt.CborSerializer().decode(cbor2.dumps(tree), kind)


def _post() -> pt.Post:
    return pt.Post.create(
        pt.Identity.generate(), "alice", "hi", pt.HybridTimestamp(physical_ms=1)
    )


def test_cbor_refuses_trailing_bytes() -> None:
    """Bytes after a complete CBOR item make the whole input invalid."""
    data = pt.CborSerializer().encode(_post())
    with pytest.raises(pt.DecodeError, match="trailing"):
        pt.CborSerializer().decode(data + b"\x00", pt.Post)


@pytest.mark.parametrize(
    "data",
    [
        bytes([0xC1, 0x1A, 0, 0, 0, 1]),  # tag 1: epoch datetime
        bytes([0xD8, 0x23, 0x61, 0x61]),  # tag 35: regular expression
        bytes([0xD8, 0x1C, 0x80]),  # tag 28: shared value
        bytes([0xD9, 0x01, 0x02, 0x80]),  # tag 258: set
        bytes([0xD8, 0x99, 0x01]),  # unknown tag 153
    ],
)
def test_cbor_refuses_tags(data: bytes) -> None:
    """No CBOR tag is interpreted: dates, regexes and shared refs are refused."""
    with pytest.raises(pt.DecodeError):
        pt.CborSerializer().decode(data, pt.Post)


def test_cbor_refuses_deep_nesting_and_huge_lengths() -> None:
    """Deeply nested input and lengths beyond the data fail fast and cleanly."""
    with pytest.raises(pt.DecodeError):
        pt.CborSerializer().decode(b"\x81" * 100_000 + b"\x00", pt.Post)
    with pytest.raises(pt.DecodeError):  # a byte string claiming 2**62 bytes
        pt.CborSerializer().decode(b"\x5b" + (2**62).to_bytes(8, "big"), pt.Post)
    with pytest.raises(pt.DecodeError):  # an array claiming 2**62 items
        pt.CborSerializer().decode(b"\x9b" + (2**62).to_bytes(8, "big"), pt.Post)


def test_cbor_refuses_duplicate_keys_and_indefinite_lengths() -> None:
    """Maps with repeated keys and indefinite-length items are refused."""
    duplicate = b"\xa2\x61a\x01\x61a\x02"
    with pytest.raises(pt.DecodeError):
        pt.CborSerializer().loads(duplicate)
    with pytest.raises(pt.DecodeError):
        pt.CborSerializer().loads(b"\x9f\x01\xff")


def test_unknown_and_missing_fields_are_refused() -> None:
    """A map with an extra field or without a required one is refused."""
    serializer = pt.CborSerializer()
    plain = cbor2.loads(serializer.encode(_post()))
    with pytest.raises(pt.DecodeError, match="unknown"):
        serializer.decode(cbor2.dumps({**plain, "extra": 1}), pt.Post)
    del plain["text"]
    with pytest.raises(pt.DecodeError, match="invalid Post"):
        serializer.decode(cbor2.dumps(plain), pt.Post)


def test_field_validators_run_on_decode() -> None:
    """Decoding runs the class validators: a bad username is a DecodeError."""
    serializer = pt.CborSerializer()
    plain = cbor2.loads(serializer.encode(_post()))
    plain["author"] = "Not Valid"
    with pytest.raises(pt.DecodeError, match="username"):
        serializer.decode(cbor2.dumps(plain), pt.Post)
    plain["author"] = True
    with pytest.raises(pt.DecodeError):
        serializer.decode(cbor2.dumps(plain), pt.Post)


def test_json_is_readable_and_bytes_are_base64() -> None:
    """JsonSerializer writes JSON objects with base64 bytes."""
    post = _post()
    tree = json.loads(pt.JsonSerializer().encode(post))
    assert tree["author"] == "alice"
    assert base64.b64decode(tree["id"]) == post.id
    tree["id"] = "not base64!"
    with pytest.raises(pt.DecodeError):
        pt.JsonSerializer().decode(json.dumps(tree).encode(), pt.Post)


def test_json_refuses_nan_and_non_utf8() -> None:
    """NaN/Infinity and invalid UTF-8 are refused as DecodeError."""
    with pytest.raises(pt.DecodeError):
        pt.JsonSerializer().decode(b'{"physical_ms": NaN}', pt.HybridTimestamp)
    with pytest.raises(pt.DecodeError):
        pt.JsonSerializer().decode(b"\xff\xfe", pt.HybridTimestamp)


def test_serializers_are_interchangeable() -> None:
    """Both serializers satisfy the Serializer protocol and agree on values."""
    for record in [_post()]:
        decoded = {
            type(s).__name__: s.decode(s.encode(record), pt.Post) for s in SERIALIZERS
        }
        assert set(decoded.values()) == {record}


@given(st.one_of(posts, claims, presences, follow_entries))
def test_signature_survives_serialization(record: object) -> None:
    """A record decoded from the wire still verifies: the encoding is not signed."""
    decoded = pt.JsonSerializer().decode(
        pt.JsonSerializer().encode(record), type(record)
    )
    if isinstance(decoded, pt.Post):
        assert decoded.signed_payload() == record.signed_payload()  # type: ignore[attr-defined]
    else:
        decoded.verify()  # type: ignore[attr-defined]
