"""Generic readers: an image folder (unlabelled or one subfolder per class) and a labels CSV."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from sourcefree.data.dataset import ImageDataset, Sample
from sourcefree.data.files import (
    annotation_file,
    dataset_root,
    resolve_sample,
    walk_images,
)
from sourcefree.data.labels import LabelMap
from sourcefree.errors import DatasetError

#: Largest labels CSV read, in bytes.
MAX_CSV_BYTES = 1 << 30
_PATH_HEADERS = {"path", "file", "filename", "image", "name"}
_LABEL_HEADERS = {"label", "class", "emotion", "expression", "target"}


def read_image_folder(root: str | os.PathLike[str]) -> ImageDataset:
    """Every image under ``root`` (recursively), unlabelled.

    Raises:
        DatasetError: the folder does not exist or holds no image.

    Examples:
        >>> from sourcefree.data import read_image_folder
        >>> data = read_image_folder("photos/")
        >>> loaded = data.load(size=(64, 64), color="rgb")  # uint8 (N, 64, 64, 3)
        >>> print(loaded.report.summary())  # skipped files, by reason
    """
    base = dataset_root(root)
    walk = walk_images(base)
    samples = [resolve_sample(base, name) for name in walk.names]
    return ImageDataset(samples, None, root=base, kind="folder", ignored=walk.ignored)


def read_labeled_folder(
    root: str | os.PathLike[str], labels: Sequence[str] | None = None
) -> ImageDataset:
    """One subfolder per class (``root/<class>/**/<image>``).

    Args:
        root: the folder holding the class folders.
        labels: the label order. Folder names match labels exactly,
            case-insensitively or as FER synonyms (``happy`` -> ``happiness``).
            None: the sorted folder names.

    Raises:
        DatasetError: no class folders, a folder that matches no label, or no image.

    Examples:
        >>> from sourcefree.data import read_labeled_folder
        >>> data = read_labeled_folder("faces/", labels=["surprise", "fear", "happiness"])
        >>> data.labels, data.class_counts()  # a folder "happy/" counts as happiness
    """
    base = dataset_root(root)
    class_dirs = []
    ignored = 0
    with os.scandir(base) as it:
        for entry in sorted(it, key=lambda e: os.fsencode(e.name)):
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                class_dirs.append(entry.name)
            else:
                ignored += 1
    if not class_dirs:
        raise DatasetError(
            "the labelled folder has no class subfolders",
            "a labelled folder holds one subfolder per class",
            "use read_image_folder for unlabelled images, or add class folders",
        )
    names = tuple(labels) if labels is not None else tuple(class_dirs)
    lmap = LabelMap(names)
    unknown = [d for d in class_dirs if lmap.index(d) is None]
    if unknown:
        raise DatasetError(
            f"class folder(s) {', '.join(repr(u) for u in unknown[:5])} match no label",
            f"the labels are {', '.join(names)}",
            "rename the folders, or pass the matching label set",
        )
    samples: list[Sample] = []
    for d in class_dirs:
        label = lmap.index(d)
        if label is None:  # pragma: no cover - checked above
            continue
        walk = walk_images(base, base / d)
        ignored += walk.ignored
        samples.extend(resolve_sample(base, name, label=label) for name in walk.names)
    return ImageDataset(samples, names, root=base, kind="labeled-folder", ignored=ignored)


def _csv_records(path: Path, what: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank CSV record; quoted newlines allowed.

    ``utf-8-sig``: a leading byte-order mark (Excel's "CSV UTF-8") is dropped, not
    read as part of the first header or path.
    """
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DatasetError(f"the {what} is too large", f"it exceeds {MAX_CSV_BYTES} bytes", "")
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        line = 1
        try:
            for fields in reader:
                if any(f.strip() for f in fields):
                    yield line, fields
                line = reader.line_num + 1
        except csv.Error as exc:
            raise DatasetError(
                f"line {line} of the {what} is not valid CSV", str(exc), "fix the quoting"
            ) from None


def read_labels_csv(
    csv_path: str | os.PathLike[str], labels: Sequence[str] | None = None
) -> ImageDataset:
    """A CSV of ``path,label`` rows; paths are relative to the CSV's folder.

    An optional header (``path,label``) is skipped. Labels are names (matched
    like folder names) or integer indices into ``labels``; a row with no
    label is unlabelled. Numeric values are read as names when every value
    is one of ``labels`` (e.g. labels ``1..7``), else as indices. With
    ``labels=None`` the label set is the sorted names found (or ``0..max``
    for indices). Paths may not leave the CSV's
    folder; such rows and missing files are counted as skipped at load.

    Raises:
        DatasetError: a malformed row, an unknown label or index, or no row.

    Examples:
        >>> from sourcefree import load_package
        >>> from sourcefree.data import read_labels_csv
        >>> data = read_labels_csv("photos/labels.csv", labels=load_package("fer-pkg").labels)
        >>> data.targets  # label indices, -1 where a row has no label
    """
    path = annotation_file(csv_path, "labels CSV")
    base = dataset_root(path.parent, "labels CSV folder")
    rows: list[tuple[int, str, str]] = []
    for number, fields in _csv_records(path, "labels CSV"):
        first = fields[0].strip().lower() if fields else ""
        if (
            not rows
            and first in _PATH_HEADERS
            and (len(fields) == 1 or fields[1].strip().lower() in _LABEL_HEADERS)
        ):
            continue
        if len(fields) not in (1, 2) or not fields[0].strip():
            raise DatasetError(
                f"line {number} of the labels CSV has {len(fields)} fields",
                "each row is `path,label` (or just `path` for unlabelled images)",
                "quote paths that contain commas",
            )
        rows.append((number, fields[0].strip(), fields[1].strip() if len(fields) == 2 else ""))
    if not rows:
        raise DatasetError("the labels CSV has no rows", "", "add `path,label` rows")
    values = [r[2] for r in rows if r[2]]
    # ASCII digits only (int() refuses "²") and short (no 4,300-digit int() error)
    as_index = bool(values) and all(
        v.isascii() and v.lstrip("-").isdigit() and len(v) <= 18 for v in values
    )
    if as_index and labels is not None:
        given = LabelMap(tuple(labels))
        as_index = not all(given.index(v) is not None for v in values)  # names win
    if labels is not None:
        names: tuple[str, ...] | None = tuple(labels)
    elif not values:
        names = None
    elif as_index:
        names = tuple(str(i) for i in range(max(int(v) for v in values) + 1))
    else:
        names = tuple(sorted(set(values)))
    lmap = LabelMap(names) if names is not None else None
    samples = []
    for number, rel, value in rows:
        label = -1
        if value and lmap is not None and names is not None:
            if as_index:
                label = int(value)
                if not 0 <= label < len(names):
                    raise DatasetError(
                        f"line {number} of the labels CSV has label index {label}",
                        f"indices run from 0 to {len(names) - 1} for {len(names)} labels",
                        "fix the index, or pass the full label set",
                    )
            else:
                found = lmap.index(value)
                if found is None:
                    raise DatasetError(
                        f"line {number} of the labels CSV has unknown label {value[:64]!r}",
                        f"the labels are {', '.join(names)}",
                        "fix the row, or pass the matching label set",
                    )
                label = found
        samples.append(resolve_sample(base, rel, label=label))
    return ImageDataset(samples, names, root=base, kind="labels-csv", sources=[Path(path)])
