"""Ed25519 signing: a package signed by another key, or changed after signing, fails."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sourcefree import SignatureError, load_package
from sourcefree.package.loader import sign_package
from sourcefree.package.manifest import WEIGHTS_NAME
from sourcefree.package.signing import keygen


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


def test_replayed_older_signed_package_is_refused_by_the_pin(
    pkg_copy: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """A valid signature does not say which release it is: the sha256 pin does."""
    import hashlib
    import json
    import shutil

    from click.testing import CliRunner

    from sourcefree.cli.app import main
    from sourcefree.errors import IntegrityError, PackageError

    private, public = keys
    older = tmp_path / "older"
    shutil.copytree(pkg_copy, older)
    raw = json.loads((pkg_copy / "manifest.json").read_text())
    raw["version"] = "2.0.0"
    (pkg_copy / "manifest.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    # pkg_copy now stands for the newer release the customer pinned (only its identity
    # is used); `older` is the vendor's earlier, validly signed package.
    sign_package(older, private)
    pinned = hashlib.sha256((older / "manifest.json").read_bytes()).hexdigest()
    assert load_package(older, public_key=public, expected_sha256=pinned).sha256 == pinned
    other = hashlib.sha256((pkg_copy / "manifest.json").read_bytes()).hexdigest()
    with pytest.raises(IntegrityError, match="is not the pinned"):
        load_package(older, public_key=public, expected_sha256=other)
    with pytest.raises(PackageError, match="not a sha256 hex digest"):
        load_package(older, expected_sha256="abc")
    ok = CliRunner().invoke(main, ["verify", str(older), "--key", str(public), "--sha256", pinned])
    assert ok.exit_code == 0 and f"sha256 {pinned}" in ok.output
    bad = CliRunner().invoke(main, ["verify", str(older), "--key", str(public), "--sha256", other])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "is not the pinned" in bad.output
