"""Safe file discovery: resolve names inside a root, walk folders without following links.

Rules: a path (or symlink) that resolves outside the dataset root is refused;
FIFOs, devices and sockets are never opened; symlinked directories are not
descended (no loops); hidden entries (``.x``, e.g. macOS ``._x.jpg``) and
non-image names are ignored and counted. Names that are not valid UTF-8 and
names with newlines work (Python's surrogate escapes); they are escaped
wherever they are printed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sourcefree.data.dataset import Box, Sample
from sourcefree.data.imaging import is_image_name
from sourcefree.errors import DatasetError


def dataset_root(path: str | os.PathLike[str], what: str = "dataset folder") -> Path:
    """The real path of an existing directory, or a DatasetError."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(
            f"the {what} {str(p)[:200]!r} does not exist",
            "nothing is at the given path",
            "check the path",
        )
    if not p.is_dir():
        raise DatasetError(
            f"the {what} is not a directory", "a folder of images is expected", "check the path"
        )
    return Path(os.path.realpath(p))


def annotation_file(path: str | os.PathLike[str], what: str) -> Path:
    """An existing regular annotation file (CSV, list), or a DatasetError naming ``what``."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError:
        raise DatasetError(
            f"the {what} {str(p)[:200]!r} does not exist",
            "the reader needs it to know the images and labels",
            f"pass the path of the {what}",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(
            f"the {what} is not a regular file",
            "directories, FIFOs and devices are not read",
            f"pass the {what} itself",
        )
    return p


def _inside(real: str, root: Path) -> bool:
    root_s = str(root)
    return real == root_s or real.startswith(root_s.rstrip(os.sep) + os.sep)


def resolve_sample(
    root: Path,
    relative: str,
    *,
    key: str | None = None,
    label: int = -1,
    box: Box | None = None,
) -> Sample:
    """A Sample for ``root / relative``; refused ones carry an ``error`` reason.

    ``root`` must already be a real path (see :func:`dataset_root`).
    """
    name = key if key is not None else relative
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        return Sample(key=name, label=label, box=box, error="outside_root")
    candidate = root / rel
    try:
        os.lstat(candidate)
    except OSError:
        return Sample(key=name, label=label, box=box, error="missing")
    real = os.path.realpath(candidate)
    if not _inside(real, root):
        return Sample(key=name, label=label, box=box, error="outside_root")
    try:
        st = os.lstat(real)
    except OSError:
        return Sample(key=name, label=label, box=box, error="missing")
    if not stat.S_ISREG(st.st_mode):
        return Sample(key=name, label=label, box=box, error="not_regular")
    return Sample(
        key=name,
        path=Path(real),
        label=label,
        box=box,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
    )


@dataclass
class WalkResult:
    """Image-named entries found under a folder, and what was ignored."""

    names: list[str]
    """Image names relative to the walked root, sorted by their bytes."""
    ignored: int = 0


def walk_images(root: Path, start: Path | None = None) -> WalkResult:
    """Recursively list image-named entries under ``start`` (default ``root``).

    Directories are descended unless they are symlinks or hidden; every
    image-named non-directory entry is listed (FIFOs and links included: the
    caller resolves and refuses them), so they are counted as skipped.
    """
    base = start if start is not None else root
    result = WalkResult(names=[])
    stack = [base]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError:
            result.ignored += 1  # unreadable directory (EACCES): counted, not fatal
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                result.ignored += 1
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(Path(entry.path))
            elif is_image_name(entry.name):
                result.names.append(os.path.relpath(entry.path, root))
            else:
                result.ignored += 1
        stack.extend(reversed(subdirs))
    result.names.sort(key=os.fsencode)
    return result


def iter_lines(path: Path, what: str, max_bytes: int = 1 << 30) -> Iterator[tuple[int, str]]:
    """Yield (line number, stripped line) of a text file, skipping blank lines."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise DatasetError(f"the {what} cannot be read", str(exc.strerror), "") from None
    if size > max_bytes:
        raise DatasetError(
            f"the {what} is too large", f"{size} bytes exceeds {max_bytes}", "split it"
        )
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if text:
                yield number, text
