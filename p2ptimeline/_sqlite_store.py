"""`SqliteStore`: the default, durable `LocalStore`, on SQLite in WAL mode."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Collection, Iterable
from typing import Any, Literal, TypeVar

from ._errors import StoreError
from ._models import HybridTimestamp, Post
from ._store import Relation, StoredIdentity

__all__ = ["SqliteStore"]

T = TypeVar("T")

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (
    id BLOB PRIMARY KEY,
    author TEXT NOT NULL,
    ts INTEGER NOT NULL,          -- HybridTimestamp.packed()
    text TEXT NOT NULL,
    signature BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS posts_by_author ON posts (author, ts, id);
CREATE INDEX IF NOT EXISTS posts_by_time ON posts (ts, id);
CREATE TABLE IF NOT EXISTS identities (
    username TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    sealed_key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS relations (
    username TEXT NOT NULL,
    relation TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (username, relation, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""
_POST_COLUMNS = "id, author, ts, text, signature"
_MAX_TS = (1 << 63) - 1
# Up to this many authors, a timeline merges per-author index ranges (fast for
# any mix of authors); beyond it, it scans the time index (fast when the
# authors hold most of the posts, as a peer's followees do).
_MERGE_MAX_AUTHORS = 128
# The authors of a query travel as one JSON array parameter, whatever their
# number (SQLite limits the count of bound parameters).
_AUTHORS = "author IN (SELECT value FROM json_each(?))"


class SqliteStore:
    """A `LocalStore` in one SQLite file.

    The database runs in WAL mode; every write is its own transaction, so a
    post whose `add` has returned survives the process being killed. With
    ``synchronous="FULL"`` it also survives a power cut, at the cost of an
    fsync per write. All SQLite calls run on one worker thread owned by the
    store, so the event loop never waits on the disk.

    Args:
        path: The database file; its directory must exist. A new file is
            created readable and writable by its owner only (0600), and so
            are SQLite's WAL and shared-memory files next to it. ``":memory:"``
            gives a private in-memory database.
        synchronous: SQLite's ``synchronous`` setting for WAL mode.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        self.path = os.fspath(path)
        self._synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (creating if needed) the database. Idempotent."""
        if self._executor is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="p2ptimeline-sqlite"
        )
        try:
            self._db = await self._run(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        """Close the database and stop the worker thread. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(executor, db.close)
        executor.shutdown(wait=True)

    def _connect(self) -> sqlite3.Connection:
        if self.path not in ("", ":memory:"):
            # Private to its owner: it holds sealed keys. SQLite creates the
            # WAL and shared-memory files with the database file's mode.
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot open {self.path}: {exc}") from exc
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > _SCHEMA_VERSION:
            db.close()
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this library"
            )
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        return db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker thread, translating SQLite errors."""
        if self._executor is None:
            raise StoreError("the store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args)
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    @property
    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "used only on the worker thread while open"
        return self._db

    async def add(self, posts: Iterable[Post]) -> list[Post]:
        """See `LocalStore.add`."""
        return await self._run(self._add, list(posts))

    def _add(self, posts: list[Post]) -> list[Post]:
        db = self._conn
        added = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for post in posts:
                cursor = db.execute(
                    f"INSERT OR IGNORE INTO posts ({_POST_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        post.id,
                        post.author,
                        post.timestamp.packed(),
                        post.text,
                        post.signature,
                    ),
                )
                if cursor.rowcount:
                    added.append(post)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return added

    async def get(self, post_id: bytes) -> Post | None:
        """See `LocalStore.get`."""
        rows = await self._query(
            f"SELECT {_POST_COLUMNS} FROM posts WHERE id = ?", post_id
        )
        return _row_to_post(rows[0]) if rows else None

    async def posts_by(
        self,
        author: str,
        *,
        since: HybridTimestamp | None = None,
        limit: int | None = None,
    ) -> list[Post]:
        """See `LocalStore.posts_by`."""
        after = -1 if since is None else since.packed()
        rows = await self._query(
            f"SELECT {_POST_COLUMNS} FROM posts WHERE author = ? AND ts > ?"
            " ORDER BY ts, id LIMIT ?",
            author,
            after,
            -1 if limit is None else max(limit, 0),
        )
        return [_row_to_post(row) for row in rows]

    async def timeline(
        self, authors: Collection[str], *, limit: int = 50, before: Post | None = None
    ) -> list[Post]:
        """See `LocalStore.timeline`."""
        if before is None:
            cursor = (_MAX_TS, b"")
        else:
            cursor = (before.timestamp.packed(), before.id)
        names = sorted(set(authors))
        if not names or limit <= 0:
            return []
        if len(names) <= _MERGE_MAX_AUTHORS:
            # One index range per author, merged by SQLite in order: reads
            # about `limit` rows whatever the share of these authors.
            arm = (
                f"SELECT {_POST_COLUMNS} FROM posts"
                " WHERE author = ? AND (ts, id) < (?, ?)"
            )
            sql = " UNION ALL ".join([arm] * len(names))
            params = [value for name in names for value in (name, *cursor)]
        else:
            # Many authors: walk the time index newest first, filtering.
            sql = (
                f"SELECT {_POST_COLUMNS} FROM posts INDEXED BY posts_by_time"
                f" WHERE {_AUTHORS} AND (ts, id) < (?, ?)"
            )
            params = [json.dumps(names), *cursor]
        rows = await self._query(
            f"{sql} ORDER BY ts DESC, id DESC LIMIT ?", *params, limit
        )
        return [_row_to_post(row) for row in rows]

    async def latest(self, authors: Collection[str]) -> dict[str, HybridTimestamp]:
        """See `LocalStore.latest`."""
        rows = await self._query(
            f"SELECT author, MAX(ts) FROM posts WHERE {_AUTHORS} GROUP BY author",
            json.dumps(sorted(authors)),
        )
        return {author: HybridTimestamp.unpack(ts) for author, ts in rows}

    async def prune(
        self, *, older_than_ms: int, keep_authors: Collection[str] = ()
    ) -> int:
        """See `LocalStore.prune`."""
        cutoff = HybridTimestamp(physical_ms=older_than_ms).packed()
        return await self._write(
            f"DELETE FROM posts WHERE ts < ? AND NOT {_AUTHORS}",
            cutoff,
            json.dumps(sorted(keep_authors)),
        )

    async def count(self) -> int:
        """See `LocalStore.count`."""
        ((count,),) = await self._query("SELECT COUNT(*) FROM posts")
        return int(count)

    async def save_identity(self, identity: StoredIdentity) -> None:
        """See `LocalStore.save_identity`."""
        await self._write(
            "INSERT OR REPLACE INTO identities VALUES (?, ?, ?)",
            identity.username,
            identity.public_key,
            identity.sealed_key,
        )

    async def load_identity(self, username: str) -> StoredIdentity | None:
        """See `LocalStore.load_identity`."""
        rows = await self._query(
            "SELECT public_key, sealed_key FROM identities WHERE username = ?", username
        )
        if not rows:
            return None
        ((public_key, sealed_key),) = rows
        return StoredIdentity(
            username=username, public_key=public_key, sealed_key=sealed_key
        )

    async def save_relation(
        self, username: str, relation: Relation, names: Collection[str]
    ) -> None:
        """See `LocalStore.save_relation`."""
        await self._run(self._save_relation, username, relation, sorted(names))

    def _save_relation(self, username: str, relation: str, names: list[str]) -> None:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "DELETE FROM relations WHERE username = ? AND relation = ?",
                (username, relation),
            )
            db.executemany(
                "INSERT INTO relations VALUES (?, ?, ?)",
                ((username, relation, name) for name in names),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def load_relation(self, username: str, relation: Relation) -> frozenset[str]:
        """See `LocalStore.load_relation`."""
        rows = await self._query(
            "SELECT name FROM relations WHERE username = ? AND relation = ?",
            username,
            relation,
        )
        return frozenset(name for (name,) in rows)

    async def put_state(self, key: str, value: bytes) -> None:
        """See `LocalStore.put_state`."""
        await self._write("INSERT OR REPLACE INTO state VALUES (?, ?)", key, value)

    async def get_state(self, key: str) -> bytes | None:
        """See `LocalStore.get_state`."""
        rows = await self._query("SELECT value FROM state WHERE key = ?", key)
        return bytes(rows[0][0]) if rows else None

    async def _query(self, sql: str, *params: Any) -> list[Any]:
        return await self._run(lambda: self._conn.execute(sql, params).fetchall())

    async def _write(self, sql: str, *params: Any) -> int:
        return await self._run(lambda: self._conn.execute(sql, params).rowcount)


def _row_to_post(row: tuple[bytes, str, int, str, bytes]) -> Post:
    post_id, author, ts, text, signature = row
    return Post(
        id=post_id,
        author=author,
        text=text,
        timestamp=HybridTimestamp.unpack(ts),
        signature=signature,
    )
