"""`PeerConfig`: the tunable behaviour of a peer."""

from __future__ import annotations

import attrs

from .._identity import DEFAULT_SEAL_COST
from .connection import Limits

__all__ = ["PeerConfig"]

_positive = attrs.validators.gt(0.0)
_not_negative = attrs.validators.ge(0.0)
_count = attrs.validators.ge(0)


@attrs.frozen(kw_only=True)
class PeerConfig:
    """Tunable behaviour of a `Peer`; the defaults suit a real network.

    Every duration is in seconds (a float).
    """

    fanout: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    """Arity k of dissemination trees: the author sends each post to k peers."""
    retention: float | None = 7 * 24 * 3600.0
    """Seconds a post is kept (None: forever). The seed used 5 minutes."""
    keep_own_posts: bool = True
    """Keep the user's own posts whatever their age."""
    retention_interval: float = attrs.field(default=300.0, validator=_positive)
    """Seconds between runs of the retention policy while logged in."""
    pull_interval: float = attrs.field(default=30.0, validator=_positive)
    """Seconds between pulls of missed posts from followees while logged in."""
    push_tries: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    """Tries to hand a post to a child in the tree before re-homing its subtree."""
    push_backoff: float = attrs.field(default=0.1, validator=_not_negative)
    """Seconds before the second try; doubled before each further one."""
    max_rehomed: int = attrs.field(default=64, validator=_count)
    """Most members a peer pushes a post to in place of unreachable ones, per
    push it forwards: `REHOME_PER_FANOUT` (8) times the tree's fanout, and
    never more than this. The rest of an unreachable member's subtree catches
    up by pulling. (An author re-homes any of its own followers.) See
    `Relay`."""
    max_relays: int = attrs.field(default=64, validator=_count)
    """Most received pushes forwarded at once; a push beyond is stored but not
    forwarded (its subtree catches up by pulling)."""
    max_future: float = attrs.field(default=300.0, validator=_not_negative)
    """Seconds: posts stamped further than this ahead of the clock are refused."""
    incoming_buffer: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    """Posts buffered per `incoming()` iterator; the oldest are dropped beyond."""
    follow_catch_up: float = attrs.field(default=2.0, validator=_not_negative)
    """Seconds `follow()` waits for the followee's recent posts before it
    returns (they keep coming in the background after that)."""
    seal_cost: int = DEFAULT_SEAL_COST
    """Cost of sealing the private key: log2 of the Argon2id memory in KiB, from
    10 (1 MiB, for tests) to 18 (256 MiB); the default, 16, is 64 MiB (see
    `Identity.seal`). Every login, and every offline guess, pays it once."""
    ksize: int = 20
    """Kademlia's k for the registry."""
    alpha: int = 3
    """Kademlia's alpha for the registry."""
    rpc_timeout: float = attrs.field(default=2.0, validator=_positive)
    """Seconds to wait for a DHT node."""
    lease: float = attrs.field(default=30.0, validator=_positive)
    """Seconds a presence lease lasts."""
    ntp_interval: float = attrs.field(default=600.0, validator=_positive)
    """Seconds between NTP syncs."""
    limits: Limits = attrs.field(factory=Limits)
    """Limits of the peer protocol (frame size, timeouts, connections)."""
