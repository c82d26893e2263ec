"""LocalStore: the conformance suite on both stores, and SqliteStore durability."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import p2ptimeline as pt
from p2ptimeline.testing import STORE_CHECKS, StoreCheck, make_posts

StoreFactory = Callable[[Path], pt.LocalStore]
FACTORIES: dict[str, StoreFactory] = {
    "memory": lambda _: pt.MemoryStore(),
    "sqlite": lambda tmp: pt.SqliteStore(tmp / "store.db"),
}


@pytest.fixture(params=sorted(FACTORIES))
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[pt.LocalStore]:
    """A fresh, open store of each implementation."""
    store = FACTORIES[request.param](tmp_path)
    await store.open()
    yield store
    await store.close()


@pytest.mark.parametrize("check", STORE_CHECKS, ids=lambda c: c.__name__)
async def test_conformance(store: pt.LocalStore, check: StoreCheck) -> None:
    """Each store passes every check of the LocalStore contract."""
    await check(store)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_implements_the_protocol(name: str, tmp_path: Path) -> None:
    """Both stores are LocalStores (structurally)."""
    assert isinstance(FACTORIES[name](tmp_path), pt.LocalStore)


@pytest.mark.parametrize("name", sorted(FACTORIES))
async def test_closed_store_raises_store_error(name: str, tmp_path: Path) -> None:
    """Using a store that is not open raises StoreError; open/close are idempotent."""
    store = FACTORIES[name](tmp_path)
    with pytest.raises(pt.StoreError):
        await store.count()
    await store.open()
    await store.open()
    assert await store.count() == 0
    await store.close()
    await store.close()
    with pytest.raises(pt.StoreError):
        await store.add(make_posts("alice", 1))


async def test_sqlite_keeps_everything_across_reopen(tmp_path: Path) -> None:
    """Posts, identities, relations and state are back after close and reopen."""
    posts = make_posts("alice", 3)
    identity = pt.StoredIdentity(
        username="alice", public_key=b"k" * 32, sealed_key=b"s"
    )
    async with pt.SqliteStore(tmp_path / "db") as store:
        await store.add(posts)
        await store.save_identity(identity)
        await store.save_relation("alice", "following", {"bob"})
        await store.put_state("cursor", b"\x01")
    async with pt.SqliteStore(tmp_path / "db") as store:
        assert await store.posts_by("alice") == posts
        assert await store.load_identity("alice") == identity
        assert await store.load_relation("alice", "following") == {"bob"}
        assert await store.get_state("cursor") == b"\x01"


async def test_sqlite_open_error_is_store_error(tmp_path: Path) -> None:
    """A database path that cannot be opened raises StoreError."""
    store = pt.SqliteStore(tmp_path / "missing-dir" / "db")
    with pytest.raises(pt.StoreError):
        await store.open()
    await store.close()


async def test_sqlite_refuses_newer_schema(tmp_path: Path) -> None:
    """A database written by a newer schema version is refused, not clobbered."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(pt.StoreError, match="newer"):
        await pt.SqliteStore(tmp_path / "db").open()


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    import p2ptimeline as pt
    from p2ptimeline.testing import make_posts

    async def main(path):
        store = pt.SqliteStore(path)
        await store.open()
        identity = pt.Identity.generate()
        for i in range(10_000):
            (post,) = make_posts("alice", 1, identity=identity, start_ms=i)
            await store.add([post])
            print(post.id.hex(), flush=True)  # reported only once add() returned

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.parametrize("round_", range(3))
async def test_sqlite_post_survives_kill_9(tmp_path: Path, round_: int) -> None:
    """Every post whose add() returned is there after the process is SIGKILLed."""
    path = tmp_path / "db"
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert writer.stdout is not None
    acknowledged = [await writer.stdout.readline() for _ in range(20 + 37 * round_)]
    writer.kill()  # SIGKILL
    await writer.wait()
    assert writer.returncode == -signal.SIGKILL
    async with pt.SqliteStore(path) as store:
        for post_id in acknowledged:
            assert await store.get(bytes.fromhex(post_id.decode())) is not None
        count = await store.count()
        assert count >= len(acknowledged)
        assert len(await store.posts_by("alice")) == count  # not corrupt
