"""Crash safety: a peer killed with SIGKILL right after post() loses nothing."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
from crash_probe import Probe

import p2ptimeline as pt
from p2ptimeline.testing import local_network

CONFIG = pt.PeerConfig(seal_cost=10, ksize=8, pull_interval=3600.0)


@pytest.mark.slow
async def test_killed_after_post_loses_nothing_and_catches_up(
    tmp_path: Path,
) -> None:
    """Killed with SIGKILL right after post() returns, again and again, the
    peer keeps every post, its store stays sound, it catches up on what it
    missed and serves its posts again."""
    async with local_network(config=CONFIG) as net:
        (boot,) = net.bootstrap
        (friend,) = await net.add_users("friend")
        data_dir = tmp_path / "author"
        acknowledged: list[str] = []
        missed: list[str] = []
        for round_ in range(4):
            probe = await Probe.start(
                data_dir, boot, "author", "correct horse", "friend"
            )
            held = await probe.line("held")
            timeline = await probe.line("timeline")
            assert set(acknowledged) <= set(held), "an acknowledged post was lost"
            assert set(missed) <= set(timeline), "a missed post was not caught up"
            if round_ == 0:
                await friend.follow("author")
            for i in range(3):
                acknowledged.append(await probe.post(f"round {round_} post {i}"))
            await probe.kill()
            assert probe.process.returncode == -signal.SIGKILL
            with sqlite3.connect(data_dir / "peer.db") as db:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            missed.append(
                (await friend.post(f"while author is dead, {round_}")).id.hex()
            )
        # It comes back and serves: the friend pulls every acknowledged post.
        probe = await Probe.start(data_dir, boot, "author", "correct horse", "friend")
        await probe.line("held")
        await friend.sync()
        ids = {p.id.hex() for p in await friend.timeline(limit=1000)}
        assert set(acknowledged) <= ids
        await probe.kill()
        assert probe.process.returncode == -signal.SIGKILL
