"""Read and verify a package directory before anything in it is parsed.

Order of checks (docs/package-format.md): the directory itself, the manifest
(strict JSON, schema), the file set (nothing missing, nothing unlisted, regular
files only, one link, real path inside), sizes and sha256 of every file, the
signature, and only then the contents (safetensors header and values, the ONNX
graphs: the classifier and any auxiliary model). No torch import, no pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sourcefree.errors import IntegrityError, PackageError, SignatureError
from sourcefree.fsutil import atomic_write_bytes, shown, staged_directory, write_errors
from sourcefree.package import onnx_check, signing, strictjson, weights
from sourcefree.package.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ONNX_NAME,
    SIGNATURE_NAME,
    WEIGHTS_NAME,
    AUDetectorSpec,
    FileEntry,
    Manifest,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_CHUNK = 1 << 20
#: The layout of ``sourcefree adapt -o OUT``: ``OUT/package`` beside ``OUT/report.json``
#: (:mod:`sourcefree.pipeline.report` re-exports both names).
PACKAGE_DIR = "package"
REPORT_NAME = "report.json"
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Package:
    """A verified package from :func:`load_package`; file contents are the hashed bytes.

    Examples:
        >>> from sourcefree import load_package
        >>> pkg = load_package("fer-pkg", public_key="vendor.pub")
        >>> pkg.manifest.name, pkg.labels, pkg.signer
        >>> graph = pkg.read("model.onnx")  # the verified bytes, never read twice
    """

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    sha256: str
    """sha256 of the exact manifest bytes: the package's identity."""
    signed: bool
    """A ``signature`` file is present."""
    signature_verified: bool
    """The signature was checked against a public key and holds."""
    signer: str | None = None
    """Fingerprint of the key that signed, when verified."""
    blobs: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    def read(self, name: str) -> bytes:
        """Verified bytes of a listed file."""
        if name not in self.blobs:
            raise PackageError(
                f"{name!r} is not a file of this package",
                f"files: {', '.join(sorted(self.blobs))}",
                "use one of the listed names",
            )
        return self.blobs[name]

    @property
    def onnx_bytes(self) -> bytes:
        return self.read(ONNX_NAME)

    @property
    def weights_bytes(self) -> bytes:
        return self.read(WEIGHTS_NAME)

    @property
    def au_detector(self) -> AUDetectorSpec | None:
        """The action-unit detector the package carries (``auxiliary.au_detector``), if any."""
        aux = self.manifest.auxiliary
        return aux.au_detector if aux is not None else None


def _open_regular(root: Path, name: str, max_bytes: int | None = None) -> bytes:
    """Read ``root/name``: a regular file, one hard link, real path inside ``root``."""
    path = root / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise PackageError(
            f"package file {name!r} is missing",
            "the manifest lists it",
            "copy the complete package directory again",
        ) from None
    if stat.S_ISLNK(st.st_mode):
        raise PackageError(
            f"package file {name!r} is a symbolic link",
            "links could point outside the package",
            "replace the link with the real file",
        )
    if not stat.S_ISREG(st.st_mode):
        raise PackageError(
            f"package entry {name!r} is not a regular file",
            "packages hold regular files only",
            "remove it",
        )
    if st.st_nlink != 1:
        raise PackageError(
            f"package file {name!r} has {st.st_nlink} hard links",
            "a hard link can expose a file from outside the package",
            "copy the file (cp, not ln) so it has a single link",
        )
    real = Path(os.path.realpath(path))
    if real.parent != Path(os.path.realpath(root)):
        raise PackageError(
            f"package file {name!r} resolves outside the package",
            "its real path is not inside the package directory",
            "copy the package as plain files",
        )
    if max_bytes is not None and st.st_size > max_bytes:
        raise PackageError(
            f"{name} is {st.st_size} bytes",
            f"the limit is {max_bytes} bytes",
            "re-export the package with the SDK",
        )
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        fst = os.fstat(fh.fileno())
        if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev) or fst.st_nlink != 1:
            raise PackageError(
                f"package file {name!r} changed while it was being read",
                "another process is modifying the package",
                "retry when the package is no longer being written",
            )
        limit = max_bytes + 1 if max_bytes is not None else -1
        return fh.read(limit)


def _check_pin(manifest_bytes: bytes, expected: str) -> None:
    """Refuse a package whose identity is not the pinned sha256."""
    want = expected.strip().lower()
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise PackageError(
            f"the pinned sha256 {expected[:70]!r} is not a sha256 hex digest",
            "a pin is the 64 hex digits printed by `sourcefree verify`",
            "copy the sha256 from the verify output of the package you approved",
        )
    got = hashlib.sha256(manifest_bytes).hexdigest()
    if got != want:
        raise IntegrityError(
            f"package identity {got} is not the pinned {want}",
            "this is another package (an older or newer release, or a different one), "
            "even if its signature is valid",
            "use the package you pinned, or pin the new one after reviewing it",
        )


def _list_dir(root: Path) -> set[str]:
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise PackageError(
            f"package directory {str(root)!r} does not exist",
            "nothing is there",
            "pass the path of a package directory (it holds manifest.json)",
        ) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PackageError(
            f"{str(root)!r} is not a package directory",
            "a package is a plain directory holding manifest.json",
            "pass the directory itself, not a link or an archive",
        )
    return {entry.name for entry in os.scandir(root)}


def _is_dir(path: Path) -> bool:
    """A real directory (not a link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    """A regular file (not a link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def resolve_package_dir(path: str | os.PathLike[str]) -> Path:
    """The package directory that ``path`` names: itself, or the package of an adapt output.

    ``sourcefree adapt -o OUT`` writes ``OUT/package`` beside ``OUT/report.json``.
    When ``path`` is such a folder (no manifest.json of its own; report.json and
    package/manifest.json present, none of them links), ``path/package`` is
    returned and an info line on the ``sourcefree`` logger names it (the CLI
    prints it on stderr unless ``--quiet``). Any other path comes back unchanged:
    :func:`load_package` then checks it as a package. Every command and
    :class:`~sourcefree.runtime.predictor.Predictor` load packages through it.
    """
    root = Path(path)
    inner = root / PACKAGE_DIR
    if (
        _is_dir(root)
        and not os.path.lexists(root / MANIFEST_NAME)
        and _is_file(root / REPORT_NAME)
        and _is_dir(inner)
        and _is_file(inner / MANIFEST_NAME)
    ):
        _LOG.info(
            "%s is an adapt output folder; its package is %s (using it)",
            shown(root),
            shown(inner),
        )
        return inner
    return root


def load_package(
    path: str | os.PathLike[str],
    public_key: str | os.PathLike[str] | bytes | None = None,
    require_signature: bool = False,
    expected_sha256: str | None = None,
) -> Package:
    """Verify a package and return it; nothing is parsed before it is verified.

    Args:
        path: the package directory, or an ``adapt`` output folder (its ``package/``
            is used and named on stderr: :func:`resolve_package_dir`).
        public_key: the vendor's Ed25519 public key (PEM path or bytes). When
            given, the package must carry a valid signature by that key.
        require_signature: refuse unsigned packages even without a key.
        expected_sha256: pin the package: its identity (sha256 of the exact
            manifest bytes) must be this hex digest. A signature proves who made a
            package, not which of the vendor's packages it is; the pin refuses an
            older (or any other) signed package replayed in its place.

    Raises:
        PackageError: schema, layout or content problems (names the field or file).
        IntegrityError: a file's size or sha256 differs from the manifest.
        SignatureError: missing, malformed or wrong-key signature.

    Examples:
        >>> from sourcefree import load_package
        >>> pkg = load_package("fer-pkg", public_key="vendor.pub")
        >>> pkg.signature_verified, pkg.sha256  # the identity `sourcefree verify` prints
        (True, '...')
        >>> pinned = load_package("fer-pkg", public_key="vendor.pub", expected_sha256=pkg.sha256)
    """
    root = resolve_package_dir(path)
    entries = _list_dir(root)
    if MANIFEST_NAME not in entries:
        raise PackageError(
            f"{str(root)!r} has no manifest.json",
            "every package starts with its manifest",
            "pass a package directory: the folder written by `sourcefree export`, or the "
            "package/ folder inside the output of `sourcefree adapt`",
        )
    manifest_bytes = _open_regular(root, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if expected_sha256 is not None:
        _check_pin(manifest_bytes, expected_sha256)
    manifest = Manifest.from_dict(
        strictjson.loads(manifest_bytes, what=MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    )
    listed = set(manifest.files)
    present = entries - {MANIFEST_NAME, SIGNATURE_NAME}
    for name in sorted(listed - present):
        raise PackageError(
            f"package file {name!r} is missing",
            "the manifest lists it",
            "copy the complete package directory again",
        )
    for name in sorted(present - listed):
        raise PackageError(
            f"package holds an unlisted entry {name!r}",
            "every file must be listed with its size and sha256",
            "remove it; packages are never edited by hand",
        )
    blobs: dict[str, bytes] = {}
    for name, entry in sorted(manifest.files.items()):
        data = _open_regular(root, name, entry.size)
        if len(data) != entry.size:
            raise IntegrityError(
                f"package file {name!r} is {len(data)} bytes, the manifest says {entry.size}",
                "it was truncated or changed after export",
                "copy the package again from the vendor",
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise IntegrityError(
                f"package file {name!r} does not match its sha256",
                "its contents changed after export",
                "copy the package again from the vendor",
            )
        blobs[name] = data

    signed = SIGNATURE_NAME in entries
    verified = False
    signer = None
    if signed:
        sig = _open_regular(root, SIGNATURE_NAME, signing.MAX_SIGNATURE_BYTES)
        if public_key is not None:
            signer = signing.verify_bytes(manifest_bytes, sig, signing.load_public_key(public_key))
            verified = True
    elif public_key is not None or require_signature:
        raise SignatureError(
            f"package {manifest.name!r} is not signed",
            "a signature was required" + (" (a public key was given)" if public_key else ""),
            "ask the vendor for a signed package (`sourcefree sign PKG --key PRIVATE`)",
        )
    if require_signature and not verified:
        raise SignatureError(
            f"package {manifest.name!r} carries a signature but no public key was given",
            "an unverified signature proves nothing",
            "pass the vendor's public key (--key PUBLIC.pem)",
        )

    weights.check_safetensors(blobs[WEIGHTS_NAME], manifest)
    onnx_check.check_model(blobs[ONNX_NAME], manifest)
    aux = manifest.auxiliary
    if aux is not None and aux.au_detector is not None:
        onnx_check.check_au_detector(blobs[aux.au_detector.file], aux.au_detector, manifest)
    return Package(
        path=root,
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        signed=signed,
        signature_verified=verified,
        signer=signer,
        blobs=blobs,
    )


def publish_package(
    blobs: Mapping[str, bytes],
    manifest: Manifest,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    private: Ed25519PrivateKey | None = None,
) -> Package:
    """Write ``blobs`` (file name -> bytes) and ``manifest`` (its ``files`` set from them)
    as a package at ``out``, signed with ``private`` if given.

    The package is staged, must read back (and verify with the key) before it is
    renamed into place; on any error nothing is left at ``out``.

    Raises:
        WriteError: ``out`` cannot be written; PackageError: it does not read back.
    """
    files = {
        k: FileEntry(size=len(v), sha256=hashlib.sha256(v).hexdigest()) for k, v in blobs.items()
    }
    manifest_bytes = strictjson.dumps(dataclasses.replace(manifest, files=files).to_dict())
    written = {**blobs, MANIFEST_NAME: manifest_bytes}
    public = None
    if private is not None:
        written[SIGNATURE_NAME] = signing.sign_bytes(manifest_bytes, private)
        public = signing.public_pem(private)
    target = Path(out)
    with staged_directory(target, overwrite=overwrite) as stage:
        for fname, data in written.items():
            with write_errors(target / fname):
                (stage / fname).write_bytes(data)
        load_package(stage, public_key=public)  # it must read back before it is published
    return load_package(target, public_key=public)


def sign_package(path: str | os.PathLike[str], key: str | os.PathLike[str] | bytes) -> str:
    """Verify a package, then write its ``signature``; return the key fingerprint.

    It lives beside :func:`load_package` (the verification it needs), so that
    :mod:`sourcefree.package.signing` depends on nothing that loads packages.

    Examples:
        >>> from sourcefree.package.signing import keygen
        >>> private, public = keygen("vendor")
        >>> sign_package("fer-pkg", private)
        'ed25519:...'
        >>> load_package("fer-pkg", public_key=public).signature_verified
        True
    """
    pkg = load_package(path)
    private = signing.load_private_key(key)
    atomic_write_bytes(pkg.path / SIGNATURE_NAME, signing.sign_bytes(pkg.manifest_bytes, private))
    return signing.fingerprint(private.public_key())
