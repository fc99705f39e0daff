"""Ed25519 signatures over the exact bytes of a package's manifest.

The manifest lists the size and sha256 of every other file, so signing its
bytes signs the whole package. Keys are PEM files (PKCS#8 private key,
SubjectPublicKeyInfo public key); the private key is written with mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sourcefree.errors import SignatureError
from sourcefree.fsutil import (
    FileRefusedError,
    atomic_write_files,
    read_regular_file,
)

MAX_SIGNATURE_BYTES = 4096
_PREFIX = b"sourcefree-ed25519-v1:"
MAX_KEY_BYTES = 16384
_KEY_FIX = "pass the key file written by `sourcefree keygen`"


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short, stable identifier of a public key (sha256 of its raw bytes).

    Examples:
        >>> fingerprint(load_public_key("vendor.pub"))
        'ed25519:...'
    """
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def keygen(out: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``OUT.key`` (private, 0600) and ``OUT.pub``; return both paths.

    Examples:
        >>> private, public = keygen("vendor")
        >>> private.name, public.name
        ('vendor.key', 'vendor.pub')
    """
    base = Path(out)
    priv_path = base.with_name(base.name + ".key")
    pub_path = base.with_name(base.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise SignatureError(
                f"key file {str(p)!r} already exists",
                "overwriting a key would orphan every package it signed",
                "choose another name, or pass --overwrite",
            )
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = public_pem(key)
    atomic_write_files({priv_path: (priv, 0o600), pub_path: (pub, 0o644)})  # both or neither
    return priv_path, pub_path


def _read_key_bytes(source: str | os.PathLike[str] | bytes, what: str) -> bytes:
    """A key file's bytes, read without blocking and never past :data:`MAX_KEY_BYTES`.

    The file is opened with ``O_NONBLOCK`` (a FIFO with no writer does not
    hang), must be a regular file (not a device such as ``/dev/zero``, a FIFO
    or a directory), and is read with a bound.
    """
    if isinstance(source, bytes):
        data = source
        shown = "given as bytes"
    else:
        shown = f"{str(source)[:120]!r}"
        data = _read_bounded(Path(source), f"the {what} key {shown}")
    if not data.strip():
        raise SignatureError(f"the {what} key {shown} is empty", "it holds no PEM data", _KEY_FIX)
    if len(data) > MAX_KEY_BYTES:
        raise SignatureError(
            f"the {what} key {shown} is too large",
            f"a key file holds at most {MAX_KEY_BYTES} bytes",
            _KEY_FIX,
        )
    return data


def _read_bounded(path: Path, label: str) -> bytes:
    """Read a key file: regular, never blocking, at most ``MAX_KEY_BYTES``."""
    try:
        return read_regular_file(path, MAX_KEY_BYTES)
    except FileRefusedError as exc:
        if exc.reason == "not-regular":
            raise SignatureError(
                f"{label} is not a regular file",
                "a device, FIFO or directory could feed endless or blocking input",
                "pass the key file itself",
            ) from None
        size = f" ({exc.size} bytes)" if exc.size else ""
        raise SignatureError(
            f"{label} is too large{size}",
            f"a key file holds at most {MAX_KEY_BYTES} bytes",
            _KEY_FIX,
        ) from None
    except OSError as exc:
        raise SignatureError(
            f"{label} cannot be read", exc.strerror or str(exc), "check the path"
        ) from None


def load_private_key(source: str | os.PathLike[str] | bytes) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 PKCS#8 PEM private key (a path or the PEM bytes).

    Examples:
        >>> key = load_private_key("vendor.key")
        >>> fingerprint(key.public_key())  # the key's identity, safe to show
    """
    data = _read_key_bytes(source, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError(
            "the private key is not an unencrypted PEM key",
            str(exc).split("\n")[0][:200],
            "pass the .key file written by `sourcefree keygen`",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            "the private key is not an Ed25519 key",
            f"it is a {type(key).__name__}",
            "create one with `sourcefree keygen`",
        )
    return key


def load_public_key(source: str | os.PathLike[str] | bytes) -> Ed25519PublicKey:
    """An Ed25519 SubjectPublicKeyInfo PEM public key (a path or the PEM bytes).

    Examples:
        >>> key = load_public_key("vendor.pub")
        >>> load_package("fer-pkg", public_key="vendor.pub")  # loads it the same way
    """
    data = _read_key_bytes(source, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(
            "the public key is not a PEM public key",
            str(exc).split("\n")[0][:200],
            "pass the .pub file written by `sourcefree keygen`",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            "the public key is not an Ed25519 key",
            f"it is a {type(key).__name__}",
            "ask the vendor for the .pub file written by `sourcefree keygen`",
        )
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of ``key``'s public half, as ``keygen`` writes it."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign_bytes(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """Signature file contents: a versioned prefix and the base64 signature.

    Examples:
        >>> pkg = load_package("fer-pkg")
        >>> data = sign_bytes(pkg.manifest_bytes, load_private_key("vendor.key"))
        >>> data.startswith(b"sourcefree-ed25519-v1:")
        True
    """
    return _PREFIX + base64.b64encode(key.sign(manifest_bytes)) + b"\n"


def verify_bytes(manifest_bytes: bytes, signature: bytes, key: Ed25519PublicKey) -> str:
    """Check a signature file against manifest bytes; return the signer fingerprint.

    Examples:
        >>> pkg = load_package("fer-pkg")
        >>> signature = (pkg.path / "signature").read_bytes()
        >>> verify_bytes(pkg.manifest_bytes, signature, load_public_key("vendor.pub"))
        'ed25519:...'
    """
    body = signature.strip()
    if not body.startswith(_PREFIX):
        raise SignatureError(
            "the signature file is malformed",
            "it does not start with the sourcefree-ed25519-v1 prefix",
            "sign the package again with `sourcefree sign`",
        )
    try:
        raw = base64.b64decode(body[len(_PREFIX) :], validate=True)
    except ValueError:
        raise SignatureError(
            "the signature file is malformed", "its body is not base64", "sign again"
        ) from None
    try:
        key.verify(raw, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            "the package signature does not verify with the given public key",
            "it was signed by another key, or the package changed after signing",
            "check you have the vendor's public key and an unmodified package",
        ) from None
    return fingerprint(key)
