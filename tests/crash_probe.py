"""A peer process for crash tests: posts, reports, waits to be killed.

Run as ``python tests/crash_probe.py DATA_DIR HOST:PORT NAME PASSWORD [FOLLOW...]``.
It starts a peer on DATA_DIR, registers NAME (or logs in if it exists),
prints one line ``held <ids>`` with the ids of the user's own posts it holds
and ``timeline <ids>`` with its whole timeline, then for every line
``post TEXT`` read on stdin posts TEXT and prints ``posted <id>`` once
`post()` has returned. It never exits by itself: the test kills it.

`Probe` drives one from the parent process (tests/test_crash.py and
benchmarks/crash.py).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import p2ptimeline as pt


class ProbeExited(Exception):
    """The probe process ended before printing the expected line."""


class Probe:
    """A probe in a child process, driven by lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(
        cls,
        data_dir: Path,
        bootstrap: tuple[str, int],
        name: str,
        password: str,
        *follow: str,
    ) -> Probe:
        host, port = bootstrap
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            str(data_dir),
            f"{host}:{port}",
            name,
            password,
            *follow,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def line(self, prefix: str, within: float = 60.0) -> list[str]:
        """The words after `prefix` on the next line that starts with it."""
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise ProbeExited(f"the probe exited before a {prefix!r} line")
                words = raw.decode().split()
                if words and words[0] == prefix:
                    return words[1:]

    async def send_post(self, text: str) -> None:
        """Ask for a post, without waiting for it."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"post {text}\n".encode())
        await self.process.stdin.drain()

    async def post(self, text: str) -> str:
        """Post and return the id, once the probe reports post() returned."""
        await self.send_post(text)
        (post_id,) = await self.line("posted")
        return post_id

    async def kill(self) -> list[str]:
        """SIGKILL it (no goodbye, no flush); the ids it confirmed meanwhile."""
        self.process.kill()
        await self.process.wait()
        assert self.process.stdout is not None
        rest = (await self.process.stdout.read()).decode().splitlines()
        return [w[1] for w in map(str.split, rest) if len(w) == 2 and w[0] == "posted"]


async def main(
    data_dir: str, bootstrap: str, name: str, password: str, *follow: str
) -> None:
    host, port = bootstrap.rsplit(":", 1)
    config = pt.PeerConfig(seal_cost=10, ksize=8, pull_interval=3600.0)
    peer = pt.Peer(
        "127.0.0.1",
        0,
        [(host, int(port))],
        data_dir=data_dir,
        clock=pt.ClockSync(servers=[]),
        config=config,
    )
    await peer.start()
    try:
        await peer.login(name, password)
    except pt.UnknownUser:
        await peer.register(name, password)
    for followee in follow:
        await peer.follow(followee)
    timeline = await peer.timeline(limit=10_000)
    own = [p.id.hex() for p in timeline if p.author == name]
    print("held", *own, flush=True)
    print("timeline", *(p.id.hex() for p in timeline), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.startswith("post "):
            post = await peer.post(line[5:].strip())
            print("posted", post.id.hex(), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
