"""p2ptimeline: a decentralized timeline service, as an asyncio library.

Users register, follow each other and post; a Kademlia DHT holds the signed
registry of users, and posts travel peer to peer. Start with `Peer`.
"""

from ._clock import DEFAULT_NTP_SERVERS, ClockSync
from ._dht.registry import DhtRegistry, UserRecord
from ._errors import (
    AuthError,
    DecodeError,
    InvalidRecord,
    InvalidSignature,
    ListenError,
    NetworkError,
    NotLoggedIn,
    P2PTimelineError,
    PeerUnreachable,
    ProtocolError,
    Refused,
    RegistryUnavailable,
    RemoteError,
    StoreError,
    UnknownUser,
    UsageError,
    UsernameTaken,
)
from ._hlc import HybridLogicalClock
from ._identity import Identity, check_password, verify
from ._memory_store import MemoryStore
from ._models import (
    MAX_POST_CHARS,
    MAX_USERNAME_CHARS,
    FollowEntry,
    HybridTimestamp,
    Post,
    Presence,
    UsernameClaim,
    check_username,
)
from ._p2p.connection import Limits
from ._p2p.peer import Notification, Peer, PeerConfig
from ._p2p.transport import Transport
from ._p2p.tree import DisseminationTree
from ._serializer import CborSerializer, JsonSerializer, Serializer
from ._sqlite_store import SqliteStore
from ._store import LocalStore, Relation, StoredIdentity

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_NTP_SERVERS",
    "MAX_POST_CHARS",
    "MAX_USERNAME_CHARS",
    "AuthError",
    "CborSerializer",
    "ClockSync",
    "DecodeError",
    "DhtRegistry",
    "DisseminationTree",
    "FollowEntry",
    "HybridLogicalClock",
    "HybridTimestamp",
    "Identity",
    "InvalidRecord",
    "InvalidSignature",
    "JsonSerializer",
    "Limits",
    "ListenError",
    "LocalStore",
    "MemoryStore",
    "NetworkError",
    "NotLoggedIn",
    "Notification",
    "P2PTimelineError",
    "Peer",
    "PeerConfig",
    "PeerUnreachable",
    "Post",
    "Presence",
    "ProtocolError",
    "Refused",
    "RegistryUnavailable",
    "Relation",
    "RemoteError",
    "Serializer",
    "SqliteStore",
    "StoreError",
    "StoredIdentity",
    "Transport",
    "UnknownUser",
    "UsageError",
    "UserRecord",
    "UsernameClaim",
    "UsernameTaken",
    "check_password",
    "check_username",
    "verify",
]
