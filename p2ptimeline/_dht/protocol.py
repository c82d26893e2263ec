"""The UDP side of the registry: `kademlia`'s protocol, hardened for an open network.

`RegistryProtocol` extends `kademlia.protocol.KademliaProtocol` (itself an
`rpcudp.RPCProtocol`). It keeps rpcudp's framing and the four Kademlia RPCs,
in the second version described in `wire` (address tokens, answers
that name their responder), and changes what is unsafe or wrong for a
registry on an open network:

* Datagrams are handled synchronously and defensively: anything that does
  not parse, names an unknown RPC or carries arguments of the wrong shape is
  dropped with a log line (rpcudp raises inside a task for some of these).
* An address that has not proven it receives our datagrams (with a token)
  gets at most three times the bytes it sent (`wire.AMPLIFICATION`),
  cannot store anything, and does not enter the routing table. A node that
  proves its address is pinged, and joins the routing table, and is handed
  the values it should hold, only once it answers: a contact is always a
  node that answered a request of ours.
* ``store`` goes through `RecordStorage`, which validates, merges and keeps
  within a byte budget and per-sender quotas; a node refuses keys it is far
  from (it knows `ksize` nodes closer to them). A ``stale`` or ``taken``
  answer carries the value held, so the writer can check it.
* Answers from remote nodes are checked into typed replies (`FoundReply`,
  `StoreReply`) where they arrive: a malformed answer is no answer, a
  responder that is not the node we asked is not taken for it, an invalid
  value is dropped.
* Hand-over of values to newcomers (paper, section 2.5) finds the keys near
  the newcomer by binary search, and is bounded per newcomer and in bytes
  per second.
* Known `kademlia` 2.2.3 bugs are worked around (see `docs/architecture.md`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from rpcudp.protocol import RPCProtocol

from .._ratelog import RateLimitedLog
from .._tasks import Tasks
from .records import Outcome, RegistryValue
from .routing import RegistryRoutingTable
from .storage import RecordStorage, StoreResult, decode_value
from .wire import (
    AMPLIFICATION,
    ID_SIZE,
    PADDED_SIZE,
    FoundReply,
    Request,
    StoreReply,
    Tokens,
    answer_bytes,
    is_id,
    pack,
    padding,
    parse_found,
    parse_ping,
    parse_request,
    parse_stored,
    source_of,
    unpack,
)

__all__ = ["MAX_DATAGRAM", "UNREACHABLE_FOR", "RegistryProtocol"]

log = logging.getLogger("p2ptimeline.dht")

UNREACHABLE_FOR = 15.0
"""Seconds a node that did not answer (twice) is treated as gone."""
MAX_DATAGRAM = 8192 + 64
"""Largest datagram read; rpcudp itself refuses to send requests over 8 KB."""
_REQUEST, _RESPONSE = b"\x00", b"\x01"
_CHECK_AGAIN_AFTER = 30.0  # seconds before a requester is pinged again
_MAX_CHECKS = 32  # pings of new requesters in flight at once
_HANDOVER_PER_NODE = 64  # values handed to one newcomer at most
_HANDOVER_SCAN = 1024  # stored keys examined per newcomer at most
_HANDOVER_RATE = 64 * 1024  # bytes per second handed over, on average
_HANDOVER_BURST = 256 * 1024  # ... and at most in one burst
_TOKENS_HELD = 10_000  # tokens of other nodes remembered
_PING_SIZE = 64  # bytes of a ping datagram, at most
_SMALLEST_ANSWER = 64  # bytes of our smallest answer (id, token, outcome), about


class RegistryProtocol(KademliaProtocol):  # type: ignore[misc]  # untyped base
    """The hardened Kademlia protocol of a registry node.

    Args:
        source_node: This node.
        storage: Where values are kept.
        ksize: Kademlia's k.
        wait_timeout: Seconds a call waits for its answer.
        clock: The current time in seconds since the epoch (checks the
            `seq` of values read and written).
    """

    storage: RecordStorage
    transport: asyncio.DatagramTransport | None

    def __init__(
        self,
        source_node: Node,
        storage: RecordStorage,
        ksize: int,
        *,
        wait_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        RPCProtocol.__init__(self, wait_timeout=wait_timeout)
        self.router = RegistryRoutingTable(self, ksize, source_node)
        self.storage = storage
        self.source_node = source_node
        self._clock = clock
        self._tasks = Tasks(log)
        self._closed: asyncio.Future[None] = asyncio.Future()
        # address -> when it last failed to answer. Lookups skip such nodes
        # for a while instead of waiting for them again and again: other
        # nodes keep naming a dead node until their own requests to it fail.
        self._unreachable: dict[tuple[str, int], float] = {}
        # address -> when each call to it now waiting for an answer was sent,
        # oldest first: a node silent for half the timeout is not waited for
        # by other lookups meanwhile (see `recently_unreachable`).
        self._asking: dict[tuple[str, int], list[float]] = {}
        self._welcomed: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._tokens = Tokens()
        # address -> the token it gave us, for our next requests to it
        self._held_tokens: collections.OrderedDict[tuple[str, int], bytes] = (
            collections.OrderedDict()
        )
        # address -> when it was last pinged because it asked us something
        self._checked: collections.OrderedDict[tuple[str, int], float] = (
            collections.OrderedDict()
        )
        self._checks = 0
        self._log = RateLimitedLog(log)  # for what remote parties trigger
        self._handover_budget = float(_HANDOVER_BURST)
        self._handover_refilled = time.monotonic()

    # Lifecycle

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` in a task this protocol owns (cancelled by `close`);
        once closed, `coro` is closed instead."""
        if self._tasks.closed:
            coro.close()
        else:
            self._tasks.spawn(coro)

    @property
    def wait_timeout(self) -> float:
        """Seconds a call waits for its answer."""
        return float(self._wait_timeout)

    def adopt(self, task: asyncio.Future[Any]) -> None:
        """Own a running task: `close` cancels it (at once if closed)."""
        if self._tasks.closed:
            task.cancel()
        else:
            self._tasks.spawn(task)

    async def close(self) -> None:
        """Close the socket, fail pending calls and cancel owned tasks; wait
        until the socket is closed and the tasks are done. Idempotent.

        Everything is released even if the caller is cancelled meanwhile
        (the socket and the tasks may then finish closing after it returns).
        """
        closing = self.transport is not None
        if self.transport is not None:
            self.transport.close()
        for future, timeout in list(self._outstanding.values()):
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        self._tasks.cancel()
        try:
            if closing:
                # The socket closes on the next loop iteration: wait for it,
                # so the port is free once close() returns.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await asyncio.shield(self._closed)
        finally:
            await self._tasks.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self._closed.done():
            self._closed.set_result(None)

    # Incoming datagrams

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not ID_SIZE + 2 <= len(data) <= MAX_DATAGRAM:
            self._log.info(
                "size", "dropped a datagram of %d bytes from %s", len(data), addr
            )
            return
        kind, msg_id = data[:1], data[1 : ID_SIZE + 1]
        try:
            message = unpack(data[ID_SIZE + 1 :])
        except Exception as exc:  # anything msgpack raises on garbage
            self._log.info(
                "undecodable", "dropped an undecodable datagram from %s: %r", addr, exc
            )
            return
        if kind == _REQUEST:
            self._answer(msg_id, message, addr, len(data))
        elif kind == _RESPONSE:
            self._accept_response(msg_id, message, addr)
        else:
            self._log.info("kind", "dropped a datagram of unknown kind from %s", addr)

    def _answer(
        self, msg_id: bytes, message: object, addr: tuple[str, int], size: int
    ) -> None:
        try:
            request = parse_request(message)
            now = time.monotonic()
            proven = request.extra is not None and self._tokens.check(
                addr, request.extra, now
            )
            # An unproven address is pinged only if its request pays for the
            # ping (sent twice if unanswered) as well as for the answer.
            spare = AMPLIFICATION * size - ID_SIZE - 1 - 2 * _PING_SIZE
            checking = self._heard_from(
                Node(request.sender_id, addr[0], addr[1]),
                proven,
                check=proven or spare >= _SMALLEST_ANSWER,
            )
            answer = self._handle(request, addr, proven)
        except (TypeError, ValueError) as exc:
            self._log.info("request", "dropped a bad request from %s: %s", addr, exc)
            return
        answer["id"] = self.source_node.id
        answer["token"] = self._tokens.issue(addr, now)
        budget = None
        if not proven:  # what we send there: the answer, and maybe two pings
            budget = AMPLIFICATION * size - ID_SIZE - 1
            if checking:
                budget -= 2 * _PING_SIZE
        data = answer_bytes(
            answer,
            plain=None if request.extra is not None else request.name,
            budget=budget,
        )
        if self.transport is not None:
            self.transport.sendto(_RESPONSE + msg_id + data, addr)

    def _handle(
        self, request: Request, addr: tuple[str, int], proven: bool
    ) -> dict[str, Any]:
        """Our answer's fields; raises TypeError/ValueError on bad arguments."""
        name, args = request.name, request.args
        if name == "ping":
            return {}
        key = _key(args[0])
        if name == "store":
            result = self._store(key, args[1], addr, proven)
            answer: dict[str, Any] = {"outcome": result.outcome.value}
            if result.held is not None:
                answer["held"] = result.held
            if result.refused:
                answer["refused"] = list(result.refused)
            if result.reason == _UNPROVEN:
                answer["withheld"] = True
            return answer
        neighbors = self.router.find_neighbors(
            Node(key), exclude=Node(request.sender_id, addr[0], addr[1])
        )
        answer = {"nodes": [tuple(n) for n in neighbors]}
        if name == "find_value":
            value = self.storage.get(key)
            if value is not None:
                answer["value"] = value
        return answer

    def _store(
        self, key: bytes, value: object, addr: tuple[str, int], proven: bool
    ) -> StoreResult:
        if not isinstance(value, bytes):
            raise TypeError("a value is bytes")
        if not proven:  # its sender may be anyone: nothing is charged to it
            return StoreResult(Outcome.REFUSED, reason=_UNPROVEN)
        if self._is_far(key):
            return StoreResult(Outcome.REFUSED, reason="far from the key")
        result = self.storage.offer(
            key, value, source=source_of(addr), now_ms=self._now_ms()
        )
        if result.outcome is Outcome.INVALID:
            self._log.info(
                "value", "refused a value for %s: %s", key.hex()[:12], result.reason
            )
        return result

    def _is_far(self, key: bytes) -> bool:
        """Whether `ksize` contacts are closer to `key` than this node: the
        value belongs to them, and taking it would only let anyone fill this
        node's storage with keys of their choosing."""
        target = int.from_bytes(key)
        nearest = self.router.find_neighbors(Node(key))
        mine = self.source_node.long_id ^ target
        return len(nearest) >= self.router.ksize and all(
            n.long_id ^ target < mine for n in nearest
        )

    def _accept_response(self, msg_id: bytes, data: Any, address: Any) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is None:
            log.debug("dropped an unexpected response from %s", address)
            return
        future, timeout = pending
        timeout.cancel()
        if not future.done():
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result((False, None))

    # The routing table: contacts are nodes that answered us

    def _heard_from(self, node: Node, proven: bool, *, check: bool) -> bool:
        """A node asked us something: note it if it is a contact and proved
        its address; if it is new here (or back at another address) and
        `check`, ping it (at most once in `_CHECK_AGAIN_AFTER` seconds per
        address), and take it in if it answers. Whether a ping is sent."""
        address = (node.ip, node.port)
        if self.router.knows(node):
            if proven:
                self._unreachable.pop(address, None)  # it is back
                self.router.heard_from(node)
            return False
        if not check:
            return False
        checked = self._checked.get(address)
        now = time.monotonic()
        if self._checks >= _MAX_CHECKS or (
            checked is not None and now - checked < _CHECK_AGAIN_AFTER
        ):
            return False
        self._checked[address] = now
        self._checked.move_to_end(address)
        while len(self._checked) > _TOKENS_HELD:
            self._checked.popitem(last=False)
        self._checks += 1
        self.spawn(self._check(node))
        return True

    async def _check(self, node: Node) -> None:
        try:
            await self.call_ping(node)
        finally:
            self._checks -= 1

    def welcome_if_new(self, node: Node) -> None:
        """Take in a node that just answered a request of ours; hand it the
        values it should hold if it is new.

        As in kademlia (section 2.5 of the paper: a node hands over a value
        when the newcomer is among the k closest to its key and it is the
        closest itself), but only to nodes that answered us, once per node
        (and again when it comes back at another address, restarted and
        maybe with nothing stored), for the keys near it only, and within a
        budget of bytes per second.
        """
        restarted = self.router.heard_from(node)  # with an empty storage, maybe
        new = self.router.is_new_node(node) and node.id not in self._welcomed
        if restarted or new:
            self._welcomed[node.id] = None
            if len(self._welcomed) > 10_000:
                self._welcomed.popitem(last=False)
            self._hand_over(node)
        self.router.add_contact(node)

    def _hand_over(self, newcomer: Node) -> None:
        now = time.monotonic()
        self._handover_budget = min(
            _HANDOVER_BURST,
            self._handover_budget + (now - self._handover_refilled) * _HANDOVER_RATE,
        )
        self._handover_refilled = now
        sent = 0
        for key in self._keys_near(newcomer):
            if sent >= _HANDOVER_PER_NODE:
                break
            if not self._should_hand_over(newcomer, key):
                continue
            raw = self.storage.get(key)
            if raw is None:
                continue
            if len(raw) > self._handover_budget:
                self._log.info(
                    "hand-over",
                    "hand-over budget spent: %s gets the rest later",
                    newcomer,
                )
                break
            self._handover_budget -= len(raw)
            sent += 1
            self.spawn(self.call_store(newcomer, key, raw))

    def _keys_near(self, newcomer: Node) -> list[bytes]:
        """Stored keys the newcomer may be among the k closest to: those
        sharing its id's prefix down to a little beyond the distance to its
        k-th nearest contact (by binary search over the sorted keys)."""
        nearest = self.router.find_neighbors(newcomer, exclude=newcomer)
        bits = 160
        if len(nearest) >= self.router.ksize:
            radius = max(n.long_id ^ newcomer.long_id for n in nearest)
            bits = min(160, radius.bit_length() + 2)
        low = newcomer.long_id >> bits << bits
        return self.storage.keys_between(low, low + (1 << bits))[:_HANDOVER_SCAN]

    def _should_hand_over(self, newcomer: Node, key: bytes) -> bool:
        # The newcomer itself is among the contacts when it came back (at
        # the address it is excluded by).
        nearest = self.router.find_neighbors(Node(key), exclude=newcomer)
        target = int.from_bytes(key)
        if nearest and nearest[0].long_id ^ target < self.source_node.long_id ^ target:
            return False  # a closer contact hands it over, if anyone does
        if len(nearest) < self.router.ksize:
            return True
        return bool(newcomer.long_id ^ target < nearest[-1].long_id ^ target)

    # Outgoing calls

    async def call(
        self, address: tuple[str, int], name: str, *args: Any, force: bool = False
    ) -> tuple[bool, Any]:
        """Call `name` on `address`; returns ``(answered, result)``.

        UDP loses datagrams: a request not answered within half the RPC
        timeout is sent once more, under the same id, and the first answer to
        either copy counts, so one lost datagram does not fail the call and a
        slow node still has the whole timeout. A node whose last call failed
        is not asked again for `UNREACHABLE_FOR` seconds (the call fails at
        once), unless `force` is set or every contact is in that state.
        """
        if self.transport is None:
            return (False, None)
        if not force and self.recently_unreachable(address):
            return (False, None)
        payload = pack([name, list(args)])
        if len(payload) > 8192:
            raise ValueError(f"{name} request of {len(payload)} bytes is too large")
        msg_id = os.urandom(ID_SIZE)
        datagram = _REQUEST + msg_id + payload
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        timeout = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        resend = loop.call_later(
            self._wait_timeout / 2, self._resend, msg_id, datagram, address
        )
        self._outstanding[msg_id] = (future, timeout)
        self.transport.sendto(datagram, address)
        sent = time.monotonic()
        self._asking.setdefault(address, []).append(sent)
        try:
            result = await future
        finally:
            asking = self._asking[address]
            asking.remove(sent)
            if not asking:
                del self._asking[address]
            resend.cancel()
            if not future.done():  # cancelled while waiting
                timeout.cancel()
                self._outstanding.pop(msg_id, None)
        if result[0]:
            self._unreachable.pop(address, None)
        else:
            self._unreachable[address] = time.monotonic()
            if len(self._unreachable) > 10_000:
                self._unreachable.pop(next(iter(self._unreachable)))
        return result

    def _resend(self, msg_id: bytes, datagram: bytes, address: tuple[str, int]) -> None:
        if msg_id in self._outstanding and self.transport is not None:
            self.transport.sendto(datagram, address)

    def forgive(self, nodes: Iterable[Node], marked_before: float) -> bool:
        """Forget that those of `nodes` marked unreachable before the time
        `marked_before` (of `time.monotonic`) failed to answer; whether any
        were."""
        forgiven = False
        for node in nodes:
            address = (node.ip, node.port)
            if self._unreachable.get(address, marked_before) < marked_before:
                del self._unreachable[address]
                forgiven = True
        return forgiven

    def recently_unreachable(
        self, address: tuple[str, int], *, silent: bool = False
    ) -> bool:
        """Whether calls to `address` fail at once for now (it did not answer
        lately, and some contact did not fail).

        With `silent`, also whether a call to it has been waiting for half
        the timeout: the next lookups then pass it over at once, as the one
        waiting does, instead of each waiting that long for the same
        silent node until its call fails.
        """
        now = time.monotonic()
        failed = self._unreachable.get(address)
        if failed is not None and now - failed >= UNREACHABLE_FOR:
            del self._unreachable[address]
            failed = None
        asking = self._asking.get(address) if silent else None
        if failed is None and (
            asking is None or now - asking[0] < self._wait_timeout / 2
        ):
            return False
        # Never cut this node off from everyone: if no contact is left that
        # is not in this state, ask anyway.
        return any(
            (n.ip, n.port) not in self._unreachable for n in self.router.contacts()
        )

    async def _rpc(
        self, node: Node, name: str, *args: Any, force: bool = False
    ) -> tuple[bool, Any]:
        """Call `name` on `node` in our version of the RPC: with the token
        it gave us, or padding if we have none. Returns ``(answered,
        unpacked answer)``, and whether a token was sent."""
        address = (node.ip, node.port)
        extra = self._held_tokens.get(address)
        if extra is None and name.startswith("find"):
            unpadded = len(pack([name, [self.source_node.id, *args, b""]])) + 21
            extra = padding(unpadded) if unpadded < PADDED_SIZE else b""
        return await self.call(
            address, name, self.source_node.id, *args, extra or b"", force=force
        )

    def _answered(self, node: Node, responder: bytes | None, token: bytes) -> bool:
        """Note an answer of `node` (which says it is `responder`); whether
        it is the node we asked."""
        address = (node.ip, node.port)
        self._held_tokens[address] = token
        self._held_tokens.move_to_end(address)
        while len(self._held_tokens) > _TOKENS_HELD:
            self._held_tokens.popitem(last=False)
        if responder == node.id:
            self.welcome_if_new(node)
            return True
        # Another node answers there: the one we asked restarted with a new
        # id, or whoever named it lied. Trust only what answered.
        log.debug("%s answered as %s", node, (responder or b"").hex()[:12])
        self.router.remove_contact(node)
        if responder is not None:
            self.welcome_if_new(Node(responder, node.ip, node.port))
        return False

    def _silent(self, node: Node) -> None:
        log.debug("no response from %s, removing it from the routing table", node)
        self.router.remove_contact(node)

    async def call_ping(self, node: Node) -> bytes | None:
        """Ping `node`; the id it answers with (None: no answer, or another
        id than `node`'s)."""
        ok, data = await self._rpc(node, "ping", force=True)
        reply = parse_ping(data) if ok else None
        if reply is None:
            if ok:
                self._log.info("reply", "garbage ping reply from %s", node)
            self._silent(node)
            return None
        return (
            reply.responder
            if self._answered(node, reply.responder, reply.token)
            else None
        )

    async def ping_address(self, address: tuple[str, int]) -> bytes | None:
        """Ping whatever node listens at `address` (a bootstrap node whose id
        we do not know); its id, and it joins the routing table."""
        ok, data = await self.call(
            address, "ping", self.source_node.id, b"", force=True
        )
        reply = parse_ping(data) if ok else None
        if reply is None:
            return None
        self._answered(Node(reply.responder, *address), reply.responder, reply.token)
        return reply.responder

    async def call_store(self, node: Node, key: bytes, raw: bytes) -> StoreReply | None:
        """Ask `node` to store; its checked reply, or None (no answer, or
        nothing that can be believed).

        A store is sent even to a node recently found unreachable: it is one
        of the few that should hold the value, and a loaded node is slow,
        not gone (writes do not wait for it long; see `settle`).
        """
        had_token = (node.ip, node.port) in self._held_tokens
        ok, data = await self._rpc(node, "store", key, raw, force=True)
        reply = parse_stored(data, self._decoder(key)) if ok else None
        if reply is None:
            if ok:
                self._log.info("reply", "unusable store reply from %s", node)
            else:
                self._silent(node)
            return None
        if not self._answered(node, reply.responder, reply.token):
            return None
        if reply.withheld and not had_token:  # now we have a token: again
            return await self.call_store(node, key, raw)
        return reply

    async def call_find(
        self, node: Node, key: bytes, *, value: bool
    ) -> FoundReply | None:
        """Ask `node` for the nodes closest to `key` (and, with `value`, the
        value it holds); its checked reply, or None (no answer, garbage, or
        another node than the one asked)."""
        had_token = (node.ip, node.port) in self._held_tokens
        name = "find_value" if value else "find_node"
        ok, data = await self._rpc(node, name, key)
        reply = parse_found(data, self._decoder(key)) if ok else None
        if reply is None:
            if ok:
                self._log.info("reply", "garbage %s reply from %s", name, node)
            else:
                self._silent(node)
            return None
        if reply.invalid is not None:
            self._log.info(
                "value",
                "ignored an invalid value for %s: %s",
                key.hex()[:12],
                reply.invalid,
            )
        if not self._answered(node, reply.responder, reply.token):
            return None
        if reply.withheld and not had_token:
            return await self.call_find(node, key, value=value)
        return reply

    def _decoder(self, key: bytes) -> Callable[[bytes], RegistryValue]:
        serializer = self.storage.serializer
        now_ms = self._now_ms()
        return lambda raw: decode_value(serializer, key, raw, now_ms=now_ms)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


_UNPROVEN = "the sender's address is not proven"


def _key(value: object) -> bytes:
    if not is_id(value):
        raise TypeError("node ids and keys are 20 bytes")
    assert isinstance(value, bytes)
    return value
