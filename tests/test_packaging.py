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
import asyncio, tempfile, os
import p2ptimeline as pt
assert "site-packages" in pt.__file__, pt.__file__
assert os.path.exists(os.path.join(os.path.dirname(pt.__file__), "py.typed"))

async def main():
    identity = pt.Identity.generate()
    with tempfile.TemporaryDirectory() as tmp:
        async with pt.SqliteStore(os.path.join(tmp, "db")) as store:
            clock = pt.HybridLogicalClock(lambda: 1_700_000_000_000)
            post = pt.Post.create(identity, "alice", "hello", clock.now())
            await store.add([post])
            assert await store.timeline({"alice"}) == [post]
    print("ok", pt.__version__)

asyncio.run(main())
"""


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path: Path) -> None:
    """python -m build makes a wheel that installs in a fresh venv and runs."""
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
