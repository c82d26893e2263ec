"""The `LocalStore` protocol: a peer's durable local state."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol, runtime_checkable

import attrs

from ._models import HybridTimestamp, Post, Relation

__all__ = ["LocalStore", "Relation", "StoredIdentity"]


@attrs.frozen(kw_only=True)
class StoredIdentity:
    """A user's identity as a store keeps it: sealed, never in the clear."""

    username: str
    """The user's name."""
    public_key: bytes
    """The user's Ed25519 public key."""
    sealed_key: bytes
    """The private key sealed with the user's password (`Identity.seal`)."""


@runtime_checkable
class LocalStore(Protocol):
    """Where a peer keeps posts (its own and cached ones) and small state.

    Contract, which `p2ptimeline.testing.STORE_CHECKS` verifies:

    * Posts are kept once per id; `add` returns only those that were new.
      Once `add` has returned, the posts survive a crash of the process
      (for a durable implementation).
    * Posts are ordered by `Post.sort_key`: timestamp, then id.
    * Every method may be called concurrently from one event loop.
    * Methods other than `open` raise `StoreError` when the store is not open.
    """

    async def open(self) -> None:
        """Make the store ready (create files, schema). Idempotent."""
        ...

    async def close(self) -> None:
        """Release files and threads. Idempotent."""
        ...

    async def add(self, posts: Iterable[Post]) -> list[Post]:
        """Store posts not yet held; returns the newly stored ones, in order."""
        ...

    async def get(self, post_id: bytes) -> Post | None:
        """The post with this id, if held."""
        ...

    async def posts_by(
        self,
        author: str,
        *,
        since: HybridTimestamp | None = None,
        limit: int | None = None,
    ) -> list[Post]:
        """Posts of `author` stamped strictly after `since`, oldest first.

        With `limit`, only the oldest `limit` of them.
        """
        ...

    async def timeline(
        self, authors: Collection[str], *, limit: int = 50, before: Post | None = None
    ) -> list[Post]:
        """The newest posts of any of `authors`, newest first.

        Args:
            authors: Whose posts to include.
            limit: At most this many posts.
            before: A cursor: only posts that order before this one (pass
                the last post of the previous page to get the next page).
        """
        ...

    async def latest(self, authors: Collection[str]) -> dict[str, HybridTimestamp]:
        """The newest timestamp held for each of `authors` that has posts."""
        ...

    async def prune(
        self, *, older_than_ms: int, keep_authors: Collection[str] = ()
    ) -> int:
        """Delete posts stamped before `older_than_ms` (physical time).

        Posts of `keep_authors` are kept whatever their age. Returns how
        many posts were deleted.
        """
        ...

    async def count(self) -> int:
        """How many posts are held."""
        ...

    async def save_identity(self, identity: StoredIdentity) -> None:
        """Keep a user's sealed identity, replacing any of that username."""
        ...

    async def load_identity(self, username: str) -> StoredIdentity | None:
        """The sealed identity kept for `username`, if any."""
        ...

    async def save_relation(
        self, username: str, relation: Relation, names: Collection[str]
    ) -> None:
        """Cache the set of users `username` follows, or that follow them."""
        ...

    async def load_relation(self, username: str, relation: Relation) -> frozenset[str]:
        """The cached set saved by `save_relation` (empty if none)."""
        ...

    async def put_state(self, key: str, value: bytes) -> None:
        """Keep a small piece of peer state under `key`."""
        ...

    async def get_state(self, key: str) -> bytes | None:
        """The state kept under `key`, if any."""
        ...
