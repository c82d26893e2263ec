"""The wheel builds, installs into a clean venv and works without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = """
import asyncio, os
import p2ptimeline as pt
assert "site-packages" in pt.__file__, pt.__file__
assert os.path.exists(os.path.join(os.path.dirname(pt.__file__), "py.typed"))

async def main():
    boot = pt.DhtRegistry()
    await boot.start("127.0.0.1", 0)
    def peer():
        config = pt.PeerConfig(seal_cost=10)
        clock = pt.ClockSync(servers=[])
        return pt.Peer("127.0.0.1", 0, [boot.address], clock=clock, config=config)

    async with peer() as a, peer() as b:
        await a.register("alice", "correct horse")
        await b.register("bob", "correct horse")
        await b.follow("alice")
        stream = b.incoming()
        post = await a.post("hello from the wheel")
        async with asyncio.timeout(10):
            assert (await anext(stream)).id == post.id
        assert (await b.timeline())[0].text == "hello from the wheel"
        await stream.aclose()
    await boot.stop()
    print("ok", pt.__version__)

asyncio.run(main())
"""


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path: Path) -> None:
    """The wheel installs into a fresh venv, and two peers follow and post with it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--outdir",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("p2ptimeline-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [str(python), "-c", SMOKE],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the source tree
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.stdout.startswith("ok ")
