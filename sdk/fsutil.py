"""Atomic file and directory writes: a final path holds a whole result or nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sourcefree.errors import SourcefreeError


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

    On any error (a full disk included) the temp file is removed and an existing
    file at ``path`` is left untouched.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


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


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory that replaces ``out`` when the block succeeds.

    The staging directory is a sibling of ``out`` (same filesystem, so the final
    rename is atomic). If the block raises, the staging directory is removed and
    ``out`` is untouched.
    """
    target = Path(out).absolute()
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        yield stage
        for entry in stage.iterdir():
            if entry.is_file():
                with open(entry, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(stage, 0o755)  # noqa: S103 (a package is meant to be read by others)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(stage, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


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
