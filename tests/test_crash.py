"""Crash safety: a peer killed with SIGKILL right after post() loses nothing."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import p2ptimeline as pt

PROBE = Path(__file__).parent / "crash_probe.py"
CONFIG = pt.PeerConfig(seal_cost=10, ksize=8, pull_interval=3600.0)


class Probe:
    """A peer in a child process (tests/crash_probe.py), driven by lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, data_dir: Path, boot: pt.DhtRegistry, *follow: str) -> Probe:
        host, port = boot.address
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROBE),
            str(data_dir),
            f"{host}:{port}",
            "author",
            "pw",
            *follow,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def line(self, prefix: str) -> list[str]:
        """The words after `prefix` on the next line that starts with it."""
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            while True:
                words = (await self.process.stdout.readline()).decode().split()
                if not words and self.process.stdout.at_eof():
                    raise AssertionError("the probe exited")
                if words and words[0] == prefix:
                    return words[1:]

    async def post(self, text: str) -> str:
        """Post and return the id, once the probe reports post() returned."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"post {text}\n".encode())
        await self.process.stdin.drain()
        (post_id,) = await self.line("posted")
        return post_id

    async def kill(self) -> None:
        self.process.kill()  # SIGKILL: no goodbye, no flush
        await self.process.wait()
        assert self.process.returncode == -signal.SIGKILL


@pytest.fixture
async def boot() -> AsyncIterator[pt.DhtRegistry]:
    """A bootstrap DHT node."""
    node = pt.DhtRegistry(ksize=8)
    await node.start("127.0.0.1", 0)
    yield node
    await node.stop()


@pytest.mark.slow
async def test_killed_after_post_loses_nothing_and_catches_up(
    boot: pt.DhtRegistry, tmp_path: Path
) -> None:
    """Killed with SIGKILL right after post() returns, again and again, the
    peer keeps every post, its store stays sound, it catches up on what it
    missed and serves its posts again."""
    async with pt.Peer(
        "127.0.0.1", 0, [boot.address], clock=pt.ClockSync(servers=[]), config=CONFIG
    ) as friend:
        await friend.register("friend", "pw")
        data_dir = tmp_path / "author"
        acknowledged: list[str] = []
        missed: list[str] = []
        for round_ in range(4):
            probe = await Probe.start(data_dir, boot, "friend")
            held = await probe.line("held")
            timeline = await probe.line("timeline")
            assert set(acknowledged) <= set(held), "an acknowledged post was lost"
            assert set(missed) <= set(timeline), "a missed post was not caught up"
            if round_ == 0:
                await friend.follow("author")
            for i in range(3):
                acknowledged.append(await probe.post(f"round {round_} post {i}"))
            await probe.kill()
            with sqlite3.connect(data_dir / "peer.db") as db:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            missed.append(
                (await friend.post(f"while author is dead, {round_}")).id.hex()
            )
        # It comes back and serves: the friend pulls every acknowledged post.
        probe = await Probe.start(data_dir, boot, "friend")
        await probe.line("held")
        await friend.sync()
        ids = {p.id.hex() for p in await friend.timeline(limit=1000)}
        assert set(acknowledged) <= ids
        await probe.kill()
