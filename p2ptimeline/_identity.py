"""User identity: an Ed25519 key pair, and its password-sealed form.

The sealed form is safe to publish (the registry keeps it in the DHT so a
user can log in from any peer): it is the private key encrypted with
ChaCha20-Poly1305 under a key derived from the password with scrypt.

Layout of a sealed blob (all integers are single bytes)::

    b"P2PS" | version=1 | log2(n) | r | p | salt (16) | nonce (12)
    | ciphertext (32 + 16)

The header up to the nonce is authenticated as associated data, so the cost
parameters cannot be tampered with either.
"""

from __future__ import annotations

import functools
import os
import unicodedata

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ._errors import AuthError, DecodeError, InvalidSignature, UsageError

__all__ = ["PUBLIC_KEY_SIZE", "SIGNATURE_SIZE", "Identity", "verify"]

PUBLIC_KEY_SIZE = 32
"""Size in bytes of a raw Ed25519 public key."""
SIGNATURE_SIZE = 64
"""Size in bytes of an Ed25519 signature."""

_MAGIC = b"P2PS"
_VERSION = 1
_SALT_SIZE = 16
_NONCE_SIZE = 12
_HEADER_SIZE = len(_MAGIC) + 4 + _SALT_SIZE
_SEALED_SIZE = _HEADER_SIZE + _NONCE_SIZE + 32 + 16
DEFAULT_LOG2_N = 15
"""Default scrypt cost: n = 2**15, r = 8, p = 1 (32 MiB, ~0.1 s)."""
_MAX_SCRYPT_MEMORY = 256 * 1024 * 1024  # refuse to unseal blobs costlier than this


class Identity:
    """A user's Ed25519 key pair.

    Create one with `Identity.generate()`, keep it with `seal()` and get it
    back with `Identity.unseal()`.
    """

    __slots__ = ("_private", "_public")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        """Wrap an existing `cryptography` private key."""
        self._private = private_key
        self._public = private_key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        """Create a new random identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> Identity:
        """Rebuild an identity from the 32 raw bytes of its private key.

        Raises:
            UsageError: `data` is not 32 bytes long.
        """
        if len(data) != 32:
            raise UsageError("an Ed25519 private key is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(data))

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._public

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key. Keep it secret."""
        return self._private.private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )

    def sign(self, data: bytes) -> bytes:
        """Sign `data`; returns the 64-byte signature."""
        return self._private.sign(data)

    def seal(self, password: str, *, log2_n: int = DEFAULT_LOG2_N) -> bytes:
        """Encrypt the private key under `password`.

        Args:
            password: The user's password.
            log2_n: scrypt cost exponent; raise it for more resistance to
                guessing, lower it (not below 10) only in tests.

        Returns:
            The sealed blob, safe to store or publish.
        """
        r, p = 8, 1
        _check_cost(log2_n, r, p, error=UsageError)
        salt = os.urandom(_SALT_SIZE)
        header = _MAGIC + bytes([_VERSION, log2_n, r, p]) + salt
        nonce = os.urandom(_NONCE_SIZE)
        key = _derive(password, salt, log2_n, r, p)
        ciphertext = ChaCha20Poly1305(key).encrypt(nonce, self.private_bytes(), header)
        return header + nonce + ciphertext

    @classmethod
    def unseal(cls, blob: bytes, password: str) -> Identity:
        """Decrypt a blob made by `seal()`.

        Raises:
            AuthError: The password is wrong (or the blob was tampered with).
            DecodeError: `blob` is not a sealed identity at all.
        """
        if len(blob) != _SEALED_SIZE or not blob.startswith(_MAGIC):
            raise DecodeError("not a sealed identity")
        version, log2_n, r, p = blob[4:8]
        if version != _VERSION:
            raise DecodeError(f"unknown sealed identity version {version}")
        _check_cost(log2_n, r, p, error=DecodeError)
        header, rest = blob[:_HEADER_SIZE], blob[_HEADER_SIZE:]
        salt = header[8:]
        nonce, ciphertext = rest[:_NONCE_SIZE], rest[_NONCE_SIZE:]
        key = _derive(password, salt, log2_n, r, p)
        try:
            private = ChaCha20Poly1305(key).decrypt(nonce, ciphertext, header)
        except InvalidTag:
            raise AuthError("wrong password") from None
        return cls.from_private_bytes(private)

    def __repr__(self) -> str:
        return f"Identity(public_key={self._public.hex()[:16]}...)"


def verify(public_key: bytes, data: bytes, signature: bytes) -> None:
    """Check that `signature` is `public_key`'s signature of `data`.

    Raises:
        InvalidSignature: It is not, or the key or signature is malformed.
    """
    if len(signature) != SIGNATURE_SIZE:
        raise InvalidSignature("malformed signature")
    _verify_once(public_key, data, signature)


@functools.lru_cache(maxsize=16384)
def _verify_once(public_key: bytes, data: bytes, signature: bytes) -> None:
    # Registry reads see the same entries from several replicas: remember the
    # triples that verified (failures raise, and are not cached).
    try:
        _load_public_key(public_key).verify(signature, data)
    except (_CryptoInvalidSignature, ValueError):
        raise InvalidSignature("signature does not verify") from None


@functools.lru_cache(maxsize=4096)
def _load_public_key(public_key: bytes) -> Ed25519PublicKey:
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError("malformed public key")
    return Ed25519PublicKey.from_public_bytes(public_key)


def _check_cost(log2_n: int, r: int, p: int, *, error: type[Exception]) -> None:
    if not 10 <= log2_n <= 24 or not 1 <= r <= 32 or not 1 <= p <= 4:
        raise error("scrypt parameters out of range")
    if 128 * r * (1 << log2_n) > _MAX_SCRYPT_MEMORY:
        raise error("scrypt parameters need too much memory")


def _derive(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    return Scrypt(salt=salt, length=32, n=1 << log2_n, r=r, p=p).derive(secret)
