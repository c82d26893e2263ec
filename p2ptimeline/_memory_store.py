"""`MemoryStore`: a `LocalStore` in process memory, for tests and demos."""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Collection, Iterable

from ._errors import StoreError
from ._models import HybridTimestamp, Post
from ._store import Relation, StoredIdentity

__all__ = ["MemoryStore"]


class MemoryStore:
    """A `LocalStore` that keeps everything in memory; nothing survives a restart.

    Useful in tests of apps built on p2ptimeline, and for peers that should
    not touch the disk.
    """

    def __init__(self) -> None:
        self._open = False
        self._posts: dict[bytes, Post] = {}
        self._by_author: dict[str, list[Post]] = {}  # each sorted by sort_key
        self._identities: dict[str, StoredIdentity] = {}
        self._relations: dict[tuple[str, Relation], frozenset[str]] = {}
        self._state: dict[str, bytes] = {}

    async def open(self) -> None:
        """Make the store usable. Idempotent."""
        self._open = True

    async def close(self) -> None:
        """Mark the store closed; its contents are kept until it is dropped."""
        self._open = False

    async def __aenter__(self) -> MemoryStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("the store is not open")

    async def add(self, posts: Iterable[Post]) -> list[Post]:
        """See `LocalStore.add`."""
        self._check_open()
        added = []
        for post in posts:
            if post.id not in self._posts:
                self._posts[post.id] = post
                column = self._by_author.setdefault(post.author, [])
                bisect.insort(column, post, key=_sort_key)
                added.append(post)
        return added

    async def get(self, post_id: bytes) -> Post | None:
        """See `LocalStore.get`."""
        self._check_open()
        return self._posts.get(post_id)

    async def posts_by(
        self,
        author: str,
        *,
        since: HybridTimestamp | None = None,
        limit: int | None = None,
    ) -> list[Post]:
        """See `LocalStore.posts_by`."""
        self._check_open()
        column = self._by_author.get(author, [])
        start = 0
        if since is not None:
            start = bisect.bisect_right(column, since, key=lambda p: p.timestamp)
        stop = len(column) if limit is None else start + max(limit, 0)
        return column[start:stop]

    async def timeline(
        self, authors: Collection[str], *, limit: int = 50, before: Post | None = None
    ) -> list[Post]:
        """See `LocalStore.timeline`."""
        self._check_open()
        newest_first = []
        for author in set(authors):
            column = self._by_author.get(author, [])
            stop = len(column)
            if before is not None:
                stop = bisect.bisect_left(column, before.sort_key, key=_sort_key)
            newest_first.append(reversed(column[max(0, stop - limit) : stop]))
        merged = heapq.merge(*newest_first, key=_sort_key, reverse=True)
        return list(itertools.islice(merged, max(limit, 0)))

    async def latest(self, authors: Collection[str]) -> dict[str, HybridTimestamp]:
        """See `LocalStore.latest`."""
        self._check_open()
        return {
            author: self._by_author[author][-1].timestamp
            for author in authors
            if self._by_author.get(author)
        }

    async def prune(
        self, *, older_than_ms: int, keep_authors: Collection[str] = ()
    ) -> int:
        """See `LocalStore.prune`."""
        self._check_open()
        cutoff = HybridTimestamp(physical_ms=older_than_ms)
        deleted = 0
        for author, column in self._by_author.items():
            if author in keep_authors:
                continue
            stop = bisect.bisect_left(column, cutoff, key=lambda p: p.timestamp)
            for post in column[:stop]:
                del self._posts[post.id]
            del column[:stop]
            deleted += stop
        return deleted

    async def count(self) -> int:
        """See `LocalStore.count`."""
        self._check_open()
        return len(self._posts)

    async def save_identity(self, identity: StoredIdentity) -> None:
        """See `LocalStore.save_identity`."""
        self._check_open()
        self._identities[identity.username] = identity

    async def load_identity(self, username: str) -> StoredIdentity | None:
        """See `LocalStore.load_identity`."""
        self._check_open()
        return self._identities.get(username)

    async def save_relation(
        self, username: str, relation: Relation, names: Collection[str]
    ) -> None:
        """See `LocalStore.save_relation`."""
        self._check_open()
        self._relations[username, relation] = frozenset(names)

    async def load_relation(self, username: str, relation: Relation) -> frozenset[str]:
        """See `LocalStore.load_relation`."""
        self._check_open()
        return self._relations.get((username, relation), frozenset())

    async def put_state(self, key: str, value: bytes) -> None:
        """See `LocalStore.put_state`."""
        self._check_open()
        self._state[key] = value

    async def get_state(self, key: str) -> bytes | None:
        """See `LocalStore.get_state`."""
        self._check_open()
        return self._state.get(key)


def _sort_key(post: Post) -> tuple[HybridTimestamp, bytes]:
    return post.sort_key
