"""The decoded-image cache: target images decoded once into a memory-mapped file.

``adapt`` decodes the target images straight into a file of its private run
directory (:func:`read_cached`) and then reads rows from a read-only memory map
of it, so its memory does not grow with the number of images, and a resumed run
(``--resume``) or a later run with the same run directory decodes nothing. One
file per process: ``images.cache`` (rank ``r > 0`` under torchrun:
``images.rank<r>.cache``). Layout::

    [0, 4096)   header: magic, format version, dtype, shape (N, H, W, C), the
                number of listed samples, the key digest, the kept-index count,
                the summary's length, sha256 of the pixels and of the tail, and
                sha256 of the header itself (its last 32 bytes)
    pixels      uint8 (N, H, W, C): the kept images, in dataset order
    indices     int64 little-endian (N,): each row's index in the listing
    summary     strict JSON: the read counts (no names, paths or ids)

The key is a sha256 of the dataset fingerprint (names, sizes, mtimes, labels,
boxes), the decode plan (size, colour, interpolation, face step, reduced-scale
decoding), the format version and the versions of the SDK and Pillow. A file
whose header, size, key, tail or pixel digest does not match, or that is not a
private regular file of this user, is never trusted: it is removed and the
images are decoded again (one warning line on the ``sourcefree`` logger). Writes
go to a temp file in the same folder (mode 0600), fsynced, then renamed.
No torch import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from sourcefree._version import __version__
from sourcefree.data.dataset import (
    Fingerprint,
    ImageDataset,
    ReadReport,
    check_read,
    decode_plan,
)
from sourcefree.data.decode import DecodePlan
from sourcefree.errors import PackageError, WriteError
from sourcefree.fsutil import fsync_dir, shown, signals_deferred, write_error
from sourcefree.package import strictjson
from sourcefree.package.manifest import InputSpec

LOG = logging.getLogger("sourcefree")

CACHE_NAME = "images.cache"
FORMAT_VERSION = 1
MAGIC = b"SFDIMGC\0"
#: Bytes before the pixels (a page: the pixel rows start page-aligned).
HEADER_SIZE = 4096
_DIGEST = 32
# magic, version, header size, dtype, n, h, w, c, listed samples, key,
# kept-index count, summary length, pixel sha256, tail sha256
_HEAD = struct.Struct("<8sII8sQQQQQ32sQQ32s32s")
_DTYPE = b"|u1"
#: The summary holds a few counts; anything longer is refused unread.
_MAX_SUMMARY = 1 << 16
#: Bytes hashed at a time.
_CHUNK = 16 << 20
_COUNTS = ("total", "ok", "bad", "ignored", "dropped", "no_face", "no_face_skipped", "no_eyes")


def cache_path(directory: str | os.PathLike[str], rank: int = 0) -> Path:
    """The cache file of process ``rank`` in ``directory`` (the run directory)."""
    name = CACHE_NAME if rank == 0 else f"images.rank{rank}.cache"
    return Path(directory) / name


def cache_bytes(images: int, spec: InputSpec) -> int:
    """Size of the cache of ``images`` listed images (at most; unreadable ones take none)."""
    plan = decode_plan(spec)
    return HEADER_SIZE + images * (plan.image_bytes + 8) + _MAX_SUMMARY


def cache_key(fingerprint: Fingerprint, plan: DecodePlan) -> bytes:
    """The digest a cache file must carry to be reused for this dataset and plan."""
    versions = {"format": FORMAT_VERSION, "sdk": __version__, "pillow": PIL.__version__}
    if plan.faces.active:  # the detector's library decides which crop is taken
        with contextlib.suppress(ImportError):
            import cv2

            versions["opencv"] = str(cv2.__version__)
    body = {"dataset": dataclasses.asdict(fingerprint), "plan": plan.to_dict(), **versions}
    return hashlib.sha256(b"sourcefree-image-cache\0" + strictjson.dumps(body)).digest()


@dataclass(frozen=True)
class CacheInfo:
    """How the target images were read: decoded into the cache now, or reused from it."""

    reused: bool
    """True: read from a valid cache, nothing decoded."""
    bytes: int
    """Size of the cache file."""
    refused: str | None = None
    """Why an existing cache file was not used (it was decoded again); None: none was."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reused": self.reused, "bytes": self.bytes}
        if self.refused is not None:
            out["refused"] = self.refused
        return out


@dataclass(frozen=True)
class CachedRead:
    """The target images as read through the cache (what ``ImageDataset.load`` returns)."""

    images: np.ndarray
    """uint8 (N, H, W, C), read-only, memory-mapped from the cache file."""
    indices: np.ndarray
    """int64 (N,): index of each image in the dataset's samples."""
    report: ReadReport
    info: CacheInfo
    pixel_sha256: bytes
    """sha256 of ``images``' bytes (the header's, verified or just written)."""


def read_cached(
    folder: ImageDataset,
    spec: InputSpec,
    path: Path,
    *,
    fingerprint: Fingerprint | None = None,
    max_bad_fraction: float = 0.05,
    strict: bool = False,
    progress: bool = False,
    workers: int | None = None,
) -> CachedRead:
    """``folder``'s images at ``spec``, from the cache file ``path`` or decoded into it.

    ``path``'s folder must exist and be private (the run directory). The decode is
    :meth:`ImageDataset.load`'s (``workers``, ``progress``: as there), the rows
    streamed to disk; a reused cache is checked against ``max_bad_fraction`` and
    ``strict`` as a fresh read would be.

    Raises:
        DatasetError, ConfigError: see :meth:`ImageDataset.load` and
            :func:`~sourcefree.data.dataset.check_read`.
        WriteError: the cache could not be written (full disk, I/O error).
    """
    plan = decode_plan(spec)
    key = cache_key(folder.fingerprint() if fingerprint is None else fingerprint, plan)
    found = _open(path, key, plan, folder, verify_pixels=True)
    refused = None
    if isinstance(found, CachedRead):
        check_read(found.report, max_bad_fraction=max_bad_fraction, strict=strict)
        LOG.info(
            "target images: %d read from the decoded-image cache in the run directory "
            "(nothing decoded)",
            len(found.indices),
        )
        return found
    if found is not None:
        refused = found
        LOG.warning(
            "the decoded-image cache in the run directory was refused (%s): "
            "decoding the target images again",
            refused,
        )
    _build(path, key, plan, folder, spec, max_bad_fraction, strict, progress, workers)
    built = _open(path, key, plan, folder, verify_pixels=False)
    if not isinstance(built, CachedRead):  # pragma: no cover - our own file, just written
        raise WriteError(
            f"the decoded-image cache {shown(path)} did not read back",
            built or "it disappeared",
            "check the disk of the run directory, then run again",
        )
    return dataclasses.replace(built, info=CacheInfo(False, built.info.bytes, refused))


def _build(
    path: Path,
    key: bytes,
    plan: DecodePlan,
    folder: ImageDataset,
    spec: InputSpec,
    max_bad_fraction: float,
    strict: bool,
    progress: bool,
    workers: int | None,
) -> None:
    """Decode ``folder`` into a temp file beside ``path``; fsync; rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pixels = hashlib.sha256()
    try:
        _remove(path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
            _remove(stale)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            fh.write(bytes(HEADER_SIZE))

            def sink(row: np.ndarray) -> None:
                pixels.update(row.data)
                fh.write(row.data)

            loaded = folder.load(
                spec=spec,
                max_bad_fraction=max_bad_fraction,
                strict=strict,
                progress=progress,
                workers=workers,
                sink=sink,
            )
            summary = strictjson.dumps(_summary(loaded.report))
            indices = np.ascontiguousarray(loaded.indices, dtype="<i8").tobytes()
            fh.write(indices + summary)
            n = len(loaded.indices)
            head = _HEAD.pack(
                MAGIC, FORMAT_VERSION, HEADER_SIZE, _DTYPE, n, *plan.size, plan.channels,
                len(folder), key, n, len(summary), pixels.digest(),
                hashlib.sha256(indices + summary).digest(),
            )  # fmt: skip
            block = head.ljust(HEADER_SIZE - _DIGEST, b"\0")
            with signals_deferred():
                fh.flush()
                os.pwrite(fh.fileno(), block + hashlib.sha256(block).digest(), 0)
                os.fsync(fh.fileno())
        with signals_deferred():
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc) from None
        raise


def _write_failed(path: Path, exc: OSError) -> WriteError:
    base = write_error(path, exc)
    why = "the disk is full" if exc.errno == errno.ENOSPC else base.why
    return WriteError(
        f"cannot write the decoded-image cache {shown(path)}",
        f"{why}; nothing was half-written",
        "free space on that disk (the cache holds every target image, uncompressed, at the "
        "package's input size), or pass a --workdir on a disk with more room",
    )


def _summary(report: ReadReport) -> dict[str, Any]:
    """The counts kept with the pixels (never the hashed ids of bad files)."""
    out: dict[str, Any] = {k: getattr(report, k) for k in _COUNTS}
    out["reasons"] = dict(sorted(report.reasons.items()))
    return out


def _report(value: Any, folder: ImageDataset) -> ReadReport | None:
    """The summary read back, or None when malformed; listing counts from ``folder``."""
    if not isinstance(value, dict) or set(value) != {*_COUNTS, "reasons"}:
        return None
    counts = [value[k] for k in _COUNTS]
    reasons = value["reasons"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        return None
    if not isinstance(reasons, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in reasons.values()
    ):
        return None
    report = ReadReport(**dict(zip(_COUNTS, counts, strict=True)), reasons=dict(reasons))
    return dataclasses.replace(report, ignored=folder.ignored, dropped=folder.dropped)


def _open(
    path: Path, key: bytes, plan: DecodePlan, folder: ImageDataset, *, verify_pixels: bool
) -> CachedRead | str | None:
    """The cache at ``path`` if it is valid; why not (a short reason); None: no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"it cannot be opened: {exc.strerror or exc}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return "it is not a private file of this user"
        block = os.pread(fd, HEADER_SIZE, 0)
        head = _header(block, key, plan, len(folder))
        if isinstance(head, str):
            return head
        n, summary_len, pixel_digest, tail_digest = head
        pixel_bytes = n * plan.image_bytes
        if st.st_size != HEADER_SIZE + pixel_bytes + 8 * n + summary_len:
            return "its size does not match its header (truncated or extended)"
        tail = os.pread(fd, 8 * n + summary_len, HEADER_SIZE + pixel_bytes)
        if hashlib.sha256(tail).digest() != tail_digest:
            return "its index or summary section was modified"
        read = _tail(tail, n, folder)
        if isinstance(read, str):
            return read
        indices, report = read
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    finally:
        os.close(fd)
    shape = (n, *plan.size, plan.channels)
    images = np.frombuffer(mapped, np.uint8, pixel_bytes, HEADER_SIZE).reshape(shape)
    if verify_pixels and _sha256(images) != pixel_digest:
        return "its pixels do not match their sha256 (modified or damaged)"
    return CachedRead(images, indices, report, CacheInfo(True, st.st_size), pixel_digest)


def _header(
    block: bytes, key: bytes, plan: DecodePlan, listed: int
) -> tuple[int, int, bytes, bytes] | str:
    """(rows, summary length, pixel and tail digests) of a valid header, or why not."""
    if len(block) < HEADER_SIZE or not block.startswith(MAGIC):
        return "it is not a decoded-image cache (no header)"
    body, digest = block[: HEADER_SIZE - _DIGEST], block[HEADER_SIZE - _DIGEST :]
    if hashlib.sha256(body).digest() != digest:
        return "its header was modified"
    (_, version, size, dtype, n, h, w, c, total, stored_key, count, summary_len,
     pixel_digest, tail_digest) = _HEAD.unpack_from(body)  # fmt: skip
    if version != FORMAT_VERSION or size != HEADER_SIZE:
        return f"it has format version {version}, this SDK reads {FORMAT_VERSION}"
    if dtype.rstrip(b"\0") != _DTYPE or (h, w, c) != (*plan.size, plan.channels):
        return "its pixel type or image shape differs from the package's input"
    if stored_key != key or total != listed:
        return "it was decoded from other images or with other decode settings"
    if count != n or n > total or summary_len > _MAX_SUMMARY:
        return "its header is inconsistent"
    return n, summary_len, pixel_digest, tail_digest


def _tail(tail: bytes, n: int, folder: ImageDataset) -> tuple[np.ndarray, ReadReport] | str:
    """The kept indices and the read report of a tail whose digest matched, or why not."""
    indices = np.frombuffer(tail, dtype="<i8", count=n).astype(np.int64)
    if n and (indices[0] < 0 or indices[-1] >= len(folder) or (np.diff(indices) <= 0).any()):
        return "its kept indices are out of order or out of range"
    try:
        value = strictjson.loads(tail[8 * n :], what="cache summary", max_bytes=_MAX_SUMMARY)
    except PackageError:
        return "its summary is unreadable"
    report = _report(value, folder)
    if report is None or report.ok - report.no_face_skipped != n:
        return "its summary does not match its images"
    return indices, report


def _sha256(images: np.ndarray) -> bytes:
    """sha256 of a C-contiguous uint8 array's bytes, read in chunks."""
    flat = images.reshape(-1)
    h = hashlib.sha256()
    for start in range(0, flat.size, _CHUNK):
        h.update(flat[start : start + _CHUNK].data)
    return h.digest()


def discard(path: Path) -> None:
    """Remove a cache file (and its folder when that is left empty); missing is fine."""
    _remove(path)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
