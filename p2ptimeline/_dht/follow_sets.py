"""Follow sets in the DHT: sharded, merged per member, never losing an update.

See `p2ptimeline._dht.records` for the shard layout. `FollowSets` writes each
entry into the first shard on its member's path that has room, and reads a
whole set (or one member's path) by walking the shard trie from the root.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from .._models import FollowEntry, Relation
from .node import DhtNode, Replica
from .records import (
    MAX_SHARD_DEPTH,
    Outcome,
    RegistryValue,
    SetShard,
    member_path,
    merge_entries,
    owner_and_member,
    shard_key,
)

__all__ = ["FollowSets"]

log = logging.getLogger("p2ptimeline.registry")

_MAX_CONCURRENT_SHARD_READS = 16


class FollowSets:
    """Reads and writes follow sets through a `DhtNode`.

    Args:
        node: The DHT node to read and write through.
        capacity: Entries per shard (`shard_capacity`).
    """

    def __init__(self, node: DhtNode, capacity: int) -> None:
        self._node = node
        self._capacity = capacity
        # Shards seen full. A shard never stops being full, so this is never
        # wrong, and it lets writes to big sets skip the levels above.
        self._full: set[bytes] = set()
        self._read_slots = asyncio.Semaphore(_MAX_CONCURRENT_SHARD_READS)

    async def add(
        self, relation: Relation, owner_key: bytes, entries: Iterable[FollowEntry]
    ) -> None:
        """Store entries in `owner_key`'s set, each in a shard with room for it.

        Raises:
            RegistryUnavailable: No DHT node answered.
        """
        pending: dict[str, list[FollowEntry]] = {}
        for entry in entries:
            start = self._first_open_shard(relation, owner_key, entry)
            pending.setdefault(start, []).append(entry)
        while pending:
            results = await asyncio.gather(
                *(
                    self._store(relation, owner_key, prefix, batch)
                    for prefix, batch in pending.items()
                )
            )
            pending = {}
            for prefix, refused in results:
                for entry in refused:
                    child = _path(relation, entry)[: len(prefix) + 1]
                    pending.setdefault(child, []).append(entry)

    async def read(
        self, relation: Relation, owner_key: bytes, *, member: bytes | None = None
    ) -> tuple[FollowEntry, ...]:
        """The merged entries of a whole set, or of one `member` only.

        Raises:
            RegistryUnavailable: No DHT node answered.
        """
        path = None if member is None else member_path(member)
        merged: dict[bytes, FollowEntry] = {}
        level = [""]
        while level:
            shards = await asyncio.gather(
                *(self._read_shard(relation, owner_key, prefix) for prefix in level)
            )
            next_level = []
            for prefix, (entries, full) in zip(level, shards, strict=True):
                _accumulate(relation, merged, entries)
                if full and len(prefix) < MAX_SHARD_DEPTH:
                    next_level += [
                        child
                        for child in (prefix + "0", prefix + "1")
                        if path is None or path.startswith(child)
                    ]
            level = next_level
        if member is not None:
            return (merged[member],) if member in merged else ()
        return tuple(merged.values())

    def _first_open_shard(
        self, relation: Relation, owner_key: bytes, entry: FollowEntry
    ) -> str:
        path = _path(relation, entry)
        prefix = ""
        while (
            len(prefix) < MAX_SHARD_DEPTH
            and shard_key(relation, owner_key, prefix) in self._full
        ):
            prefix = path[: len(prefix) + 1]
        return prefix

    async def _store(
        self,
        relation: Relation,
        owner_key: bytes,
        prefix: str,
        entries: Sequence[FollowEntry],
    ) -> tuple[str, list[FollowEntry]]:
        """Store entries in one shard; returns those some replica had no room for."""
        key = shard_key(relation, owner_key, prefix)
        refused: dict[int, FollowEntry] = {}
        for start in range(0, len(entries), self._capacity):
            chunk = entries[start : start + self._capacity]
            if key in self._full and start > 0:
                # Full already: the rest goes one level down.
                refused.update(enumerate(entries[start:], start))
                break
            shard = SetShard(
                relation=relation,
                owner_key=owner_key,
                prefix=prefix,
                entries=tuple(chunk),
            )
            for _, reply in await self._node.write(key, RegistryValue(shard=shard)):
                if reply is None or reply.outcome is not Outcome.STORED:
                    continue
                if reply.refused:
                    self._full.add(key)
                for index in reply.refused:
                    if index < len(chunk):
                        refused[start + index] = chunk[index]
        if refused and len(prefix) >= MAX_SHARD_DEPTH:
            log.error("%s shard %r is full at the deepest level", relation, prefix)
            return prefix, []
        return prefix, list(refused.values())

    async def _read_shard(
        self, relation: Relation, owner_key: bytes, prefix: str
    ) -> tuple[Iterable[FollowEntry], bool]:
        """The merged entries of one shard, and whether any replica is full."""
        key = shard_key(relation, owner_key, prefix)
        async with self._read_slots:
            replicas = await self._node.read(key, quorum=self._node.ksize)
        merged: dict[bytes, FollowEntry] = {}
        full = key in self._full
        for replica in replicas:
            shard = replica.value.shard if replica.value else None
            if shard is not None:
                _accumulate(relation, merged, shard.entries)
                full = full or len(shard.entries) >= self._capacity
        if full or len(merged) >= self._capacity:
            full = True
            self._full.add(key)
        self._repair(relation, owner_key, prefix, replicas, tuple(merged.values()))
        return merged.values(), full

    def _repair(
        self,
        relation: Relation,
        owner_key: bytes,
        prefix: str,
        replicas: list[Replica],
        merged: tuple[FollowEntry, ...],
    ) -> None:
        """Send the replicas that miss entries what they would take of `merged`."""
        stale = [
            replica.node
            for replica in replicas
            if replica.close
            and _would_take(relation, replica.value, merged, self._capacity)
        ]
        if not stale:
            return
        key = shard_key(relation, owner_key, prefix)
        for start in range(0, len(merged), self._capacity):
            shard = SetShard(
                relation=relation,
                owner_key=owner_key,
                prefix=prefix,
                entries=merged[start : start + self._capacity],
            )
            self._node.repair(key, RegistryValue(shard=shard), stale)


def _path(relation: str, entry: FollowEntry) -> str:
    return member_path(owner_and_member(relation, entry)[1])


def _accumulate(
    relation: str, merged: dict[bytes, FollowEntry], entries: Iterable[FollowEntry]
) -> None:
    """Merge `entries` into `merged` (member key -> entry), newest wins."""
    for entry in entries:
        member = owner_and_member(relation, entry)[1]
        current = merged.get(member)
        if current is None or entry.supersedes(current):
            merged[member] = entry


def _would_take(
    relation: str,
    replica: RegistryValue | None,
    merged: tuple[FollowEntry, ...],
    capacity: int,
) -> bool:
    """Whether a replica of a shard would take anything from `merged`."""
    held = () if replica is None or replica.shard is None else replica.shard.entries
    return set(merge_entries(relation, held, merged, capacity)[0]) != set(held)
