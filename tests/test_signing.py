"""Ed25519 signing: a package signed by another key, or changed after signing, fails."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sourcefree import SignatureError, load_package
from sourcefree.manifest import WEIGHTS_NAME
from sourcefree.signing import keygen, sign_package


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "vendor")


def test_keygen_writes_private_key_with_mode_0600(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes()
    assert b"PUBLIC KEY" in pub.read_bytes()


def test_keygen_refuses_to_overwrite(keys: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="already exists.*--overwrite"):
        keygen(tmp_path / "vendor")


def test_sign_then_verify(pkg_copy: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    fp = sign_package(pkg_copy, priv)
    pkg = load_package(pkg_copy, public_key=pub)
    assert pkg.signed and pkg.signature_verified
    assert pkg.signer == fp
    unverified = load_package(pkg_copy)
    assert unverified.signed and not unverified.signature_verified


def test_wrong_key_is_refused(pkg_copy: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    priv, _ = keys
    _, other_pub = keygen(tmp_path / "other")
    sign_package(pkg_copy, priv)
    with pytest.raises(SignatureError, match="does not verify with the given public key"):
        load_package(pkg_copy, public_key=other_pub)


def test_change_after_signing_is_refused(
    pkg_copy: Path, keys: tuple[Path, Path], forge: Callable[[Path, str, bytes], None]
) -> None:
    priv, pub = keys
    sign_package(pkg_copy, priv)
    data = bytearray((pkg_copy / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    forge(pkg_copy, WEIGHTS_NAME, bytes(data))  # consistent hashes, stale signature
    with pytest.raises(SignatureError, match="changed after signing"):
        load_package(pkg_copy, public_key=pub)


def test_garbled_signature_is_refused(pkg_copy: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    sign_package(pkg_copy, priv)
    (pkg_copy / "signature").write_text("not a signature")
    with pytest.raises(SignatureError, match="malformed"):
        load_package(pkg_copy, public_key=pub)


def test_signature_present_but_no_key_with_require(pkg_copy: Path, keys: tuple[Path, Path]) -> None:
    sign_package(pkg_copy, keys[0])
    with pytest.raises(SignatureError, match="no public key was given"):
        load_package(pkg_copy, require_signature=True)


def test_public_key_in_place_of_private_key(pkg_copy: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(SignatureError, match="not an unencrypted PEM key"):
        sign_package(pkg_copy, keys[1])


def test_non_ed25519_public_key_is_refused(pkg_copy: Path, keys: tuple[Path, Path]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    sign_package(pkg_copy, keys[0])
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        load_package(pkg_copy, public_key=pem)
