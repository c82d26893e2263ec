"""A local p2ptimeline network, told as a short story (what `make demo` runs).

Three bootstrap nodes and four peers start on 127.0.0.1, all in this one
process (`p2ptimeline.testing.local_network` starts them, and stops them at
the end). Users register and follow each other, post, read their timelines;
one of them goes offline and catches up when she comes back; at the end,
followers and follow suggestions. Built only on the public API.

Run: python examples/demo.py
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time

import p2ptimeline as pt
from p2ptimeline.testing import LocalNetwork, local_network

STARTED = time.monotonic()


def say(text: str = "") -> None:
    """Print a line of the story, with the seconds elapsed."""
    print(f"[{time.monotonic() - STARTED:5.1f}s] {text}" if text else "", flush=True)


def show(title: str, posts: list[pt.Post]) -> None:
    say(title)
    for post in posts:
        clock = post.timestamp.datetime.astimezone().strftime("%H:%M:%S")
        print(f"           [{clock}] {post.author}: {post.text}")


async def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    say(f"p2ptimeline {pt.__version__}: a decentralized timeline on 127.0.0.1")
    # All on one machine: a DHT node that is gone is given up on sooner than
    # on a real network (half the RPC timeout, here 0.25 s, per lookup).
    config = pt.PeerConfig(seal_cost=12, pull_interval=5.0, rpc_timeout=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        # Three bootstrap nodes and four peers, each peer with its own SQLite
        # store under tmp; all stopped when the block ends.
        async with local_network(
            4, bootstrap_nodes=3, config=config, data_dir=tmp
        ) as net:
            addresses = ", ".join(f"{h}:{p}" for h, p in net.bootstrap)
            say(f"three bootstrap DHT nodes: {addresses}")
            await story(net)
    say("done: every peer and node stopped")


async def story(net: LocalNetwork) -> None:
    """Alice, bob, carol and dave on the network's peers; then dave moves."""
    names = ["alice", "bob", "carol", "dave"]
    peers = dict(zip(names, net.peers, strict=True))
    for name, peer in peers.items():
        await peer.register(name, f"{name}'s password")
        say(f"{name} registered on the peer at port {peer.port}")
    alice, bob, carol, dave = (peers[n] for n in names)

    for follower, followee in [
        (bob, "alice"),
        (carol, "alice"),
        (dave, "bob"),
        (carol, "bob"),
        (alice, "carol"),
    ]:
        await follower.follow(followee)
        say(f"{follower.username} follows {followee}")

    live: asyncio.Queue[pt.Post] = asyncio.Queue()

    async def watch() -> None:
        async for post in bob.incoming():
            say(f"  bob's peer received it live: {post.author}: {post.text!r}")
            live.put_nowait(post)

    async def post(peer: pt.Peer, text: str) -> None:
        say(f"{peer.username} posts {text!r}")
        await peer.post(text)

    watcher = asyncio.create_task(watch())
    await post(alice, "Hello, decentralized world!")
    async with asyncio.timeout(10):
        await live.get()  # pushed to bob (and carol) down alice's tree
    await post(carol, "No server was harmed in the making of this post.")
    await post(bob, "Posts travel peer to peer, down a tree of followers.")

    say("carol logs out")
    await carol.logout()
    await post(alice, "Carol, you are missing this one.")
    async with asyncio.timeout(10):
        await live.get()
    await post(bob, "And this one.")
    say("carol logs back in, and pulls what she missed from alice and bob")
    await carol.login("carol", "carol's password")
    show("carol's timeline after catching up:", await carol.timeline(limit=10))

    say("alice's peer stops for good")
    await alice.stop()
    say("dave moves to a brand new peer, with an empty store, and logs in there")
    print("           (a pause: DHT lookups wait a moment for alice's node,")
    print("           which left without a word, before they go around it)")
    await dave.logout()
    newcomer = await net.add_peer()
    await newcomer.login("dave", "dave's password")
    say("dave follows alice, who is offline")
    await newcomer.follow("alice")
    await newcomer.sync()  # pull now what follow() fetches in the background
    show(
        "alice's posts reach dave all the same, from her followers bob and carol:",
        [p for p in await newcomer.timeline() if p.author == "alice"],
    )

    say(f"followers of alice: {', '.join(await bob.followers('alice'))}")
    say(f"bob follows: {', '.join(await bob.following('bob'))}")
    say(f"suggestions for dave: {', '.join(await newcomer.suggestions()) or '-'}")
    notes = await bob.notifications()
    say("bob's notifications: " + ", ".join(f"{n.user} {n.kind}ed" for n in notes))
    watcher.cancel()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except TimeoutError:
        print("demo: something took too long", file=sys.stderr)
        sys.exit(1)
