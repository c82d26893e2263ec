"""Identity: Ed25519 keys, signatures, and the password-sealed key."""

from __future__ import annotations

import pytest

import p2ptimeline as pt

FAST = 10  # scrypt cost exponent for tests: n = 1024


def test_sign_and_verify() -> None:
    """A signature verifies with the signer's key only, and for the data signed."""
    alice, bob = pt.Identity.generate(), pt.Identity.generate()
    signature = alice.sign(b"data")
    pt.verify(alice.public_key, b"data", signature)
    with pytest.raises(pt.InvalidSignature):
        pt.verify(bob.public_key, b"data", signature)
    with pytest.raises(pt.InvalidSignature):
        pt.verify(alice.public_key, b"Data", signature)


@pytest.mark.parametrize(
    ("key", "signature"),
    [(b"short", bytes(64)), (bytes(32), b"short"), (bytes(32), bytes(64))],
)
def test_verify_refuses_malformed_keys_and_signatures(
    key: bytes, signature: bytes
) -> None:
    """Malformed keys and signatures raise InvalidSignature, never anything else."""
    with pytest.raises(pt.InvalidSignature):
        pt.verify(key, b"data", signature)


def test_private_bytes_round_trip() -> None:
    """An identity rebuilt from its private bytes has the same public key."""
    alice = pt.Identity.generate()
    again = pt.Identity.from_private_bytes(alice.private_bytes())
    assert again.public_key == alice.public_key
    assert len(alice.public_key) == 32
    with pytest.raises(pt.UsageError):
        pt.Identity.from_private_bytes(b"short")


def test_seal_unseal_round_trip() -> None:
    """unseal(seal(password), password) gives back the same key pair."""
    alice = pt.Identity.generate()
    blob = alice.seal("correct horse", log2_n=FAST)
    assert alice.private_bytes() not in blob
    assert pt.Identity.unseal(blob, "correct horse").public_key == alice.public_key


def test_default_cost_round_trip() -> None:
    """The default scrypt cost seals and unseals too."""
    alice = pt.Identity.generate()
    blob = alice.seal("pw")
    assert pt.Identity.unseal(blob, "pw").public_key == alice.public_key


def test_wrong_password_is_auth_error() -> None:
    """A wrong password raises AuthError."""
    blob = pt.Identity.generate().seal("right", log2_n=FAST)
    with pytest.raises(pt.AuthError):
        pt.Identity.unseal(blob, "wrong")


def test_password_is_unicode_normalised() -> None:
    """Composed and decomposed spellings of one password open the same blob."""
    blob = pt.Identity.generate().seal("caf\u00e9", log2_n=FAST)
    pt.Identity.unseal(blob, "cafe\u0301")


def test_each_seal_is_fresh() -> None:
    """Sealing twice uses a new salt and nonce."""
    alice = pt.Identity.generate()
    assert alice.seal("pw", log2_n=FAST) != alice.seal("pw", log2_n=FAST)


@pytest.mark.parametrize("index", [0, 4, 5, 8, 30, 40, 60, 83])
def test_tampered_blob_is_refused(index: int) -> None:
    """Flipping any byte of a sealed blob makes unseal fail cleanly."""
    blob = bytearray(pt.Identity.generate().seal("pw", log2_n=FAST))
    blob[index] ^= 0x01
    with pytest.raises((pt.AuthError, pt.DecodeError)):
        pt.Identity.unseal(bytes(blob), "pw")


def test_malformed_blob_is_decode_error() -> None:
    """Bytes that are not a sealed identity raise DecodeError."""
    for blob in [b"", b"P2PS", b"x" * 84, b"P2PS" + bytes(80)]:
        with pytest.raises(pt.DecodeError):
            pt.Identity.unseal(blob, "pw")


def test_blob_asking_for_huge_scrypt_cost_is_refused() -> None:
    """A published blob cannot make a peer spend gigabytes on scrypt."""
    blob = bytearray(pt.Identity.generate().seal("pw", log2_n=FAST))
    blob[5] = 24  # n = 2**24 with r = 8: 16 GiB
    with pytest.raises(pt.DecodeError, match="memory"):
        pt.Identity.unseal(bytes(blob), "pw")
    with pytest.raises(pt.UsageError):
        pt.Identity.generate().seal("pw", log2_n=30)
