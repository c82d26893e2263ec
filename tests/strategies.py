"""Hypothesis strategies for the data model."""

from __future__ import annotations

from hypothesis import strategies as st

import p2ptimeline as pt

IDENTITIES = [pt.Identity.generate() for _ in range(3)]

usernames = st.from_regex(r"[a-z0-9_][a-z0-9_.-]{0,31}", fullmatch=True)
timestamps = st.builds(
    pt.HybridTimestamp,
    physical_ms=st.integers(0, 2**47 - 1),
    logical=st.integers(0, 2**16 - 1),
)
identities = st.sampled_from(IDENTITIES)
keys = st.binary(min_size=32, max_size=32)

posts = st.builds(
    pt.Post.create,
    identity=identities,
    author=usernames,
    text=st.text(max_size=pt.MAX_POST_CHARS),
    timestamp=timestamps,
)
claims = st.builds(
    pt.UsernameClaim.create,
    identity=identities,
    username=usernames,
    sealed_key=st.binary(max_size=200),
    seq=st.integers(0, 2**63 - 1),
    withdrawn=st.booleans(),
)
presences = st.builds(
    pt.Presence.create,
    identity=identities,
    host=st.text(max_size=253),
    port=st.integers(0, 65535),
    online=st.booleans(),
    expires_ms=st.integers(0, 2**47 - 1),
    seq=st.integers(0, 2**63 - 1),
)
follow_entries = st.builds(
    pt.FollowEntry.create,
    identity=identities,
    follower=usernames,
    followee=usernames,
    followee_key=keys,
    following=st.booleans(),
    timestamp=timestamps,
)
records = st.one_of(posts, claims, presences, follow_entries)
