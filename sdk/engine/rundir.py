"""A private run directory: created 0700 and owned by the user, locked, with the run's identity.

Layout::

    WORKDIR/
      lock                 fcntl.flock'ed by the running process (holds its pid)
      run.json             identity: method, config, dataset fingerprint, source sha256s
      checkpoints/         written by :class:`~sourcefree.engine.checkpoints.CheckpointStore`
      images.cache         the decoded target images (:mod:`sourcefree.data.cache`);
                           under torchrun rank r > 0 writes images.rank<r>.cache

A :class:`RunDir` refuses a link, a file or another user's directory, and a
directory another run holds the lock of. Writes into it go through
:func:`guarded_write`, so a full disk is one typed error that says nothing was
half-written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from sourcefree.errors import CheckpointError, ResumeError, WorkdirError
from sourcefree.fsutil import atomic_write_bytes
from sourcefree.package import strictjson

LOCK_NAME = "lock"
IDENTITY_NAME = "run.json"


def guarded_write(run_dir: Path, action: Callable[[], Any]) -> None:
    """Run ``action`` (a write into ``run_dir``); an OSError becomes a CheckpointError.

    Raises:
        CheckpointError: the disk is full or an I/O error occurred.
    """
    try:
        action()
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else "an I/O error occurred"
        raise CheckpointError(
            f"could not write to the run directory {str(run_dir)!r} ({exc.strerror or exc})",
            f"{reason}; nothing was half-written and the previous checkpoint is intact",
            "free disk space (or pass a --workdir on another disk), then run again with --resume",
        ) from None


def make_private(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check it: a directory of this user, made 0700.

    Raises:
        WorkdirError: it cannot be created, or is a link, a file or another user's.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise WorkdirError(
            f"cannot create the run directory {str(path)!r}",
            exc.strerror or str(exc),
            "pass a writable --workdir",
        ) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise WorkdirError(
            f"run directory {str(path)!r} is not a directory",
            "a link or a file cannot hold private checkpoints",
            "pass another --workdir",
        )
    if st.st_uid != os.getuid():
        raise WorkdirError(
            f"run directory {str(path)!r} belongs to another user",
            "checkpoints must stay private to the user running the adaptation",
            "pass a --workdir you own",
        )
    os.chmod(path, 0o700)
    return path


class RunDir:
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

    def open(self) -> RunDir:
        """Create (or check) the directory, make it private and take its lock."""
        self._make_private()
        self._lock()
        return self

    def _make_private(self) -> None:
        make_private(self.path)

    def _lock(self) -> None:
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

    def __enter__(self) -> RunDir:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def read_identity(self) -> dict[str, Any] | None:
        """The identity of the run that wrote this directory, or None.

        Raises:
            ResumeError: ``run.json`` is unreadable or not a JSON object.
        """
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
        guarded_write(
            self.path,
            lambda: atomic_write_bytes(
                self.path / IDENTITY_NAME, strictjson.dumps(dict(identity)), mode=0o600
            ),
        )
