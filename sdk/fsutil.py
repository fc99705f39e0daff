"""Atomic file and directory writes: a final path holds a whole result or nothing.

Signals: :func:`interruptible` turns SIGINT/SIGTERM into
:class:`~sourcefree.errors.Interrupted` (exit code 128 + signal) so that the
``except BaseException`` cleanups below run; a SIGTERM's default action would
kill the process and leave staging folders behind. The few steps that must
not be cut in half (a whole atomic file write, creating a temporary, the final
renames, the cleanup) run in :func:`signals_deferred`: a signal that arrives
meanwhile is raised right after. Main thread only (elsewhere the guards do
nothing).

Errors: an ``OSError`` while writing (full disk, read-only or missing folder)
becomes a :class:`~sourcefree.errors.WriteError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from sourcefree.errors import Interrupted, SourcefreeError, WriteError

#: File suffixes treated as images.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SHOWN = 160  # characters of a path quoted in a message

#: errno -> (why, fix) of a failed write.
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space is left on the device", "free space there, or write elsewhere"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there, or write elsewhere"),
    errno.EROFS: ("the folder is read-only (read-only file system)", "choose a writable folder"),
    errno.EACCES: (
        "the folder is read-only for this user (permission denied)",
        "choose a writable folder",
    ),
    errno.EPERM: (
        "the folder is read-only for this user (not permitted)",
        "choose a writable folder",
    ),
    errno.ENOENT: ("its folder does not exist", "create the folder first, or choose another path"),
    errno.ENOTDIR: ("a part of its path is not a folder", "choose another path"),
    errno.EISDIR: ("a folder of that name exists", "choose a file name"),
    errno.ELOOP: ("it is a symbolic link", "remove the link, or choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
}


def shown(path: str | os.PathLike[str]) -> str:
    """A path for a message: quoted, escaped, at most a short prefix."""
    text = str(path)
    return repr(text[:_SHOWN] + ("..." if len(text) > _SHOWN else ""))


def write_error(path: str | os.PathLike[str], exc: OSError) -> WriteError:
    """The typed error of a failed write of ``path``: what, why (from errno), fix."""
    why, fix = _WRITE_ERRORS.get(
        exc.errno or 0,
        (f"the system said: {exc.strerror or type(exc).__name__}", "write elsewhere"),
    )
    return WriteError(f"cannot write {shown(path)}", why, fix)


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`WriteError` naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Deferral:
    """Main-thread state of :func:`signals_deferred`: nesting depth, signal held back."""

    depth = 0
    pending = 0


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A critical section: a signal caught by :func:`interruptible` waits until its end.

    Python runs signal handlers in the main thread whichever thread the kernel
    picked, so the deferral is done by the handler itself (blocking the signal
    in one thread would not hold it back while other threads run).
    """
    if not _main_thread():
        yield
        return
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        if _Deferral.depth == 0 and _Deferral.pending:
            signum, _Deferral.pending = _Deferral.pending, 0
            raise Interrupted(signum)


def _is_default(sig: signal.Signals, handler: Any) -> bool:
    if sig == signal.SIGINT:
        return handler is signal.default_int_handler
    return bool(handler == signal.SIG_DFL)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT/SIGTERM raise :class:`Interrupted` inside the block (once; later ones wait).

    Only signals whose handler is the default are taken over (an ignored signal
    stays ignored; the trainer's own handlers are kept); the previous handlers
    come back on exit. No-op outside the main thread.
    """
    if not _main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:  # a second signal must not cut the cleanup of the first short
            return
        fired.append(signum)
        if _Deferral.depth:
            _Deferral.pending = signum
            return
        raise Interrupted(signum)

    previous = {}
    for sig in _SIGNALS:
        old = signal.getsignal(sig)
        if _is_default(sig, old):
            previous[sig] = old
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class FileRefusedError(Exception):
    """:func:`read_regular_file` refused a file: ``reason`` is ``not-regular``,
    ``too-large`` (``size`` from fstat) or ``grew``; callers raise their typed error."""

    def __init__(self, reason: str, size: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.size = size


def read_regular_file(path: Path, max_bytes: int, *, follow_links: bool = True) -> bytes:
    """Read a regular file of at most ``max_bytes``, never blocking and never unbounded.

    Opened with ``O_NONBLOCK`` (a FIFO without a writer does not hang) and, unless
    ``follow_links``, ``O_NOFOLLOW``; ``fstat`` of the open file must show a regular
    file (not ``/dev/zero``, a FIFO or a directory) whose size is checked before
    any byte is read; the buffer is that size, and a file that grows meanwhile is
    refused. OSError (missing, unreadable) propagates.

    Raises:
        FileRefusedError: not a regular file (or a link, with ``follow_links=False``),
            too large, or grew while read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOCTTY", 0) | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise FileRefusedError("not-regular") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefusedError("not-regular")
        if st.st_size > max_bytes:
            raise FileRefusedError("too-large", st.st_size)
        parts: list[bytes] = []
        got = 0
        while got < st.st_size:
            chunk = os.read(fd, st.st_size - got)
            if not chunk:
                break  # shrank while read: the caller's parser reports it as truncated
            parts.append(chunk)
            got += len(chunk)
        if os.read(fd, 1):
            raise FileRefusedError("grew")
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Write a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    On any error (a full disk included) the temp file is removed, an existing file
    at ``path`` is left untouched and a :class:`WriteError` names ``path``.
    """
    atomic_write_files({Path(path): (data, mode)})


def atomic_write_files(files: Mapping[Path, tuple[bytes, int]]) -> None:
    """Write several files (path -> (bytes, mode)) all or none.

    Each gets a fsynced temp file beside it; only when all are written are they
    renamed into place, in order. SIGINT/SIGTERM wait until the files are in
    place (or removed). An ``OSError`` becomes a :class:`WriteError` naming the file.
    """
    if not files:
        return
    temps: list[str] = []
    current = next(iter(files))
    with interruptible(), signals_deferred():
        try:
            for current, (data, mode) in files.items():
                fd, tmp = tempfile.mkstemp(
                    prefix=f".{current.name}.", suffix=".tmp", dir=current.parent
                )
                temps.append(tmp)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, mode)
            for tmp, current in zip(temps, files, strict=True):
                os.replace(tmp, current)
        except BaseException as exc:
            for tmp in temps:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(exc, OSError):
                raise write_error(current, exc) from None
            raise
    for parent in dict.fromkeys(p.parent for p in files):
        fsync_dir(parent)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output directory unless ``overwrite``."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SourcefreeError(
            f"output path {str(out)!r} exists and is not a directory",
            "a package is written as a directory",
            "choose another --out path",
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SourcefreeError(
            f"output directory {str(out)!r} exists and is not empty",
            "writing into it could mix two packages",
            "choose another --out path, or pass --overwrite to replace it",
        )


def check_output_file(path: Path) -> None:
    """Refuse, before any work, an output file that could not be written.

    Its folder must exist (it is not created: a typo would scatter files) and take
    a new file (probed with a temp file); ``path`` must not be a folder.
    """
    target = Path(path).absolute()
    if target.is_dir():
        raise write_error(path, IsADirectoryError(errno.EISDIR, "Is a directory"))
    if not target.parent.is_dir():
        raise write_error(path, FileNotFoundError(errno.ENOENT, "No such file or directory"))
    with interruptible(), signals_deferred(), write_errors(path):
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.unlink(probe)


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that replaces ``out`` when the block succeeds.

    The staging directory is a sibling of ``out`` (same filesystem, so the final
    rename is atomic). If the block raises, or SIGINT/SIGTERM arrive
    (:func:`interruptible`), the staging directory is removed and ``out`` is
    untouched. A failed write of our own is a :class:`WriteError` naming ``out``.
    """
    target = Path(out).absolute()
    check_output_dir(target, overwrite)
    with interruptible():
        with write_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        stage: Path | None = None
        try:
            with signals_deferred(), write_errors(target):
                stage = Path(
                    tempfile.mkdtemp(
                        prefix=f".{target.name}.", suffix=".staging", dir=target.parent
                    )
                )
            yield stage
            with write_errors(target):
                _publish(stage, target)
        except BaseException:
            if stage is not None:
                with signals_deferred():
                    shutil.rmtree(stage, ignore_errors=True)
            raise


def _publish(stage: Path, target: Path) -> None:
    """Fsync the staged files, then swap ``stage`` in for ``target`` (signals wait)."""
    for entry in stage.iterdir():
        if entry.is_file():
            with open(entry, "rb") as fh:
                os.fsync(fh.fileno())
    os.chmod(stage, 0o755)  # noqa: S103 (a package is meant to be read by others)
    with signals_deferred():
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
            )
            try:
                os.replace(target, old)  # onto our own empty folder
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(old)
                raise
            try:
                os.replace(stage, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def claimed_output(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Claim ``out`` for one run: an fcntl lock on ``.OUT.lock`` beside it, held in the block.

    A second run (another process, or another claim in this one) is refused with
    a typed error naming the holder's pid, instead of silently replacing the
    first run's output at its end. The lock dies with its process, so a killed
    run leaves no stale claim. Missing parent folders are created and, when the
    block fails, removed again if still empty. Yields the lock file's path.
    """
    target = Path(out).absolute()
    if not target.name:
        raise SourcefreeError(
            f"output directory {shown(out)} is a file-system root",
            "the output is written beside a staging folder in its parent",
            "choose a folder below it",
        )
    lock = target.with_name(f".{target.name}.lock")
    created = _make_parents(target.parent)
    try:
        fd = _take_lock(lock, target)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before the lock goes: a waiter then sees another inode
        os.close(fd)
        _remove_empty(created)


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    with write_errors(missing[0] if missing else folder):
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
    return missing  # deepest first


def _remove_empty(folders: list[Path]) -> None:
    for path in folders:
        with contextlib.suppress(OSError):
            path.rmdir()


def _take_lock(lock: Path, target: Path) -> int:
    """Open and flock ``lock`` (a private regular file, no link); return its fd."""
    for _ in range(8):
        with write_errors(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if _locked_current(fd, lock, target):
                with write_errors(lock):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed it as we opened it: take the new one
    raise SourcefreeError(
        f"cannot claim the output directory {shown(target)}",
        f"its lock file {shown(lock)} keeps being replaced",
        "make sure no other program touches it, then run again",
    )


def _locked_current(fd: int, lock: Path, target: Path) -> bool:
    """Flock ``fd``; True when ``lock`` still names the file that ``fd`` holds."""
    import fcntl  # POSIX; imported here so that the rest of the module works everywhere

    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        raise SourcefreeError(
            f"lock file {shown(lock)} is not a private regular file",
            "it could be a link planted to make this run write elsewhere",
            "remove it, or choose another output directory",
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 16, 0).decode("ascii", "replace").strip()
        raise SourcefreeError(
            f"output directory {shown(target)} is claimed by another run "
            f"(pid {holder if holder.isdigit() else 'unknown'})",
            "two runs writing the same output would replace each other's result",
            "wait for that run to finish, or choose another output directory",
        ) from None
    try:
        now = os.stat(lock, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def replace_marked_block(path: Path, start: str, end: str, body: str, heading: str) -> None:
    """Put ``body`` between the marker lines ``start`` and ``end`` of a text file, atomically.

    The text outside the markers is kept. A file without both markers gets a new
    ``## heading`` section with the marked block at its end (a missing file is
    created with a title), so benchmarks can rewrite their own table in a shared
    document without touching the other sections.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip(chr(10))}\n{end}"
    if start in text and end in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = f"{text.rstrip(chr(10))}\n\n## {heading}\n\n{block}\n"
    atomic_write_bytes(path, text.encode("utf-8"))
