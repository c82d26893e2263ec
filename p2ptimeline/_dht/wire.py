"""The registry's datagrams: requests and answers, checked into types. Pure.

The framing is rpcudp's, so that a plain `kademlia` node can still ask ours:
a kind byte (0 a request, 1 an answer), a 20-byte message id, and msgpack of
``[name, args]`` (a request) or of the result (an answer).

Our nodes speak a second version of the four RPCs. A request carries one
more argument after kademlia's, `extra`: the *address token* the receiver
gave the sender earlier, or, before the sender has one, padding. An answer
is a map that names the responder (``"id"``) and gives the requester a token
for next time (``"token"``), with the RPC's fields:

* ``ping`` (sender id): no more fields;
* ``store`` (sender id, key, value): ``outcome``; ``held``, the value held,
  as proof, when the outcome is ``stale`` or ``taken``; ``refused``, the
  indices of shard entries it had no room for;
* ``find_node`` (sender id, key): ``nodes``;
* ``find_value`` (sender id, key): ``nodes``, and ``value`` if it holds one.

A token is a keyed hash of the requester's address (as BitTorrent's DHT
tokens and QUIC's address validation tokens): holding it proves that the
requester receives datagrams at the address it sends from. Until a
requester proves that, anything could have sent its request in someone
else's name, so the answer is at most `AMPLIFICATION` times the request's
size (as QUIC's limit before address validation): nodes are dropped from the
end of the list, and a value or proof that does not fit is *withheld*
(``"withheld": true``), so the requester asks again with its new token.
Requests without a token are padded to `PADDED_SIZE` bytes so that a first
answer usually fits. Plain kademlia requests (without `extra`) are answered
in kademlia's shapes, within the same limit.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable, Hashable
from typing import Any

import attrs
import msgpack

from .._models import Presence, UsernameClaim
from .records import Outcome, RegistryValue

__all__ = [
    "AMPLIFICATION",
    "ID_SIZE",
    "MAX_NODES_PER_ANSWER",
    "PADDED_SIZE",
    "RPC_ARITY",
    "TOKEN_SIZE",
    "FoundReply",
    "NodeTriple",
    "Request",
    "StoreReply",
    "Tokens",
    "answer_bytes",
    "newer_seq",
    "pack",
    "padding",
    "parse_found",
    "parse_ping",
    "parse_request",
    "parse_stored",
    "source_of",
    "unpack",
]

ID_SIZE = 20
"""Bytes of a node id or a key."""
TOKEN_SIZE = 8
"""Bytes of an address token."""
AMPLIFICATION = 3
"""Most bytes sent in answer to an unproven address, per byte received."""
PADDED_SIZE = 1200
"""Size a request without a token is padded to: room for a first answer
three times as large, and still one IP packet on any path."""
MAX_NODES_PER_ANSWER = 64
"""Longest node list read from an answer (a lookup then keeps the `ksize`
closest)."""
RPC_ARITY = {"ping": 1, "store": 3, "find_node": 2, "find_value": 2}
"""kademlia's argument count of each RPC, the sender id included."""
_TOKEN_ROTATION = 300.0  # seconds each token secret is used for

NodeTriple = tuple[bytes, str, int]
"""A node as it travels: ``(id, ip, port)``."""


def pack(value: Any) -> bytes:
    """msgpack, as rpcudp writes it (with `umsgpack`), but 20x faster."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """msgpack to Python values; raises on anything malformed."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)


# Requests


@attrs.frozen
class Request:
    """A request, checked for shape (not yet for meaning)."""

    name: str
    """The RPC: ``ping``, ``store``, ``find_node`` or ``find_value``."""
    sender_id: bytes
    """The node id the sender claims."""
    args: tuple[Any, ...]
    """The RPC's other arguments, as sent."""
    extra: bytes | None
    """Our extension argument (a token or padding); None from plain kademlia."""


def parse_request(message: object) -> Request:
    """The request in an unpacked datagram.

    Raises:
        ValueError: It is not a request of a known RPC, with the right
            number of arguments and a 20-byte sender id.
    """
    if not (
        isinstance(message, list)
        and len(message) == 2
        and isinstance(message[0], str)
        and isinstance(message[1], list)
    ):
        raise ValueError("not an RPC request")
    name, args = message
    arity = RPC_ARITY.get(name)
    if arity is None:
        raise ValueError(f"unknown RPC {name[:40]!r}")
    extra = None
    if len(args) == arity + 1 and isinstance(args[-1], bytes):
        extra = args.pop()
    if len(args) != arity:
        raise ValueError(f"{name} takes {arity} arguments")
    sender = args[0]
    if not is_id(sender):
        raise ValueError("node ids and keys are 20 bytes")
    return Request(name=name, sender_id=sender, args=tuple(args[1:]), extra=extra)


def padding(unpadded: int) -> bytes:
    """The `extra` argument that pads a request of `unpadded` bytes (without
    it) to `PADDED_SIZE`; never the size of a token."""
    return bytes(max(TOKEN_SIZE * 2, PADDED_SIZE - unpadded - 3))


class Tokens:
    """Address tokens: a keyed hash of an address, in a secret that changes
    every five minutes (the previous one is still accepted).

    Args:
        secret: Random bytes (a fresh secret by default); tests pass one.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self._secrets = [secret or os.urandom(16)] * 2
        self._epoch: int | None = None

    def issue(self, address: tuple[str, int], now: float) -> bytes:
        """The token of `address` at monotonic time `now`."""
        self._rotate(now)
        return self._token(self._secrets[0], address)

    def check(self, address: tuple[str, int], token: bytes, now: float) -> bool:
        """Whether `token` is `address`'s, from this secret or the previous one."""
        self._rotate(now)
        return len(token) == TOKEN_SIZE and any(
            hmac.compare_digest(token, self._token(secret, address))
            for secret in self._secrets
        )

    def _rotate(self, now: float) -> None:
        epoch = int(now // _TOKEN_ROTATION)
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch:
            previous = self._secrets[0] if epoch == self._epoch + 1 else os.urandom(16)
            self._secrets = [os.urandom(16), previous]
            self._epoch = epoch

    @staticmethod
    def _token(secret: bytes, address: tuple[str, int]) -> bytes:
        text = f"{address[0]}|{address[1]}".encode()
        return hmac.new(secret, text, hashlib.sha256).digest()[:TOKEN_SIZE]


def source_of(address: tuple[str, int]) -> Hashable:
    """Who an address counts as, for storage quotas: its IP address, but on
    loopback (where every node of a test network shares one IP) the whole
    address."""
    try:
        if ipaddress.ip_address(address[0]).is_loopback:
            return address
    except ValueError:
        pass
    return address[0]


# Answers


def answer_bytes(
    answer: dict[str, Any], *, plain: str | None, budget: int | None
) -> bytes:
    """Pack our answer to a request, within `budget` bytes if one is given.

    Args:
        answer: The fields of our (version 2) answer.
        plain: The RPC's name if the request was a plain kademlia one: the
            answer then takes kademlia's shape for that RPC.
        budget: Most bytes the packed answer may take (an unproven
            requester), or None.

    What does not fit is left out: a value or a proof first (marked
    ``withheld``), then nodes from the end of the list (the farthest).
    """
    answer = dict(answer)
    while True:
        data = pack(answer if plain is None else _plain(plain, answer))
        if budget is None or len(data) <= budget:
            return data
        for field in ("value", "held"):
            if field in answer:
                del answer[field]
                answer["withheld"] = True
                break
        else:
            nodes = answer.get("nodes")
            if not nodes:
                return data  # nothing left to drop: the smallest answer there is
            excess = len(data) - budget
            answer["nodes"] = nodes[: max(0, len(nodes) - 1 - excess // 40)]


def _plain(name: str, answer: dict[str, Any]) -> Any:
    """kademlia's shape of an answer."""
    if name == "ping":
        return answer["id"]
    if name == "store":
        return [answer["outcome"], None]
    if name == "find_value" and "value" in answer:
        return {"value": answer["value"]}
    return answer["nodes"]


@attrs.frozen
class _Envelope:
    """What every answer of ours carries."""

    responder: bytes
    token: bytes
    fields: dict[str, Any]


def _envelope(data: object) -> _Envelope | None:
    if not isinstance(data, dict):
        return None
    responder, token = data.get("id"), data.get("token")
    if not is_id(responder) or not (
        isinstance(token, bytes) and len(token) == TOKEN_SIZE
    ):
        return None
    assert isinstance(responder, bytes)
    return _Envelope(responder, token, data)


def parse_ping(data: object) -> _Envelope | None:
    """Our answer to ``ping``, or None if it is not one."""
    return _envelope(data)


@attrs.frozen
class FoundReply:
    """An answer to ``find_node`` or ``find_value``, checked."""

    responder: bytes
    """The responder's node id, as it says."""
    token: bytes
    """Our token for the responder's next request."""
    nodes: tuple[NodeTriple, ...]
    """The nodes it named (well formed; at most `MAX_NODES_PER_ANSWER`)."""
    value: RegistryValue | None
    """The value it holds, if it sent one that is valid."""
    invalid: str | None
    """Why the value it sent was dropped, if it was."""
    withheld: bool
    """It holds a value it did not send (we had no token): ask again."""


def parse_found(
    data: object, decode: Callable[[bytes], RegistryValue]
) -> FoundReply | None:
    """Our answer to ``find_node``/``find_value``, or None if it is not one.

    Args:
        data: The unpacked answer.
        decode: Decodes and checks a value (raises `ValueError` or a
            `RemoteError` when it is invalid).
    """
    envelope = _envelope(data)
    if envelope is None:
        return None
    nodes = node_list(envelope.fields.get("nodes"))
    if nodes is None:
        return None
    value, invalid = None, None
    raw = envelope.fields.get("value")
    if raw is not None:
        value, invalid = _decoded(raw, decode)
    return FoundReply(
        responder=envelope.responder,
        token=envelope.token,
        nodes=tuple(nodes),
        value=value,
        invalid=invalid,
        withheld=envelope.fields.get("withheld") is True,
    )


@attrs.frozen
class StoreReply:
    """An answer to ``store``, checked."""

    responder: bytes
    """The responder's node id, as it says."""
    token: bytes
    """Our token for the responder's next request."""
    outcome: Outcome
    """What the node did."""
    held: RegistryValue | None
    """For ``stale`` and ``taken``: the value the node holds, valid and
    authentic (else the reply is dropped: a bare claim proves nothing)."""
    refused: tuple[int, ...]
    """For a shard: indices of the entries it had no room for."""
    withheld: bool
    """A proof was left out (we had no token): ask again."""


def parse_stored(
    data: object, decode: Callable[[bytes], RegistryValue]
) -> StoreReply | None:
    """Our answer to ``store``, or None if it is not one or proves nothing."""
    envelope = _envelope(data)
    if envelope is None:
        return None
    fields = envelope.fields
    try:
        outcome = Outcome(fields.get("outcome"))
    except ValueError:
        return None
    withheld = fields.get("withheld") is True
    held = None
    if outcome in (Outcome.STALE, Outcome.TAKEN) and not withheld:
        raw = fields.get("held")
        if raw is None:
            return None
        held, _ = _decoded(raw, decode)
        if held is None:
            return None
    refused = fields.get("refused", [])
    if not isinstance(refused, list) or not all(
        type(i) is int and 0 <= i < 1024 for i in refused
    ):
        return None
    return StoreReply(
        responder=envelope.responder,
        token=envelope.token,
        outcome=outcome,
        held=held,
        refused=tuple(refused),
        withheld=withheld,
    )


def _decoded(
    raw: object, decode: Callable[[bytes], RegistryValue]
) -> tuple[RegistryValue | None, str | None]:
    if not isinstance(raw, bytes):
        return None, "not bytes"
    try:
        return decode(raw), None
    except Exception as exc:  # any error of a decoder of remote bytes
        return None, str(exc)[:200]


def node_list(data: object) -> list[NodeTriple] | None:
    """The node triples in `data`, or None if it is not a valid node list."""
    if not isinstance(data, list) or len(data) > MAX_NODES_PER_ANSWER:
        return None
    nodes = []
    for item in data:
        if not (isinstance(item, list | tuple) and len(item) == 3):
            return None
        node_id, ip, port = item
        if not (is_id(node_id) and isinstance(ip, str) and is_port(port)):
            return None
        if not is_ip(ip):
            return None
        nodes.append((node_id, ip, port))
    return nodes


def is_id(value: object) -> bool:
    """Whether `value` is a node id or key: 20 bytes."""
    return isinstance(value, bytes) and len(value) == ID_SIZE


def is_port(value: object) -> bool:
    """Whether `value` is a port number other than 0."""
    return type(value) is int and 0 < value < 65536


_ip_cache: dict[str, bool] = {}


def is_ip(text: str) -> bool:
    """Whether `text` is an IPv4 or IPv6 address (not a host name)."""
    known = _ip_cache.get(text)
    if known is None:
        try:
            ipaddress.ip_address(text)
            known = True
        except ValueError:
            known = False
        if len(_ip_cache) > 4096:
            _ip_cache.clear()
        _ip_cache[text] = known
    return known


def newer_seq(replies: list[StoreReply], ours: UsernameClaim | Presence) -> int | None:
    """The highest `seq` that stale replies prove a node holds for our
    record `ours` (another version, as new or newer), if any.

    A bare number proves nothing: only a held record counts, which the
    protocol checked where it arrived (signed by its key, under the key of
    `ours`, and within the clock's bound of `MAX_SEQ_AHEAD_MS`). Our own
    record shown back to us proves nothing either.
    """
    held = [
        record.seq
        for reply in replies
        if reply.outcome is Outcome.STALE and reply.held is not None
        for record in (reply.held.claim or reply.held.presence,)
        if record is not None and record != ours and record.seq >= ours.seq
    ]
    return max(held, default=None)
