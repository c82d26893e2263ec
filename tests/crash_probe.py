"""A peer process for crash tests: posts, reports, waits to be killed.

Run as ``python tests/crash_probe.py DATA_DIR HOST:PORT NAME PASSWORD [FOLLOW...]``.
It starts a peer on DATA_DIR, registers NAME (or logs in if it exists),
prints one line ``held <ids>`` with the ids of the user's own posts it holds
and ``timeline <ids>`` with its whole timeline, then for every line
``post TEXT`` read on stdin posts TEXT and prints ``posted <id>`` once
`post()` has returned. It never exits by itself: the test kills it.
"""

from __future__ import annotations

import asyncio
import sys

import p2ptimeline as pt


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
