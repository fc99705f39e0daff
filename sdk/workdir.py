"""Private run directory: lock, run identity, atomic checkpoints, cleanup.

Layout (mode 0700)::

    WORKDIR/
      lock                 fcntl.flock'ed by the running process (holds its pid)
      run.json             identity: method, config, dataset fingerprint, source sha256s
      checkpoints/
        ckpt-00000007/     state.safetensors, state.json, MANIFEST.json (sha256 of both)
        ckpt-00000008/

A checkpoint is written into a hidden temporary directory (each file fsynced),
then renamed into place and the parent fsynced; ``MANIFEST.json`` is written
last. The newest two are kept. Loading verifies the manifest and falls back to
the previous checkpoint with a warning when the newest is damaged. No pickle:
tensors go to safetensors, everything else to strict JSON.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from sourcefree import strictjson
from sourcefree.errors import CheckpointError, ResumeError, WorkdirError
from sourcefree.fsutil import atomic_write_bytes, fsync_dir

LOCK_NAME = "lock"
IDENTITY_NAME = "run.json"
CHECKPOINTS = "checkpoints"
TENSORS_NAME = "state.safetensors"
META_NAME = "state.json"
MANIFEST_NAME = "MANIFEST.json"
KEEP = 2
MAX_META_BYTES = 256 * 1024 * 1024
_CKPT_RE = re.compile(r"^ckpt-(\d{8})$")


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint read back from disk."""

    sequence: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync one new file (raises OSError on a full disk)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


class Workdir:
    """A private, locked run directory. Use as a context manager.

    Args:
        path: the directory; created with mode 0700 when missing.

    Raises:
        WorkdirError: it cannot be created, is not a private directory, or
            another run holds its lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self._lock_fd: int | None = None
        self._sequence = 0

    # -- lifecycle --------------------------------------------------------------------

    def open(self) -> Workdir:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.path)
        except OSError as exc:
            raise WorkdirError(
                f"cannot create the run directory {str(self.path)!r}",
                exc.strerror or str(exc),
                "pass a writable --workdir",
            ) from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise WorkdirError(
                f"run directory {str(self.path)!r} is not a directory",
                "a link or a file cannot hold private checkpoints",
                "pass another --workdir",
            )
        if st.st_uid != os.getuid():
            raise WorkdirError(
                f"run directory {str(self.path)!r} belongs to another user",
                "checkpoints must stay private to the user running the adaptation",
                "pass a --workdir you own",
            )
        os.chmod(self.path, 0o700)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(
                    f"run directory {str(self.path)!r} is in use by another run (pid {holder})",
                    "two runs must not write the same checkpoints",
                    "wait for the other run to finish, or pass another --workdir",
                ) from None
            raise WorkdirError(
                f"cannot lock the run directory {str(self.path)!r}", str(exc), ""
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        (self.path / CHECKPOINTS).mkdir(mode=0o700, exist_ok=True)
        self._clean_temporaries()
        existing = self._sequences()
        self._sequence = existing[-1] if existing else 0
        return self

    def close(self) -> None:
        """Release the lock (the directory stays)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """Release the lock and delete the directory with everything in it."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Workdir:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- identity -----------------------------------------------------------------------

    def read_identity(self) -> dict[str, Any] | None:
        """The identity of the run that wrote this directory, or None."""
        path = self.path / IDENTITY_NAME
        if not path.exists():
            return None
        try:
            value = strictjson.loads(path.read_bytes(), what=IDENTITY_NAME, max_bytes=1 << 24)
        except Exception as exc:
            raise ResumeError(
                f"{IDENTITY_NAME} in the run directory is unreadable",
                str(exc),
                "start a fresh run in another --workdir",
            ) from None
        if not isinstance(value, dict):
            raise ResumeError(f"{IDENTITY_NAME} is not an object", "", "start a fresh run")
        return value

    def write_identity(self, identity: Mapping[str, Any]) -> None:
        """Record the run's identity (atomic)."""
        self._guard_write(
            lambda: atomic_write_bytes(
                self.path / IDENTITY_NAME, strictjson.dumps(dict(identity)), mode=0o600
            )
        )

    # -- checkpoints -------------------------------------------------------------------

    def _sequences(self) -> list[int]:
        out = []
        root = self.path / CHECKPOINTS
        if root.is_dir():
            for entry in os.scandir(root):
                match = _CKPT_RE.match(entry.name)
                if match and entry.is_dir(follow_symlinks=False):
                    out.append(int(match.group(1)))
        return sorted(out)

    def _clean_temporaries(self) -> None:
        root = self.path / CHECKPOINTS
        for entry in os.scandir(root):
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry.path, ignore_errors=True)

    def has_checkpoints(self) -> bool:
        return bool(self._sequences())

    def _guard_write(self, action: Any) -> None:
        try:
            action()
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else "an I/O error occurred"
            raise CheckpointError(
                f"could not write to the run directory {str(self.path)!r} ({exc.strerror or exc})",
                f"{reason}; nothing was half-written and the previous checkpoint is intact",
                "free disk space (or pass a --workdir on another disk), then run again "
                "with --resume",
            ) from None

    def save_checkpoint(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Write a new checkpoint atomically and keep the newest :data:`KEEP`.

        Raises:
            CheckpointError: a write failed (full disk, I/O error). The temporary
                directory is removed and earlier checkpoints are untouched.
        """
        from safetensors.torch import save as save_safetensors

        sequence = self._sequence + 1
        root = self.path / CHECKPOINTS
        final = root / f"ckpt-{sequence:08d}"
        tmp = root / f".tmp-{sequence:08d}-{secrets.token_hex(4)}"
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        blob = save_safetensors(plain)
        meta_bytes = strictjson.dumps({"sequence": sequence, **dict(meta)})
        manifest = {
            "format": "sourcefree-checkpoint-v1",
            "sequence": sequence,
            "files": {
                TENSORS_NAME: {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
                META_NAME: {
                    "size": len(meta_bytes),
                    "sha256": hashlib.sha256(meta_bytes).hexdigest(),
                },
            },
        }

        def write() -> None:
            try:
                os.mkdir(tmp, 0o700)
                _write_file(tmp / TENSORS_NAME, blob)
                _write_file(tmp / META_NAME, meta_bytes)
                _write_file(tmp / MANIFEST_NAME, strictjson.dumps(manifest))
                fsync_dir(tmp)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(root)

        self._guard_write(write)
        self._sequence = sequence
        for old in self._sequences()[:-KEEP]:
            shutil.rmtree(root / f"ckpt-{old:08d}", ignore_errors=True)
        return final

    def _read(self, sequence: int) -> Checkpoint:
        from safetensors.torch import load as load_safetensors

        folder = self.path / CHECKPOINTS / f"ckpt-{sequence:08d}"
        manifest = strictjson.loads(
            (folder / MANIFEST_NAME).read_bytes(), what=MANIFEST_NAME, max_bytes=1 << 20
        )
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or set(files) != {TENSORS_NAME, META_NAME}:
            raise ValueError("the checkpoint manifest lists the wrong files")
        blobs = {}
        for name, entry in files.items():
            data = (folder / name).read_bytes()
            if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get(
                "sha256"
            ):
                raise ValueError(f"{name} does not match its sha256")
            blobs[name] = data
        meta = strictjson.loads(blobs[META_NAME], what=META_NAME, max_bytes=MAX_META_BYTES)
        if not isinstance(meta, dict):
            raise ValueError(f"{META_NAME} is not an object")
        return Checkpoint(sequence, load_safetensors(blobs[TENSORS_NAME]), meta)

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; damaged newer ones are skipped with a warning.

        Raises:
            CheckpointError: checkpoints exist but none verifies.
        """
        sequences = self._sequences()
        problems = []
        for sequence in reversed(sequences):
            try:
                return self._read(sequence)
            except Exception as exc:
                problems.append(f"ckpt-{sequence:08d}: {exc}")
                warnings.warn(
                    f"checkpoint ckpt-{sequence:08d} is damaged ({exc}); "
                    "falling back to the previous one",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if sequences:
            raise CheckpointError(
                "no checkpoint in the run directory could be read",
                "; ".join(problems),
                "start a fresh run (without --resume) in another --workdir",
            )
        return None
