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


Converter = Callable[[Any], Any]


class _Tree:
    """Converts `attrs` instances to trees of plain values and back.

    The tree uses dicts keyed by field name, lists, and scalars. How bytes
    appear in it is up to the encoding (CBOR has bytes, JSON does not).
    Converters are built once per type from its type hints, so that the
    registry's many small decodes stay cheap.
    """

    def __init__(
        self, bytes_out: Callable[[bytes], Any], bytes_in: Callable[[Any], bytes]
    ) -> None:
        self._bytes_out = bytes_out
        self._bytes_in = bytes_in
        self._encoders: dict[Any, Converter] = {}
        self._decoders: dict[Any, Converter] = {}

    def to_plain(self, value: Any) -> Any:
        """The plain tree of an instance of an `attrs` class."""
        return self._encoder(type(value))(value)

    def from_plain(self, kind: Any, data: Any) -> Any:
        """Build a `kind` from a plain tree; raises `DecodeError` if it does not fit."""
        return self._decoder(kind)(data)

    def _encoder(self, kind: Any) -> Converter:
        encoder = self._encoders.get(kind)
        if encoder is None:
            encoder = self._encoders[kind] = self._make_encoder(kind)
        return encoder

    def _decoder(self, kind: Any) -> Converter:
        decoder = self._decoders.get(kind)
        if decoder is None:
            decoder = self._decoders[kind] = self._make_decoder(kind)
        return decoder

    def _make_encoder(self, kind: Any) -> Converter:
        if attrs.has(kind):
            fields = [(name, self._encoder(hint)) for name, hint in _hints(kind)]
            return lambda v: {name: enc(getattr(v, name)) for name, enc in fields}
        item = _optional_of(kind)
        if item is not None:
            inner = self._encoder(item)
            return lambda v: None if v is None else inner(v)
        item = _collection_of(kind)
        if item is not None:
            inner = self._encoder(item)
            return lambda v: [inner(x) for x in v]
        if kind is bytes:
            return self._bytes_out
        return _identity

    def _make_decoder(self, kind: Any) -> Converter:
        name = getattr(kind, "__name__", str(kind))
        if attrs.has(kind):
            return self._make_attrs_decoder(kind)
        item = _optional_of(kind)
        if item is not None:
            inner = self._decoder(item)
            return lambda data: None if data is None else inner(data)
        item = _collection_of(kind)
        if item is not None:
            inner, build = self._decoder(item), typing.get_origin(kind)

            def decode_collection(data: Any) -> Any:
                if type(data) is not list:
                    raise DecodeError(f"want a list of {item.__name__}")
                return build(inner(x) for x in data)

            return decode_collection
        if kind is bytes:
            bytes_in = self._bytes_in

            def decode_bytes(data: Any) -> bytes:
                try:
                    return bytes_in(data)
                except (TypeError, ValueError, binascii.Error) as exc:
                    raise DecodeError("want bytes") from exc

            return decode_bytes
        if kind is float:
            return lambda data: _exact(data, (float, int), name, float)
        if kind is str:
            return lambda data: _exact(data, (str,), name, _encodable)
        return lambda data: _exact(data, (kind,), name, _identity)

    def _make_attrs_decoder(self, kind: Any) -> Converter:
        fields = {name: self._decoder(hint) for name, hint in _hints(kind)}

        def decode_attrs(data: Any) -> Any:
            if type(data) is not dict:
                raise DecodeError(f"want a map for {kind.__name__}")
            try:
                values = {name: fields[name](value) for name, value in data.items()}
            except KeyError as exc:
                raise DecodeError(f"{kind.__name__}: unknown field {exc}") from None
            except DecodeError as exc:
                raise DecodeError(f"{kind.__name__}: {exc}") from None
            try:
                return kind(**values)
            except (TypeError, ValueError) as exc:
                raise DecodeError(f"invalid {kind.__name__}: {exc}") from exc

        return decode_attrs


def _identity(value: Any) -> Any:
    return value


def _exact(data: Any, kinds: tuple[type, ...], name: str, then: Converter) -> Any:
    if type(data) not in kinds:
        raise DecodeError(f"want {name}")
    return then(data)


def _encodable(text: str) -> str:
    """`text` if it is valid Unicode (JSON can smuggle lone surrogates in)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DecodeError("want valid Unicode text") from None
    return text


def _hints(kind: Any) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(kind)
    return [
        (field.name, hints[field.name]) for field in attrs.fields(kind) if field.init
    ]


def _optional_of(kind: Any) -> Any:
    """X for ``X | None``, else None."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0]
    return None


def _collection_of(kind: Any) -> Any:
    """X for ``tuple[X, ...]`` or ``frozenset[X]``, else None."""
    if typing.get_origin(kind) in (tuple, frozenset):
        return typing.get_args(kind)[0]
    return None


def _reject_tag(decoder: cbor2.CBORDecoder) -> Any:
    raise DecodeError("CBOR semantic tags are not allowed")


class CborSerializer:
    """The default `Serializer`: CBOR (RFC 8949) via `cbor2`.

    Decoding refuses trailing bytes, indefinite-length items, duplicate map
    keys, semantic tags and nesting deeper than 32 levels.
    """

    def __init__(self) -> None:
        self._tree = _CBOR_TREE
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
        self._tree = _JSON_TREE

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


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# One converter cache per encoding, shared by all serializer instances.
_CBOR_TREE = _Tree(bytes_out=_identity, bytes_in=_exact_bytes)
_JSON_TREE = _Tree(bytes_out=_b64encode, bytes_in=_b64decode)
