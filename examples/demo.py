"""A tour of what p2ptimeline can do so far, on this machine only.

The networked demo (bootstrap nodes, peers following and posting) arrives
with the peer layer; for now this shows the local foundation: identities and
their sealed form, signed posts, hybrid logical clocks and the local store.

Run: python examples/demo.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import p2ptimeline as pt


async def main() -> None:
    print(f"p2ptimeline {pt.__version__}: local foundation demo\n")

    alice = pt.Identity.generate()
    sealed = alice.seal("alice's password")
    print(f"1. alice's public key: {alice.public_key.hex()[:32]}...")
    print(f"   sealed private key, safe to publish: {len(sealed)} bytes")
    assert pt.Identity.unseal(sealed, "alice's password").public_key == alice.public_key
    try:
        pt.Identity.unseal(sealed, "guess")
    except pt.AuthError as exc:
        print(f"   unsealing with a wrong password: AuthError({exc})")

    clock = pt.ClockSync(servers=[])  # no NTP here: the local clock as is
    hlc = pt.HybridLogicalClock(clock.now_ms)
    bob = pt.Identity.generate()
    posts = [
        pt.Post.create(alice, "alice", "hello from alice", hlc.now()),
        pt.Post.create(bob, "bob", "bob here", hlc.now()),
        pt.Post.create(alice, "alice", "second post", hlc.now()),
    ]
    print("\n2. three signed posts, stamped by a hybrid logical clock:")
    for post in posts:
        stamp = post.timestamp
        print(f"   {post.author:>5} @ {stamp.physical_ms}.{stamp.logical}: {post.text}")
    forged = pt.Post.create(bob, "alice", "I am alice, honest", hlc.now())
    try:
        forged.verify(alice.public_key)
    except pt.InvalidSignature:
        print("   a post bob signed as 'alice' fails verification with alice's key")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alice.db"
        async with pt.SqliteStore(path) as store:
            added = await store.add(posts + posts)
            print(f"\n3. stored {len(added)} posts in {path.name} (duplicates dropped)")
        async with pt.SqliteStore(path) as store:
            timeline = await store.timeline({"alice", "bob"}, limit=10)
            print("   after reopening, the timeline, newest first:")
            for post in timeline:
                print(f"   - {post.author}: {post.text}")
    print("\ndone.")


if __name__ == "__main__":
    asyncio.run(main())
