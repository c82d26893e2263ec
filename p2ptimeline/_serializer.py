"""Pluggable encodings of the data model for the wire and for storage.

A `Serializer` turns any of the library's `attrs` classes into bytes and
back. Decoding is driven by the expected type: the decoded tree must have
exactly the shape of that type, and the class's own validators then check
each field, so untrusted bytes yield either a well-formed value or a
`DecodeError`, never a crash somewhere deeper.

Two implementations ship: `CborSerializer` (the default, compact) and
`JsonSerializer` (readable; bytes as base64). Every peer of one network must
use the same one. Signatures never depend on this choice: they cover the
fixed canonical encoding of `p2ptimeline._models.signing_payload`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import types
import typing
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs
import cbor2

from ._errors import DecodeError

__all__ = ["CborSerializer", "JsonSerializer", "Serializer"]

T = TypeVar("T")

_MAX_DEPTH = 32
# Tags cbor2 would otherwise turn into rich objects (dates, regular
# expressions, shared references, ...). None of them belongs in our data.
_CBOR_SEMANTIC_TAGS = frozenset(
    {0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258, 260, 261, 1004, 55799}
)


class Serializer(Protocol):
    """Encodes the library's `attrs` data classes to bytes and back.

    Contract: ``decode(encode(v), type(v)) == v`` for every value `v` of the
    data model, and `decode` raises `DecodeError` (only) for bytes that do
    not hold a valid value of the asked type.
    """

    def encode(self, value: Any) -> bytes:
        """Encode an instance of one of the library's `attrs` classes."""
        ...

    def decode(self, data: bytes, kind: type[T]) -> T:
        """Decode `data` as a `kind`.

        Raises:
            DecodeError: `data` is not a valid encoding of a `kind`.
        """
        ...


class _Tree:
    """Converts `attrs` instances to trees of plain values and back.

    The tree uses dicts keyed by field name, lists, and scalars. How bytes
    appear in it is up to the encoding (CBOR has bytes, JSON does not).
    """

    def __init__(
        self, bytes_out: Callable[[bytes], Any], bytes_in: Callable[[Any], bytes]
    ) -> None:
        self._bytes_out = bytes_out
        self._bytes_in = bytes_in

    def to_plain(self, value: Any) -> Any:
        if attrs.has(type(value)):
            return {
                field.name: self.to_plain(getattr(value, field.name))
                for field in attrs.fields(type(value))
            }
        if isinstance(value, tuple | list | frozenset):
            return [self.to_plain(item) for item in value]
        if isinstance(value, bytes):
            return self._bytes_out(value)
        return value

    def from_plain(self, kind: Any, data: Any, path: str = "$") -> Any:
        origin = typing.get_origin(kind)
        if attrs.has(kind):
            return self._from_plain_attrs(kind, data, path)
        if origin is types.UnionType or origin is typing.Union:
            for option in typing.get_args(kind):
                if option is type(None) and data is None:
                    return None
            (inner,) = (a for a in typing.get_args(kind) if a is not type(None))
            return self.from_plain(inner, data, path)
        if origin is tuple or origin is frozenset:
            if type(data) is not list:
                raise DecodeError(f"{path}: want a list")
            item_kind = typing.get_args(kind)[0]
            items = (self.from_plain(item_kind, x, f"{path}[]") for x in data)
            return origin(items)
        if kind is bytes:
            try:
                return self._bytes_in(data)
            except (TypeError, ValueError, binascii.Error) as exc:
                raise DecodeError(f"{path}: want bytes") from exc
        if kind in (int, str, bool) and type(data) is kind:
            return data
        if kind is float and type(data) in (float, int):
            return float(data)
        raise DecodeError(f"{path}: want {getattr(kind, '__name__', kind)}")

    def _from_plain_attrs(self, kind: Any, data: Any, path: str) -> Any:
        if type(data) is not dict:
            raise DecodeError(f"{path}: want a map for {kind.__name__}")
        hints = _field_types(kind)
        unknown = data.keys() - hints.keys()
        if unknown:
            raise DecodeError(f"{path}: unknown fields {sorted(map(str, unknown))}")
        values = {
            name: self.from_plain(hints[name], value, f"{path}.{name}")
            for name, value in data.items()
        }
        try:
            return kind(**values)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"{path}: invalid {kind.__name__}: {exc}") from exc


@functools.cache
def _field_types(kind: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(kind)
    return {field.name: hints[field.name] for field in attrs.fields(kind) if field.init}


def _reject_tag(decoder: cbor2.CBORDecoder) -> Any:
    raise DecodeError("CBOR semantic tags are not allowed")


class CborSerializer:
    """The default `Serializer`: CBOR (RFC 8949) via `cbor2`.

    Decoding refuses trailing bytes, indefinite-length items, duplicate map
    keys, semantic tags and nesting deeper than 32 levels.
    """

    def __init__(self) -> None:
        self._tree = _Tree(bytes_out=lambda b: b, bytes_in=_exact_bytes)
        self._no_tags = dict.fromkeys(_CBOR_SEMANTIC_TAGS, _reject_tag)

    def encode(self, value: Any) -> bytes:
        """Encode `value` as CBOR."""
        return cbor2.dumps(self._tree.to_plain(value))

    def decode(self, data: bytes, kind: type[T]) -> T:
        """Decode CBOR `data` as a `kind` (see `Serializer.decode`)."""
        return typing.cast(T, self._tree.from_plain(kind, self.loads(data)))

    def loads(self, data: bytes) -> Any:
        """Decode `data` into a plain tree, with the same limits as `decode`.

        Raises:
            DecodeError: `data` is not one complete, acceptable CBOR item.
        """
        stream = io.BytesIO(data)
        try:
            tree = cbor2.CBORDecoder(
                stream,
                tag_hook=_refuse_unknown_tag,
                semantic_decoders=self._no_tags,  # type: ignore[arg-type]
                max_depth=_MAX_DEPTH,
                allow_indefinite=False,
                allow_duplicate_keys=False,
                strict_hashable_types=True,
            ).decode()
        except DecodeError:
            raise
        except Exception as exc:  # any failure to parse untrusted bytes
            raise DecodeError(f"invalid CBOR: {exc}") from exc
        if stream.tell() != len(data):
            raise DecodeError("trailing bytes after the CBOR item")
        return tree


def _refuse_unknown_tag(tag: cbor2.CBORTag, immutable: bool) -> Any:
    raise DecodeError(f"unexpected CBOR tag {tag.tag}")


def _exact_bytes(data: Any) -> bytes:
    if type(data) is not bytes:
        raise TypeError("not bytes")
    return data


class JsonSerializer:
    """A readable `Serializer`: UTF-8 JSON, with bytes as base64 strings."""

    def __init__(self) -> None:
        self._tree = _Tree(
            bytes_out=lambda b: base64.b64encode(b).decode("ascii"),
            bytes_in=_b64decode,
        )

    def encode(self, value: Any) -> bytes:
        """Encode `value` as compact JSON."""
        plain = self._tree.to_plain(value)
        return json.dumps(plain, separators=(",", ":"), ensure_ascii=False).encode()

    def decode(self, data: bytes, kind: type[T]) -> T:
        """Decode JSON `data` as a `kind` (see `Serializer.decode`)."""
        try:
            tree = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except Exception as exc:  # any failure to parse untrusted bytes
            raise DecodeError(f"invalid JSON: {exc}") from exc
        return typing.cast(T, self._tree.from_plain(kind, tree))


def _b64decode(data: Any) -> bytes:
    if type(data) is not str:
        raise TypeError("not a base64 string")
    return base64.b64decode(data, validate=True)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
