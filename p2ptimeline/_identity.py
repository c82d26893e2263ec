"""User identity: an Ed25519 key pair, its password-sealed form, and what a
password must be.

The sealed form can be published (by default the registry keeps it in the
DHT, inside the user's signed claim, so that the user can log in from any
peer): it is the private key encrypted with ChaCha20-Poly1305 under a key
derived from the password. Whoever reads it can try passwords offline, so
the derivation is deliberately slow and memory-hard, and `check_password`
refuses the passwords tried first.

Layout of a sealed blob (the three cost parameters are single bytes)::

    b"P2PS" | version | cost1 | cost2 | cost3 | salt (16) | nonce (12)
    | ciphertext (32 + 16)

* Version 2, made by `Identity.seal`: Argon2id (RFC 9106, version 0x13);
  cost1 = log2 of the memory in KiB, cost2 = passes, cost3 = lanes.
* Version 1, made by earlier releases and still opened: scrypt;
  cost1 = log2(n), cost2 = r, cost3 = p.

The header up to the nonce is authenticated as associated data, so the cost
parameters cannot be tampered with either. Before deriving anything,
`Identity.unseal` refuses parameters that would need more than 256 MiB or
about a second of work, so a hostile blob cannot exhaust a peer.
"""

from __future__ import annotations

import functools
import itertools
import os
import string
import threading
import unicodedata

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from ._errors import AuthError, DecodeError, InvalidSignature, UsageError

__all__ = [
    "DEFAULT_SEAL_COST",
    "MIN_PASSWORD_LENGTH",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "Identity",
    "check_password",
    "verify",
]

_ARGON2_LOCK = threading.Lock()  # see `_derive`

PUBLIC_KEY_SIZE = 32
"""Size in bytes of a raw Ed25519 public key."""
SIGNATURE_SIZE = 64
"""Size in bytes of an Ed25519 signature."""

DEFAULT_SEAL_COST = 16
"""Default cost of `Identity.seal`: Argon2id with 2**16 KiB (64 MiB) of
memory, 3 passes and 4 lanes, RFC 9106's second recommended setting
(about 0.17 s on one core of an AMD EPYC server)."""
MIN_SEAL_COST = 10
"""Lowest cost `Identity.seal` accepts: 1 MiB, for tests only."""
MAX_SEAL_COST = 18
"""Highest cost `Identity.seal` accepts: 256 MiB, what every peer opens."""
MIN_PASSWORD_LENGTH = 8
"""Fewest characters `check_password` accepts."""

_MAGIC = b"P2PS"
_SCRYPT, _ARGON2ID = 1, 2  # versions of the sealed form
_PASSES, _LANES = 3, 4  # Argon2id, as sealed
_SALT_SIZE = 16
_NONCE_SIZE = 12
_HEADER_SIZE = len(_MAGIC) + 4 + _SALT_SIZE
_SEALED_SIZE = _HEADER_SIZE + _NONCE_SIZE + 32 + 16
# What unsealing may cost at most, whatever a blob asks for: the memory, and
# the bytes of memory the derivation fills (memory times passes for Argon2id,
# times p for scrypt), about a second on one core.
_MAX_MEMORY = 256 * 1024 * 1024
_MAX_ARGON2_WORK = 4 * _MAX_MEMORY
_MAX_SCRYPT_WORK = _MAX_MEMORY


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

    def seal(self, password: str, *, cost: int = DEFAULT_SEAL_COST) -> bytes:
        """Encrypt the private key under `password` (a version 2 blob).

        This does not judge the password: `check_password` does, and `Peer`
        calls it wherever a password is chosen.

        Args:
            password: The user's password.
            cost: log2 of the Argon2id memory in KiB (3 passes, 4 lanes),
                from 10 (1 MiB, for tests only) to 18 (256 MiB). Each step
                doubles the memory and the time of every guess, for the user
                once per login and for an attacker once per password tried.

        Returns:
            The sealed blob, safe to store or publish.

        Raises:
            UsageError: `cost` is out of range.
        """
        if not MIN_SEAL_COST <= cost <= MAX_SEAL_COST:
            raise UsageError(
                f"seal cost {cost} out of range: "
                f"from {MIN_SEAL_COST} (1 MiB) to {MAX_SEAL_COST} (256 MiB)"
            )
        salt = os.urandom(_SALT_SIZE)
        header = _MAGIC + bytes([_ARGON2ID, cost, _PASSES, _LANES]) + salt
        nonce = os.urandom(_NONCE_SIZE)
        key = _derive(password, header)
        ciphertext = ChaCha20Poly1305(key).encrypt(nonce, self.private_bytes(), header)
        return header + nonce + ciphertext

    @classmethod
    def unseal(cls, blob: bytes, password: str) -> Identity:
        """Decrypt a blob made by `seal()`, of this release or an earlier one.

        Raises:
            AuthError: The password is wrong (or the blob was tampered with).
            DecodeError: `blob` is not a sealed identity at all, or asks for
                more memory or time than a peer spends on it.
        """
        if len(blob) != _SEALED_SIZE or not blob.startswith(_MAGIC):
            raise DecodeError("not a sealed identity")
        header, rest = blob[:_HEADER_SIZE], blob[_HEADER_SIZE:]
        nonce, ciphertext = rest[:_NONCE_SIZE], rest[_NONCE_SIZE:]
        key = _derive(password, header)
        try:
            private = ChaCha20Poly1305(key).decrypt(nonce, ciphertext, header)
        except InvalidTag:
            raise AuthError("wrong password") from None
        return cls.from_private_bytes(private)

    def __repr__(self) -> str:
        return f"Identity(public_key={self._public.hex()[:16]}...)"


def check_password(password: str, username: str = "") -> None:
    """Refuse a password that would not hold out against offline guessing.

    A published sealed key can be attacked offline, one key derivation per
    guess, and guessers try empty, short and well-known passwords first.
    Refused: the empty password; fewer than `MIN_PASSWORD_LENGTH` characters;
    the username with little else; a well-known password (with digits or
    symbols around it or not); a repetition or a run of characters, or only
    digits (fewer than 12). A few unrelated words make a good password.

    Args:
        password: The password a user chose.
        username: Whose password it is (an empty string skips that check).

    Raises:
        UsageError: The password is refused; the message says why.
    """
    text = unicodedata.normalize("NFC", password)
    folded = text.casefold()
    if not text:
        raise UsageError("the password is empty")
    if len(text) < MIN_PASSWORD_LENGTH:
        raise UsageError(
            f"the password is too short: {len(text)} characters, "
            f"at least {MIN_PASSWORD_LENGTH} (a few words are best)"
        )
    name = unicodedata.normalize("NFC", username).casefold()
    if name and len(folded.replace(name, "")) < MIN_PASSWORD_LENGTH:
        raise UsageError("the password is the username, or little more")
    if folded in _COMMON or folded.strip(_DECORATION) in _COMMON:
        raise UsageError("the password is too common: it is among the first tried")
    steps = {ord(b) - ord(a) for a, b in itertools.pairwise(folded)}
    if len(set(folded)) < 4 or (len(steps) == 1 and steps <= {-1, 1}):
        raise UsageError(
            "the password is too simple: a repetition or a run of characters"
        )
    if folded.isdigit() and len(folded) < 12:
        raise UsageError("the password is too simple: only digits (fewer than 12)")


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


def _derive(password: str, header: bytes) -> bytes:
    """The 32-byte key of a sealed blob with `header` (magic, version, costs,
    salt), once the costs are checked.

    Raises:
        DecodeError: Unknown version, or costs out of range or too high.
    """
    version, cost1, cost2, cost3 = header[4:8]
    salt = header[8:]
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    if version == _ARGON2ID:
        _check_argon2(cost1, cost2, cost3)
        kdf = Argon2id(
            salt=salt, length=32, iterations=cost2, lanes=cost3, memory_cost=1 << cost1
        )
        # OpenSSL's Argon2 (cryptography 50) fails or hangs when two
        # derivations run at once in one process (seen with two threads);
        # and each one takes its memory cost anyway: one at a time.
        with _ARGON2_LOCK:
            return kdf.derive(secret)
    if version == _SCRYPT:
        _check_scrypt(cost1, cost2, cost3)
        return Scrypt(salt=salt, length=32, n=1 << cost1, r=cost2, p=cost3).derive(
            secret
        )
    raise DecodeError(f"unknown sealed identity version {version}")


def _check_argon2(log2_kib: int, passes: int, lanes: int) -> None:
    if not 1 <= passes <= 255 or not 1 <= lanes <= 16 or (1 << log2_kib) < 8 * lanes:
        raise DecodeError("Argon2id parameters out of range")
    memory = 1024 << log2_kib
    if memory > _MAX_MEMORY:
        raise DecodeError("Argon2id parameters need too much memory")
    if memory * passes > _MAX_ARGON2_WORK:
        raise DecodeError("Argon2id parameters need too much time")


def _check_scrypt(log2_n: int, r: int, p: int) -> None:
    if not 1 <= log2_n <= 63 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise DecodeError("scrypt parameters out of range")
    memory = 128 * r << log2_n
    if memory > _MAX_MEMORY:
        raise DecodeError("scrypt parameters need too much memory")
    if memory * p > _MAX_SCRYPT_WORK:
        raise DecodeError("scrypt parameters need too much time")


# Stripped from both ends of a password before the look-up in _COMMON, so
# that "Password1!" counts as "password".
_DECORATION = string.digits + string.punctuation + string.whitespace

# Passwords and stems guessers try first: the head of the public leaked-password
# lists (casefolded; shorter ones matter as stems), and this service's names.
# A word list reads best as text, hence str.split.
_COMMON = frozenset(
    """
    password passw0rd p@ssword p@ssw0rd passwort motdepasse contraseña
    qwerty qwertz azerty qwertyuiop asdf asdfgh asdfghjkl zxcvbnm qazwsx
    1qaz2wsx zaq12wsx 1q2w3e4r 1q2w3e4r5t q1w2e3r4 q1w2e3r4t5 a1b2c3d4
    qwe123 abc123 123abc abc abcd abcdef aa123456 123qwe qweasd qweasdzxc
    iloveyou letmein welcome admin administrator root guest user login
    access secret changeme default master shadow superman batman spiderman
    trustno1 monkey dragon sunshine princess football baseball soccer
    hockey basketball starwars whatever freedom computer internet hello
    hellothere michael jennifer jordan hunter killer charlie ginger pokemon
    cheese summer winter autumn spring love lovely flower mustang harley
    ranger thomas robert daniel matrix orange banana apple chocolate pepper
    maggie buster tigger cookie samsung google facebook ashley nicole
    jessica andrew joshua hannah ninja jesus blessed angel liverpool
    chelsea arsenal barcelona secret123 test testing test123 demo sample
    example p2ptimeline timeline twitter
    12345678 123456789 1234567890 0987654321 87654321 987654321 11111111
    00000000 12341234 11223344 12121212 123123123 147258369 147852369
    159753 741852963 1234qwer qwer1234 iloveyou1 password1 password123
    """.split()  # noqa: SIM905
)
