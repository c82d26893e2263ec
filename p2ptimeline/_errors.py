"""The exceptions p2ptimeline raises, all under one root.

```
P2PTimelineError
├── UsageError ··········· you did something wrong (also a ValueError)
│   └── NotLoggedIn ······ the operation needs a logged-in user
├── AuthError ············ wrong password, or a key that does not match
├── UsernameTaken ········ someone else holds the name in the registry
├── UnknownUser ·········· no such user in the registry
├── NetworkError ········· the network could not do what was asked
│   ├── PeerUnreachable ·· a peer did not answer in time
│   ├── RegistryUnavailable  no DHT node answered
│   └── ListenError ······ this machine cannot listen on the address asked for
├── RemoteError ·········· a remote party sent something wrong
│   ├── DecodeError ······ bytes that are not a valid encoding
│   ├── ProtocolError ···· a peer broke the peer protocol (bad frame, ...)
│   ├── Refused ·········· a peer understood the request and turned it down
│   └── InvalidRecord ···· well formed, but invalid (wrong key, too old, ...)
│       └── InvalidSignature  a signature that does not verify
└── StoreError ··········· the local store failed
```

Errors the network causes are *remote* errors: peers drop and log them, and
they only reach your code when you asked for the data that was bad. Errors
in how the library is called are *local* (`UsageError` and the rest).
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "DecodeError",
    "InvalidRecord",
    "InvalidSignature",
    "ListenError",
    "NetworkError",
    "NotLoggedIn",
    "P2PTimelineError",
    "PeerUnreachable",
    "ProtocolError",
    "Refused",
    "RegistryUnavailable",
    "RemoteError",
    "StoreError",
    "UnknownUser",
    "UsageError",
    "UsernameTaken",
]


class P2PTimelineError(Exception):
    """Base class of every exception p2ptimeline raises on purpose."""


class UsageError(P2PTimelineError, ValueError):
    """The library was called wrongly: a bad argument or a bad state."""


class NotLoggedIn(UsageError):
    """The operation needs a logged-in user and there is none."""


class AuthError(P2PTimelineError):
    """A password or key does not open or match the identity it should."""


class UsernameTaken(P2PTimelineError):
    """The username is already claimed by another key."""


class UnknownUser(P2PTimelineError):
    """No user of that name is registered."""


class NetworkError(P2PTimelineError):
    """The network could not carry out the operation."""


class PeerUnreachable(NetworkError):
    """A peer did not answer within the time allowed."""


class RegistryUnavailable(NetworkError):
    """No DHT node could be reached to read or write the registry."""


class ListenError(NetworkError):
    """A local UDP or TCP port cannot be bound (taken, or not this machine's).

    Attributes:
        address: The ``(host, port)`` asked for.
    """

    def __init__(self, message: str, address: tuple[str, int]) -> None:
        super().__init__(message)
        self.address = address


class RemoteError(P2PTimelineError):
    """Data that came from somewhere else is not acceptable."""


class DecodeError(RemoteError):
    """Bytes could not be decoded into the expected value."""


class ProtocolError(RemoteError):
    """A peer broke the peer protocol: a malformed or oversized frame, ..."""


class Refused(RemoteError):
    """A peer understood a request and turned it down, saying why (for
    example, it cannot check a name the request relies on right now).

    Unlike a `ProtocolError`, a refusal says nothing bad of the peer: it is
    reachable and speaks the protocol.

    Attributes:
        reason: The peer's reason, at most 200 printable characters.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidRecord(RemoteError):
    """A decoded value is invalid: bad signature, wrong key, wrong shape."""


class InvalidSignature(InvalidRecord):
    """A signature does not verify with the key it should."""


class StoreError(P2PTimelineError):
    """The local store could not complete an operation."""
