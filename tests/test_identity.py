"""Identity: Ed25519 keys, signatures, the password-sealed key, password rules."""

from __future__ import annotations

import asyncio

import pytest
from conftest import PeerFactory
from test_examples import bootstrap_nodes, run

import p2ptimeline as pt
from p2ptimeline._identity import check_password

FAST = 10  # seal cost for tests: Argon2id with 1 MiB
PASSWORD = "correct horse"
NEW_PASSWORD = "battery staple"

# Made by the release before Argon2id (commit d7d89c8) for the key
# bytes(range(32)), password "pw": scrypt with n = 2**10, then the old
# default, n = 2**15 (r = 8, p = 1 both).
OLD_KEY = bytes(range(32))
OLD_PASSWORD = "pw"
OLD_BLOBS = [
    "50325053010a08011aa4950ddfe38801284f7190f9fba61781b0e52e9fce518b13878699493f"
    "ed1efa97a486051a36f49bb5e7d91f70d59dabe63a11909b21d4ae54ad089fc166f2a67e8d78"
    "b231e58e810c3ba2",
    "50325053010f080153058ddebbd712ea3bcf287452df6a04e42adac9706aa841d8f87922ea97"
    "2acbc7d58d318fb704512da166b1ab5cfa47c293b8ccbc3c2709545b47103e7cfeec4b414e9e"
    "e32635fe632c8fd8",
]
# Made by this release for the same key: Argon2id, 1 MiB, 3 passes, 4 lanes.
V2_PASSWORD = "v2 fixture password"
V2_BLOB = (
    "50325053020a0304f04af9c44d67c1d0df61b66f224af4be8e519c00a3bf90ecd436b2b9aa8b"
    "a2343d1e2197be9049ef96680c047691e878f749f6ecd43730c9ec180f2faccb136e43325238"
    "fbc059f34bcdf255"
)


# Keys and signatures


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


# The sealed key


def test_seal_unseal_round_trip() -> None:
    """unseal(seal(password), password) gives back the same key pair."""
    alice = pt.Identity.generate()
    blob = alice.seal(PASSWORD, cost=FAST)
    assert alice.private_bytes() not in blob
    assert pt.Identity.unseal(blob, PASSWORD).public_key == alice.public_key


def test_default_seal_is_argon2id_with_64_mib_3_passes_4_lanes() -> None:
    """By default a key is sealed as version 2: Argon2id with RFC 9106's second
    recommended setting (2**16 KiB, 3 passes, 4 lanes), and opens again."""
    alice = pt.Identity.generate()
    blob = alice.seal(PASSWORD)
    assert blob[:8] == b"P2PS" + bytes([2, 16, 3, 4])
    assert pt.Identity.unseal(blob, PASSWORD).public_key == alice.public_key


@pytest.mark.parametrize("blob", OLD_BLOBS, ids=["scrypt-2^10", "scrypt-2^15"])
def test_blobs_sealed_by_earlier_releases_still_open(blob: str) -> None:
    """A version 1 (scrypt) blob made before Argon2id opens with its password."""
    identity = pt.Identity.unseal(bytes.fromhex(blob), OLD_PASSWORD)
    assert identity.private_bytes() == OLD_KEY
    with pytest.raises(pt.AuthError):
        pt.Identity.unseal(bytes.fromhex(blob), PASSWORD)


def test_a_version_2_blob_of_this_release_opens() -> None:
    """The version 2 layout is fixed: a blob sealed by this release opens."""
    identity = pt.Identity.unseal(bytes.fromhex(V2_BLOB), V2_PASSWORD)
    assert identity.private_bytes() == OLD_KEY


@pytest.mark.parametrize("cost", [-1, 9, 19, 30])
def test_seal_cost_out_of_range_is_usage_error(cost: int) -> None:
    """seal() accepts costs 10 (1 MiB) to 18 (256 MiB) only."""
    with pytest.raises(pt.UsageError, match="seal cost"):
        pt.Identity.generate().seal(PASSWORD, cost=cost)


def test_wrong_password_is_auth_error() -> None:
    """A wrong password raises AuthError."""
    blob = pt.Identity.generate().seal(PASSWORD, cost=FAST)
    with pytest.raises(pt.AuthError):
        pt.Identity.unseal(blob, "wrong")


def test_password_is_unicode_normalised() -> None:
    """Composed and decomposed spellings of one password open the same blob."""
    blob = pt.Identity.generate().seal("caf\u00e9 au lait", cost=FAST)
    pt.Identity.unseal(blob, "cafe\u0301 au lait")


def test_each_seal_is_fresh() -> None:
    """Sealing twice uses a new salt and nonce."""
    alice = pt.Identity.generate()
    assert alice.seal(PASSWORD, cost=FAST) != alice.seal(PASSWORD, cost=FAST)


@pytest.mark.parametrize("index", [0, 4, 5, 6, 7, 8, 30, 40, 60, 83])
def test_tampered_blob_is_refused(index: int) -> None:
    """Flipping any byte of a sealed blob makes unseal fail cleanly."""
    blob = bytearray(pt.Identity.generate().seal(PASSWORD, cost=FAST))
    blob[index] ^= 0x01
    with pytest.raises((pt.AuthError, pt.DecodeError)):
        pt.Identity.unseal(bytes(blob), PASSWORD)


def test_malformed_blob_is_decode_error() -> None:
    """Bytes that are not a sealed identity raise DecodeError."""
    for blob in [b"", b"P2PS", b"x" * 84, b"P2PS" + bytes(80)]:
        with pytest.raises(pt.DecodeError):
            pt.Identity.unseal(blob, PASSWORD)


@pytest.mark.parametrize(
    ("version", "costs", "match"),
    [
        (2, (19, 3, 4), "memory"),  # 512 MiB
        (2, (255, 3, 4), "memory"),
        (2, (18, 5, 4), "time"),  # 256 MiB, 5 passes
        (2, (16, 255, 4), "time"),  # 64 MiB, 255 passes
        (2, (16, 0, 4), "range"),
        (2, (16, 3, 0), "range"),
        (2, (16, 3, 255), "range"),
        (2, (4, 3, 4), "range"),  # 16 KiB: less than 8 KiB per lane
        (1, (24, 8, 1), "memory"),  # scrypt, 16 GiB
        (1, (18, 8, 4), "time"),  # scrypt, 256 MiB four times over
        (1, (15, 8, 0), "range"),
        (3, (10, 3, 4), "version"),
    ],
)
def test_blob_asking_for_a_huge_cost_is_refused_before_deriving(
    version: int, costs: tuple[int, int, int], match: str
) -> None:
    """A published blob cannot make a peer spend more than 256 MiB or about a
    second of key derivation: unseal refuses it, without deriving."""
    blob = bytearray(bytes.fromhex(V2_BLOB))
    blob[4:8] = bytes([version, *costs])
    with pytest.raises(pt.DecodeError, match=match):
        pt.Identity.unseal(bytes(blob), V2_PASSWORD)


# Password rules


@pytest.mark.parametrize(
    ("password", "match"),
    [
        ("", "empty"),
        ("pw", "too short"),
        ("s3cr3t!", "too short"),
        ("carolcarol", "username"),
        ("Carol2024!", "username"),
        ("Password1!", "too common"),
        ("qwertyuiop", "too common"),
        ("iloveyou", "too common"),
        ("  letmein123 ", "too common"),
        ("p2ptimeline", "too common"),
        ("aaaaaaaaaa", "too simple"),
        ("abababab", "too simple"),
        ("abcdefghij", "too simple"),
        ("98765432", "too simple"),
        ("5550123456", "too simple"),
    ],
)
def test_check_password_refuses_weak_passwords(password: str, match: str) -> None:
    """Empty, short, username-based, common and trivial passwords are refused,
    and the message says which rule."""
    with pytest.raises(pt.UsageError, match=match):
        check_password(password, "carol")


@pytest.mark.parametrize(
    "password",
    [
        PASSWORD,
        NEW_PASSWORD,
        "carol's long password",
        "Zürich-Bern-Genf",
        "日本語のパスワードです",
        "739104826153",
        "13579bdf",
    ],
)
def test_check_password_accepts_reasonable_passwords(password: str) -> None:
    """Passphrases, long digit strings and non-ASCII passwords pass."""
    check_password(password, "carol")


async def test_register_refuses_weak_passwords(peers: PeerFactory) -> None:
    """register() refuses an empty or trivially weak password with a UsageError
    saying why, before anything is claimed."""
    (peer,) = await peers(1)
    for password, match in [
        ("", "empty"),
        ("pw", "too short"),
        ("password1", "too common"),
        ("carol123", "username"),
    ]:
        with pytest.raises(pt.UsageError, match=match):
            await peer.register("carol", password)
        assert peer.username is None
    assert await peer.registry.get_user("carol") is None
    await peer.register("carol", PASSWORD)
    assert peer.username == "carol"


async def test_login_never_judges_the_password(peers: PeerFactory) -> None:
    """A user sealed by an earlier release, with a password now refused and an
    scrypt blob, still logs in: the rules apply only where a password is set."""
    (peer,) = await peers(1)
    identity = pt.Identity.from_private_bytes(OLD_KEY)
    blob = bytes.fromhex(OLD_BLOBS[0])
    await peer.registry.claim_username("olduser", identity, blob)
    with pytest.raises(pt.AuthError):
        await peer.login("olduser", PASSWORD)
    await peer.login("olduser", OLD_PASSWORD)
    assert peer.username == "olduser"


# Keeping the sealed key off the DHT


async def test_an_unpublished_key_logs_in_only_where_it_is_kept(
    peers: PeerFactory,
) -> None:
    """register(publish_key=False) claims the name with no sealed key: a login on
    another peer fails saying why, one on the registering peer works, and a
    password change keeps the key unpublished."""
    home, away = await peers(2)
    await home.register("erin", PASSWORD, publish_key=False)
    record = await away.registry.get_user("erin")
    assert record is not None
    assert record.sealed_key == b""
    await home.logout()

    with pytest.raises(pt.AuthError, match="does not publish a sealed key"):
        await away.login("erin", PASSWORD)
    await home.login("erin", PASSWORD)
    await home.change_password(PASSWORD, NEW_PASSWORD)
    record = await away.registry.get_user("erin")
    assert record is not None
    assert record.sealed_key == b""
    await home.logout()

    with pytest.raises(pt.AuthError, match="wrong password"):
        await home.login("erin", PASSWORD)
    await home.login("erin", NEW_PASSWORD)
    assert home.username == "erin"


# Changing the password


async def test_change_password_moves_every_login_to_the_new_one(
    peers: PeerFactory,
) -> None:
    """After change_password the new password logs in on another peer and the
    old one fails there and at home; a copy of the old blob, taken before,
    still opens with the old password (only a new key would help)."""
    home, away = await peers(2)
    await home.register("dave", PASSWORD)
    before = await away.registry.get_user("dave")
    assert before is not None

    with pytest.raises(pt.UsageError, match="too short"):
        await home.change_password(PASSWORD, "pw")
    with pytest.raises(pt.AuthError, match="current password is wrong"):
        await home.change_password("not my password", NEW_PASSWORD)
    await home.change_password(PASSWORD, NEW_PASSWORD)
    await home.logout()

    after = await away.registry.get_user("dave")
    assert after is not None
    assert after.public_key == before.public_key
    assert after.sealed_key != before.sealed_key
    with pytest.raises(pt.AuthError):
        await away.login("dave", PASSWORD)
    await away.login("dave", NEW_PASSWORD)
    await away.logout()
    with pytest.raises(pt.AuthError):
        await home.login("dave", PASSWORD)
    await home.login("dave", NEW_PASSWORD)

    copied = pt.Identity.unseal(before.sealed_key, PASSWORD)
    assert copied.public_key == before.public_key


async def test_change_password_needs_a_login(peers: PeerFactory) -> None:
    """change_password without a logged-in user is NotLoggedIn."""
    (peer,) = await peers(1)
    with pytest.raises(pt.NotLoggedIn):
        await peer.change_password(PASSWORD, NEW_PASSWORD)


# The CLI


@pytest.mark.slow
async def test_cli_refuses_a_weak_password_and_changes_one() -> None:
    """examples/cli.py: register says why a password is refused; passwd (the two
    passwords on the next lines) changes it; the old one then fails."""
    async with bootstrap_nodes() as network:
        code, _, err = await run(*network, "-c", "register zoe pw")
        assert code == 1
        assert err == (
            "error: the password is too short: 2 characters, "
            "at least 8 (a few words are best)\n"
        )

        lines = ["not my password", NEW_PASSWORD, PASSWORD, NEW_PASSWORD]
        code, out, err = await run(
            *network,
            "-c",
            f"register zoe {PASSWORD}; passwd; passwd",
            stdin="".join(f"{line}\n" for line in lines),
        )
        assert (code, err) == (1, "error: the current password is wrong\n")
        assert out.count("password changed") == 1

        code, out, err = await run(
            *network, "-c", f"login zoe {PASSWORD}; login zoe {NEW_PASSWORD}"
        )
        assert (code, err) == (1, "error: wrong password\n")
        assert "logged in as zoe" in out


async def test_many_seals_at_once_in_threads_all_succeed() -> None:
    """Sealing in many threads at once (as peers in one process registering
    together do) succeeds every time: OpenSSL's Argon2 fails or hangs when
    two derivations run at once, so they take turns."""
    identities = [pt.Identity.generate() for _ in range(32)]
    async with asyncio.timeout(60):
        blobs = await asyncio.gather(
            *(asyncio.to_thread(i.seal, "correct horse", cost=10) for i in identities)
        )
    assert all(
        pt.Identity.unseal(b, "correct horse").public_key == i.public_key
        for b, i in zip(blobs, identities, strict=True)
    )
