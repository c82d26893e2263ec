"""`Lookup`: Kademlia's iterative search for the nodes (and values) near a key.

It replaces `kademlia`'s round-based `SpiderCrawl`, which waits out every
round and believes every node an answer names, with a search built to go on
when some answers lie:

* **Continuous.** Up to `alpha` requests are in flight at once; each answer
  starts the next request, so a node that never answers holds up one slot,
  not a round. A request unanswered for half the RPC timeout no longer
  counts as one of the closest (its answer is still taken if it comes), so
  the next closest node is asked in its place.
* **At most `ksize` nodes from an answer**, the closest to the key, and one
  candidate per address (the first id named for it).
* **Vouchers.** Every candidate remembers who named it (the routing table,
  or the nodes whose answers listed it). A candidate named by a single node
  is *unconfirmed*: at most `_UNCONFIRMED_IN_FLIGHT` of one node's
  unconfirmed candidates are asked at once, and a node two of whose
  unconfirmed candidates did not answer (or answered as another node) is
  distrusted: the candidates only it named are dropped. One node inventing
  closer nodes costs a lookup about half an RPC timeout, not one timeout
  per invented node.
* **The closest set** (where writes go, and whose answers count in a vote)
  holds the `ksize` closest nodes that answered, with at most a quarter of
  them unconfirmed candidates of any one node: one liar cannot fill it.
* **A deadline**: whatever happens, a lookup returns by then.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

import attrs
from kademlia.node import Node

from .._ratelog import RateLimitedLog
from .wire import FoundReply

if TYPE_CHECKING:
    from .protocol import RegistryProtocol

__all__ = ["Lookup", "LookupResult"]

log = logging.getLogger("p2ptimeline.dht")
_log = RateLimitedLog(log)  # lines remote parties can trigger

_UNCONFIRMED_IN_FLIGHT = 2  # a node's unconfirmed candidates asked at once
_DISTRUST_AFTER = 2  # failures of a node's unconfirmed candidates

Address = tuple[str, int]


@attrs.define(eq=False)
class _Candidate:
    node: Node
    distance: int
    vouchers: set[Address | None]  # who named it; None: our routing table
    state: str = "new"  # new, asking, answered, failed
    asked_at: float = 0.0
    reply: FoundReply | None = None
    skipped: bool = False  # failed at once: marked unreachable lately
    charged: bool = False  # its failure was counted against its voucher

    @property
    def address(self) -> Address:
        return (self.node.ip, self.node.port)

    def sole_voucher(self) -> Address | None:
        """The one node that named it, if only one did (and not our table)."""
        if len(self.vouchers) == 1 and None not in self.vouchers:
            return next(iter(self.vouchers))
        return None


@attrs.frozen
class LookupResult:
    """What a lookup found."""

    answers: list[tuple[Node, FoundReply]]
    """Every node that answered, with its answer, closest first."""
    closest: list[Node]
    """The `ksize` closest nodes that answered (see the module's doc)."""
    failed: list[Node]
    """Nodes asked that did not answer, or skipped as unreachable."""
    passed_silent: bool = False
    """Whether a node was passed over because another lookup was waiting on
    it (see `RegistryProtocol.recently_unreachable`)."""


class Lookup:
    """One iterative lookup of `key`.

    Args:
        protocol: Sends the requests.
        key: The key (or node id) looked up.
        seeds: Nodes to start from (the routing table's closest).
        ksize: How many closest nodes to find.
        alpha: Requests in flight at once.
        values: Ask ``find_value`` (and stop as soon as `quorum` closest
            answered, if one of them holds a value) rather than
            ``find_node``.
        quorum: With `values`: how many of the closest must have answered
            (all `ksize` if none of those holds a value).
        patient: Wait for every request until its own timeout (for writes
            whose outcome depends on every close node's answer).
        timeout: Seconds after which the lookup returns what it has.
    """

    def __init__(
        self,
        protocol: RegistryProtocol,
        key: bytes,
        seeds: list[Node],
        *,
        ksize: int,
        alpha: int,
        values: bool = False,
        quorum: int | None = None,
        patient: bool = False,
        pass_silent: bool = True,
        timeout: float,
    ) -> None:
        self._protocol = protocol
        self._pass_silent = pass_silent and not patient
        self._passed_silent = False
        self._key = key
        self._target = int.from_bytes(key)
        self._ksize = ksize
        self._alpha = alpha
        self._values = values
        self._width = min(quorum or ksize, ksize)
        self._patient = patient
        self._timeout = timeout
        self._overdue_after = protocol.wait_timeout / 2
        self._answered_any = False
        self._by_address: dict[Address, _Candidate] = {}
        self._ids: set[bytes] = set()
        self._failures: collections.Counter[Address] = collections.Counter()
        self._distrusted: set[Address] = set()
        me = protocol.source_node
        self._me = (me.id, (me.ip, me.port))
        for node in seeds:
            self._offer(node, None)

    async def run(self) -> LookupResult:
        """Search until the closest nodes have answered, or time is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        in_flight: dict[asyncio.Future[FoundReply | None], _Candidate] = {}
        try:
            while True:
                now = loop.time()
                for candidate in in_flight.values():
                    if self._overdue(candidate, now) and not candidate.charged:
                        candidate.charged = True
                        self._charge(candidate)
                head = self._ranked(now)[: self._width]
                if all(c.state == "answered" for c in head):
                    if self._widen(head):
                        continue
                    break
                active = [c for c in in_flight.values() if not self._overdue(c, now)]
                # A node's unconfirmed candidates waiting for an answer.
                vouched = collections.Counter(c.sole_voucher() for c in active)
                skipped = False
                for candidate in head:
                    if len(active) >= self._alpha:
                        break
                    if candidate.state != "new":
                        continue
                    voucher = candidate.sole_voucher()
                    if (
                        voucher is not None
                        and vouched[voucher] >= _UNCONFIRMED_IN_FLIGHT
                    ):
                        continue
                    if self._ask(candidate, now, in_flight):
                        active.append(candidate)
                        vouched[voucher] += 1
                    else:
                        skipped = True
                if not in_flight:
                    if skipped:
                        continue  # rank again without them
                    break
                wake = min(
                    [deadline] + [c.asked_at + self._overdue_after for c in active]
                )
                done, _ = await asyncio.wait(
                    in_flight,
                    timeout=max(0.0, wake - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for call in done:
                    self._settle(in_flight.pop(call), call.result())
                if loop.time() >= deadline:
                    _log.info(
                        "deadline",
                        "lookup of %s hit its deadline",
                        self._key.hex()[:12],
                    )
                    break
        finally:
            for call in in_flight:  # they still update the routing table
                self._protocol.adopt(call)
        return self._result()

    def _overdue(self, candidate: _Candidate, now: float) -> bool:
        """Asked and unanswered for half the RPC timeout: no longer counted
        among the closest, and charged to its voucher. Never if patient, nor
        before any node answered: the first answer is waited for as long as
        a call lasts (a call sends its request again at half the timeout,
        when one lost datagram would otherwise end a lookup with nothing)."""
        return (
            candidate.state == "asking"
            and not self._patient
            and self._answered_any
            and now - candidate.asked_at >= self._overdue_after
        )

    def _widen(self, head: list[_Candidate]) -> bool:
        """For a value lookup whose quorum closest answered without a value:
        look on to the `ksize` closest (nodes that joined after a value was
        stored can be the closest to its key without holding it)."""
        if not self._values or self._width >= self._ksize:
            return False
        if any(c.reply is not None and c.reply.value is not None for c in head):
            return False
        self._width = self._ksize
        return True

    def _ranked(self, now: float) -> list[_Candidate]:
        """Candidates that may still be among the closest, closest first."""
        live = [
            c
            for c in self._by_address.values()
            if c.state != "failed"
            and not self._overdue(c, now)
            and c.sole_voucher() not in self._distrusted
        ]
        live.sort(key=_distance)
        return live

    def _ask(
        self,
        candidate: _Candidate,
        now: float,
        in_flight: dict[asyncio.Future[FoundReply | None], _Candidate],
    ) -> bool:
        """Send the request; False if the node is skipped as unreachable."""
        if self._protocol.recently_unreachable(candidate.address):
            candidate.state, candidate.skipped = "failed", True
            return False
        if self._pass_silent and self._protocol.recently_unreachable(
            candidate.address, silent=True
        ):
            self._passed_silent = True
            candidate.state, candidate.skipped = "failed", True
            return False
        candidate.state, candidate.asked_at = "asking", now
        call = asyncio.ensure_future(
            self._protocol.call_find(candidate.node, self._key, value=self._values)
        )
        in_flight[call] = candidate
        return True

    def _charge(self, candidate: _Candidate) -> None:
        """A candidate failed to answer: count it against the node that
        alone named it; distrust that node after `_DISTRUST_AFTER`."""
        voucher = candidate.sole_voucher()
        if voucher is None:
            return
        self._failures[voucher] += 1
        if self._failures[voucher] >= _DISTRUST_AFTER:
            if voucher not in self._distrusted:
                _log.info("distrust", "distrusting the nodes named by %s", voucher)
            self._distrusted.add(voucher)

    def _settle(self, candidate: _Candidate, reply: FoundReply | None) -> None:
        if reply is None:
            candidate.state = "failed"
            if not candidate.charged:
                candidate.charged = True
                self._charge(candidate)
            return
        candidate.state, candidate.reply = "answered", reply
        self._answered_any = True
        named = [Node(*triple) for triple in reply.nodes]
        named.sort(key=lambda n: n.long_id ^ self._target)
        for node in named[: self._ksize]:
            self._offer(node, candidate.address)

    def _offer(self, node: Node, voucher: Address | None) -> None:
        address = (node.ip, node.port)
        if node.id == self._me[0] or address == self._me[1] or address == voucher:
            return
        known = self._by_address.get(address)
        if known is not None:
            if known.node.id == node.id:
                known.vouchers.add(voucher)
            return  # the first id named for an address is the one asked
        if node.id in self._ids:
            return  # and one address per id
        self._ids.add(node.id)
        self._by_address[address] = _Candidate(
            node, node.long_id ^ self._target, {voucher}
        )

    def _result(self) -> LookupResult:
        answered = sorted(
            (c for c in self._by_address.values() if c.state == "answered"),
            key=_distance,
        )
        closest: list[Node] = []
        per_voucher: collections.Counter[Address] = collections.Counter()
        cap = max(1, self._ksize // 4)
        for candidate in answered:
            if len(closest) >= self._ksize:
                break
            voucher = candidate.sole_voucher()
            if voucher is not None:
                if per_voucher[voucher] >= cap or voucher in self._distrusted:
                    continue
                per_voucher[voucher] += 1
            closest.append(candidate.node)
        failed = [c.node for c in self._by_address.values() if c.state == "failed"]
        answers = [(c.node, c.reply) for c in answered if c.reply is not None]
        return LookupResult(
            answers=answers,
            closest=closest,
            failed=failed,
            passed_silent=self._passed_silent,
        )


def _distance(candidate: _Candidate) -> int:
    return candidate.distance
