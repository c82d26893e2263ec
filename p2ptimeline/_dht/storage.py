"""`RecordStorage`: what one DHT node keeps, and how much of it one sender may fill.

A storage node is asked to keep values by anyone, so what it keeps is
bounded three ways:

* every value is validated and merged by the pure rules of `records`
  (`check_value`, `merge`) before it is kept, with the clock passed in;
* the node keeps one form of each value, its encoding (decoded again when a
  merge or a local read needs it), and at most `max_bytes` of them in all;
  past that it evicts the least recently written key of the sender that
  holds the most;
* each sender (the address that first stored a key) may hold at most
  `max_bytes_per_source` bytes of keys: past that, its new keys are refused
  (`Outcome.REFUSED`), while the keys it holds still take updates.

The keys are also kept sorted, so that the keys near a node id (those a
newcomer should be handed) are found by binary search, not by a scan.
"""

from __future__ import annotations

import bisect
import collections
import logging
import time
from collections.abc import Hashable, Iterator

import attrs
from kademlia.storage import IStorage

from .._errors import DecodeError, InvalidRecord
from .._ratelog import RateLimitedLog
from .._serializer import Serializer
from .records import MAX_VALUE_SIZE, Outcome, RegistryValue, check_value, merge

__all__ = ["RecordStorage", "StoreResult", "decode_value"]

log = logging.getLogger("p2ptimeline.dht")
_log = RateLimitedLog(log)  # lines remote parties can trigger

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Bytes of values a node keeps by default."""
_KEY_OVERHEAD = 256
"""Bytes each key costs besides its value (the index entries): a budget in
bytes bounds memory even when the values are small."""


@attrs.frozen
class StoreResult:
    """What a storage node did with an offered value."""

    outcome: Outcome
    """Stored, or why not."""
    held: bytes | None = None
    """For `STALE` and `TAKEN`: the encoded value held, which proves it (its
    signatures and its `seq` can be checked by the writer)."""
    refused: tuple[int, ...] = ()
    """For a shard: the indices of entries refused for lack of room."""
    reason: str = ""
    """Why it was refused, for logs."""


@attrs.define
class _Held:
    raw: bytes
    written: float  # time.monotonic() of the last write
    source: Hashable  # who first stored it (charged for its bytes)


class RecordStorage(IStorage):  # type: ignore[misc]  # untyped base class
    """`kademlia` storage that only keeps valid registry values, within budget.

    Args:
        serializer: Decodes the values.
        capacity: Entries per set shard (`shard_capacity`).
        max_bytes: Most bytes of values held at once.
        max_bytes_per_source: Most bytes of values one sender may have
            stored (default: a sixteenth of `max_bytes`).
        clock: The current time in seconds since the epoch, for the `seq`
            bound of `check_value` when `offer` is not given `now_ms`.
    """

    def __init__(
        self,
        serializer: Serializer,
        capacity: int,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_bytes_per_source: int | None = None,
        clock: collections.abc.Callable[[], float] = time.time,
    ) -> None:
        self.serializer = serializer
        """Decodes the values."""
        self._capacity = capacity
        self.max_bytes = max_bytes
        self.max_bytes_per_source = max_bytes_per_source or max(
            MAX_VALUE_SIZE, max_bytes // 16
        )
        self._clock = clock
        self._data: collections.OrderedDict[bytes, _Held] = collections.OrderedDict()
        self._sorted: list[int] = []  # the keys as numbers, in order
        self._bytes = 0
        self._by_source: collections.Counter[Hashable] = collections.Counter()
        # source -> its keys, least recently written first
        self._keys_of: dict[Hashable, collections.OrderedDict[bytes, None]] = {}

    @property
    def bytes_held(self) -> int:
        """Bytes of values held (see `cost`)."""
        return self._bytes

    def bytes_of(self, source: Hashable) -> int:
        """Bytes charged to `source`: the values it first stored (see `cost`)."""
        return self._by_source[source]

    @staticmethod
    def cost(raw: bytes) -> int:
        """Bytes a value held counts for: its size and a fixed overhead."""
        return len(raw) + _KEY_OVERHEAD

    # Writes

    def offer(
        self,
        key: bytes,
        raw: bytes,
        *,
        source: Hashable = None,
        now_ms: int | None = None,
    ) -> StoreResult:
        """Validate `raw` and merge it into what is held under `key`.

        Args:
            key: The DHT key.
            raw: The encoded value, as received.
            source: Who sent it (its bytes count against that sender's
                quota if the key is new); None for this node itself, which
                has no quota.
            now_ms: The clock, for the `seq` bound (default: `clock`).
        """
        now_ms = self._now_ms() if now_ms is None else now_ms
        try:
            value = decode_value(self.serializer, key, raw, now_ms=now_ms)
        except (DecodeError, InvalidRecord) as exc:
            return StoreResult(Outcome.INVALID, reason=str(exc))
        return self.offer_value(key, value, raw, source=source)

    def offer_value(
        self,
        key: bytes,
        value: RegistryValue,
        raw: bytes | None = None,
        *,
        source: Hashable = None,
    ) -> StoreResult:
        """Merge an already validated `value` (encoded as `raw`) under `key`."""
        held = self._data.get(key)
        if held is None and source is not None:
            used = self._by_source[source]
            if used + self.cost(raw or b"") > self.max_bytes_per_source:
                return StoreResult(Outcome.REFUSED, reason="sender over its quota")
        held_value = None if held is None else self._decode(held.raw)
        kept, outcome, refused = merge(held_value, value, capacity=self._capacity)
        if held is None or kept != held_value:
            if kept is not value or raw is None:
                raw = self.serializer.encode(kept)
            self._keep(key, raw, source if held is None else held.source)
        elif kept == value:
            # Stored again as is (a replica republishing): as fresh as new, so
            # this node need not republish it within the hour (paper, 2.5).
            held.written = time.monotonic()
            self._data.move_to_end(key)
            self._keys_of[held.source].move_to_end(key)
        if outcome in (Outcome.STALE, Outcome.TAKEN):
            assert held is not None
            return StoreResult(outcome, held=held.raw)
        return StoreResult(outcome, refused=tuple(refused))

    def _keep(self, key: bytes, raw: bytes, source: Hashable) -> None:
        self.forget(key)
        self._data[key] = _Held(raw, time.monotonic(), source)
        bisect.insort(self._sorted, int.from_bytes(key))
        self._keys_of.setdefault(source, collections.OrderedDict())[key] = None
        self._bytes += self.cost(raw)
        self._by_source[source] += self.cost(raw)
        while self._bytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently written key of the heaviest sender."""
        heaviest = max(self._by_source, key=self._by_source.__getitem__)
        key = next(iter(self._keys_of[heaviest]))
        _log.info("evicted", "storage full: evicted %s of %s", key.hex()[:12], heaviest)
        self.forget(key)

    def forget(self, key: bytes) -> None:
        """Drop what is held under `key`, if anything."""
        held = self._data.pop(key, None)
        if held is None:
            return
        del self._sorted[bisect.bisect_left(self._sorted, int.from_bytes(key))]
        keys = self._keys_of[held.source]
        del keys[key]
        self._bytes -= self.cost(held.raw)
        self._by_source[held.source] -= self.cost(held.raw)
        if not keys:
            del self._keys_of[held.source], self._by_source[held.source]

    # Reads

    def value(self, key: bytes) -> RegistryValue | None:
        """The decoded value held under `key`, if any."""
        held = self._data.get(key)
        return None if held is None else self._decode(held.raw)

    def keys_between(self, low: int, high: int) -> list[bytes]:
        """The keys held whose number is in [low, high), in order."""
        start = bisect.bisect_left(self._sorted, low)
        end = bisect.bisect_left(self._sorted, high, start)
        return [k.to_bytes(20, "big") for k in self._sorted[start:end]]

    def _decode(self, raw: bytes) -> RegistryValue:
        # Held values were checked when they came in: decoding is enough.
        return self.serializer.decode(raw, RegistryValue)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # The IStorage interface, used by kademlia's Server and by RPCs.

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.offer(key, value)

    def __getitem__(self, key: bytes) -> bytes:
        return self._data[key].raw

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        held = self._data.get(key)
        return held.raw if held else default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        cutoff = time.monotonic() - seconds_old
        return [(k, h.raw) for k, h in self._data.items() if h.written <= cutoff]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter([(k, h.raw) for k, h in self._data.items()])

    def __len__(self) -> int:
        return len(self._data)


def decode_value(
    serializer: Serializer, key: bytes, raw: bytes, *, now_ms: int
) -> RegistryValue:
    """Decode and check a value read from or written to `key`.

    Raises:
        DecodeError: It is not a registry value.
        InvalidRecord: It is too large, forged, not `key`'s, or its `seq` is
            far ahead of `now_ms`.
    """
    if len(raw) > MAX_VALUE_SIZE:
        raise InvalidRecord(f"value of {len(raw)} bytes is too large")
    value = serializer.decode(raw, RegistryValue)
    check_value(key, value, now_ms=now_ms)
    return value
