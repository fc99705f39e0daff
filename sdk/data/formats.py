"""Readers for the public FER formats (see ``docs/data.md`` for layouts and label maps).

Every reader maps the format's native labels to names, then to indices of
``labels`` (default :data:`~sourcefree.data.labels.FER7`, the canonical
order). Samples whose label is not in the set (contempt with 7 classes,
AffectNet's None/Uncertain/No-Face, FERPlus ties and unknown/NF) are dropped
and counted in ``dataset.dropped``. The SDK ships loaders only, never data.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sourcefree.data.dataset import ImageDataset, Sample
from sourcefree.data.files import (
    annotation_file,
    dataset_root,
    iter_lines,
    resolve_sample,
    walk_images,
)
from sourcefree.data.labels import (
    AFFECTNET_CODES,
    CKPLUS_CODES,
    EXPW_CODES,
    FER7,
    FER2013_CODES,
    FERPLUS_COLUMNS,
    JAFFE_CODES,
    RAFDB_CODES,
    LabelMap,
)
from sourcefree.errors import DatasetError

#: FER2013 ``Usage`` values, and the split names accepted for them.
SPLITS: dict[str, str] = {
    "training": "Training",
    "train": "Training",
    "publictest": "PublicTest",
    "val": "PublicTest",
    "valid": "PublicTest",
    "validation": "PublicTest",
    "privatetest": "PrivateTest",
    "test": "PrivateTest",
}


def _usage(split: str | None) -> str | None:
    if split is None:
        return None
    key = split.replace("_", "").replace("-", "").lower()
    if key not in SPLITS:
        raise DatasetError(
            f"unknown split {split!r}",
            "FER2013-style splits are Training, PublicTest and PrivateTest",
            "use train, val or test (or None for every row)",
        )
    return SPLITS[key]


def _csv_rows(path: Path, what: str) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV with a header, keys stripped (``icml_face_data.csv`` has ' pixels')."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"the {what} is empty", "it has no header row", "") from None
        except csv.Error:
            raise DatasetError(f"the {what} is not valid CSV", "", "") from None
        try:
            for number, row in enumerate(reader, start=2):
                if not row:
                    continue
                yield number, dict(zip(header, (v.strip() for v in row), strict=False))
        except csv.Error:
            raise DatasetError(
                f"the {what} is not valid CSV near line {reader.line_num}", "", ""
            ) from None


def _need(row: dict[str, str], column: str, what: str) -> str:
    if column not in row:
        raise DatasetError(
            f"the {what} has no column {column!r}",
            f"columns: {', '.join(row)}",
            "pass the file in the original format",
        )
    return row[column]


def _pixels(text: str) -> np.ndarray | None:
    """A square grey image from space-separated values, or None when malformed."""
    parts = text.split()
    side = round(len(parts) ** 0.5)
    if side < 4 or side * side != len(parts):
        return None
    try:
        values = np.array([int(p) for p in parts], dtype=np.int64)
    except ValueError:
        return None
    if values.min() < 0 or values.max() > 255:
        return None
    return values.astype(np.uint8).reshape(side, side)


def _code(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _mapped(lmap: LabelMap, native: Sequence[str], code: int | None) -> int:
    """Index in the label set of a native code; -1 when unknown or outside the set."""
    if code is None or not 0 <= code < len(native) or not native[code]:
        return -1
    found = lmap.index(native[code])
    return -1 if found is None else found


def read_fer2013(
    csv_path: str | os.PathLike[str],
    *,
    split: str | None = None,
    labels: Sequence[str] | None = FER7,
) -> ImageDataset:
    """``fer2013.csv`` (``emotion,pixels,Usage``; 48x48 grey) and Kaggle's variants.

    Args:
        csv_path: ``fer2013.csv``, ``icml_face_data.csv``, or Kaggle's
            ``train.csv`` (no Usage) / ``test.csv`` (pixels only: unlabelled).
        split: train / val / test (Training / PublicTest / PrivateTest); None: all rows.
        labels: the label order (native 0 Angry .. 6 Neutral is mapped by name).
    """
    path = annotation_file(csv_path, "FER2013 CSV")
    usage = _usage(split)
    lmap = LabelMap(tuple(labels or FER7))
    samples: list[Sample] = []
    has_labels = False
    dropped = 0
    for number, row in _csv_rows(path, "FER2013 CSV"):
        if usage is not None and _need(row, "Usage", "FER2013 CSV") != usage:
            continue
        label = -1
        if "emotion" in row:
            has_labels = True
            label = _mapped(lmap, FER2013_CODES, _code(row["emotion"]))
            if label < 0:
                dropped += 1
                continue
        pixels = _pixels(_need(row, "pixels", "FER2013 CSV"))
        key = f"row{number:06d}"
        if pixels is None:
            samples.append(Sample(key=key, label=label, error="bad_row"))
        else:
            samples.append(Sample(key=key, label=label, pixels=pixels))
    names = tuple(lmap.labels) if has_labels else None
    return ImageDataset(
        samples, names, root=path.parent, kind="fer2013", sources=[path], dropped=dropped
    )


def _vote(counts: Sequence[float], lmap: LabelMap) -> int:
    """Majority vote over the FERPlus columns; -1 for ties, unknown, NF or an absent class."""
    if len(counts) != len(FERPLUS_COLUMNS):
        return -1
    arr = np.asarray(counts, dtype=np.float64)
    top = arr.max()
    if top <= 0 or int(np.sum(arr == top)) > 1:
        return -1
    name = FERPLUS_COLUMNS[int(arr.argmax())]
    if name in ("unknown", "NF"):
        return -1
    found = lmap.index(name)
    return -1 if found is None else found


def _counts(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def read_ferplus(
    path: str | os.PathLike[str],
    *,
    fer2013_csv: str | os.PathLike[str] | None = None,
    split: str | None = None,
    labels: Sequence[str] | None = FER7,
) -> ImageDataset:
    """FERPlus majority-vote labels.

    Two layouts:

    - ``fer2013new.csv`` (``Usage,Image name,neutral,...,unknown,NF``) joined
      **by row position** with ``fer2013.csv`` (default: the same folder);
    - a folder made by Microsoft's ``generate_training_data.py``
      (``FER2013Train/``: PNGs plus a header-less ``label.csv`` of
      ``name,"(0, 0, 48, 48)",<10 counts>``).

    The majority class wins; ties, ``unknown`` and ``NF`` are dropped, and so
    is contempt unless it is in ``labels``.
    """
    lmap = LabelMap(tuple(labels or FER7))
    p = Path(path)
    if p.is_dir():
        return _ferplus_folder(p, lmap)
    votes_path = annotation_file(p, "FERPlus CSV (fer2013new.csv)")
    pixels_path = annotation_file(
        fer2013_csv if fer2013_csv is not None else votes_path.parent / "fer2013.csv",
        "FER2013 CSV that FERPlus labels join to (fer2013.csv)",
    )
    usage = _usage(split)
    fer_rows = _csv_rows(pixels_path, "FER2013 CSV")
    samples: list[Sample] = []
    dropped = 0
    for pair in itertools.zip_longest(_csv_rows(votes_path, "FERPlus CSV"), fer_rows):
        if pair[0] is None or pair[1] is None:
            raise DatasetError(
                "fer2013new.csv and fer2013.csv have different numbers of rows",
                "FERPlus labels are joined to FER2013 pixels by row position",
                "use the original, unedited fer2013.csv that FERPlus was made from",
            )
        (number, votes), (_, fer_row) = pair
        if usage is not None and _need(votes, "Usage", "FERPlus CSV") != usage:
            continue
        counts = _counts([votes.get(c, "x") for c in FERPLUS_COLUMNS])
        label = _vote(counts, lmap) if counts is not None else -1
        if label < 0:
            dropped += 1
            continue
        pixels = _pixels(_need(fer_row, "pixels", "FER2013 CSV"))
        key = f"row{number:06d}"
        if pixels is None:
            samples.append(Sample(key=key, label=label, error="bad_row"))
        else:
            samples.append(Sample(key=key, label=label, pixels=pixels))
    return ImageDataset(
        samples,
        lmap.labels,
        root=votes_path.parent,
        kind="ferplus",
        sources=[votes_path, pixels_path],
        dropped=dropped,
    )


def _ferplus_folder(folder: Path, lmap: LabelMap) -> ImageDataset:
    base = dataset_root(folder, "FERPlus folder")
    label_csv = annotation_file(base / "label.csv", "FERPlus label.csv")
    samples: list[Sample] = []
    dropped = 0
    with open(label_csv, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            if not row:
                continue
            if len(row) != 2 + len(FERPLUS_COLUMNS):
                raise DatasetError(
                    f"line {number} of the FERPlus label.csv has {len(row)} fields",
                    f"expected name, box and {len(FERPLUS_COLUMNS)} vote counts",
                    "pass the folder written by generate_training_data.py",
                )
            counts = _counts(row[2:])
            label = _vote(counts, lmap) if counts is not None else -1
            if label < 0:
                dropped += 1
                continue
            samples.append(resolve_sample(base, row[0].strip(), label=label))
    return ImageDataset(
        samples, lmap.labels, root=base, kind="ferplus", sources=[label_csv], dropped=dropped
    )


def read_rafdb(
    root: str | os.PathLike[str],
    *,
    split: str | None = None,
    aligned: bool = True,
    labels: Sequence[str] | None = FER7,
) -> ImageDataset:
    """RAF-DB basic: ``EmoLabel/list_patition_label.txt`` plus ``Image/aligned`` or ``original``.

    Args:
        root: the ``basic`` folder (or its parent).
        split: ``train`` or ``test`` (from the file-name prefix); None: both.
        aligned: read ``Image/aligned/<stem>_aligned.jpg`` (100x100) instead
            of ``Image/original/<name>``.
    """
    base = dataset_root(root, "RAF-DB folder")
    if not (base / "EmoLabel").is_dir() and (base / "basic").is_dir():
        base = dataset_root(base / "basic", "RAF-DB basic folder")
    label_file = annotation_file(
        base / "EmoLabel" / "list_patition_label.txt", "RAF-DB EmoLabel/list_patition_label.txt"
    )
    if split is not None and split not in ("train", "test"):
        raise DatasetError(
            f"unknown RAF-DB split {split!r}", "RAF-DB has train and test", "use train or test"
        )
    lmap = LabelMap(tuple(labels or FER7))
    samples: list[Sample] = []
    dropped = 0
    for number, text in iter_lines(label_file, "RAF-DB label list"):
        parts = text.split()
        if len(parts) != 2:
            raise DatasetError(
                f"line {number} of the RAF-DB label list is malformed",
                "lines look like `train_00001.jpg 5`",
                "pass the original list_patition_label.txt",
            )
        name, code = parts
        if split is not None and not name.startswith(split + "_"):
            continue
        label = _mapped(lmap, RAFDB_CODES, _code(code))
        if label < 0:
            dropped += 1
            continue
        stem = name.rsplit(".", 1)[0]
        rel = f"Image/aligned/{stem}_aligned.jpg" if aligned else f"Image/original/{name}"
        samples.append(resolve_sample(base, rel, label=label))
    return ImageDataset(
        samples, lmap.labels, root=base, kind="rafdb", sources=[label_file], dropped=dropped
    )


def read_affectnet(
    path: str | os.PathLike[str],
    *,
    images_root: str | os.PathLike[str] | None = None,
    crop: bool = True,
    labels: Sequence[str] | None = FER7,
) -> ImageDataset:
    """AffectNet: the 2017 CSVs, or the newer ``images/`` + ``annotations/`` folder.

    Args:
        path: ``training.csv`` / ``validation.csv`` (columns
            ``subDirectory_filePath,face_x,face_y,face_width,face_height,...,expression``),
            or a folder holding ``images/<id>.jpg`` and ``annotations/<id>_exp.npy``.
        images_root: where ``subDirectory_filePath`` is relative to (default:
            ``Manually_Annotated_Images`` next to the CSV's folder).
        crop: crop the face box of the CSV.
        labels: codes 8-10 are always dropped; 7 (contempt) only kept when in labels.
    """
    lmap = LabelMap(tuple(labels or FER7))
    p = Path(path)
    if p.is_dir():
        return _affectnet_folder(p, lmap)
    csv_path = annotation_file(p, "AffectNet CSV")
    img_root = dataset_root(
        images_root
        if images_root is not None
        else csv_path.parent.parent / "Manually_Annotated_Images",
        "AffectNet images folder",
    )
    samples: list[Sample] = []
    dropped = 0
    what = "AffectNet CSV"
    for number, row in _csv_rows(csv_path, what):
        label = _mapped(lmap, AFFECTNET_CODES, _code(_need(row, "expression", what)))
        if label < 0:
            dropped += 1
            continue
        box = None
        if crop:
            try:
                x, y, w, h = (
                    int(float(_need(row, k, what)))
                    for k in ("face_x", "face_y", "face_width", "face_height")
                )
            except ValueError:
                samples.append(Sample(key=f"row{number:07d}", label=label, error="bad_box"))
                continue
            box = (x, y, x + w, y + h)
        rel = _need(row, "subDirectory_filePath", what)
        samples.append(resolve_sample(img_root, rel, label=label, box=box))
    return ImageDataset(
        samples, lmap.labels, root=img_root, kind="affectnet", sources=[csv_path], dropped=dropped
    )


def _affectnet_folder(folder: Path, lmap: LabelMap) -> ImageDataset:
    base = dataset_root(folder, "AffectNet folder")
    if not (base / "images").is_dir() or not (base / "annotations").is_dir():
        raise DatasetError(
            "the AffectNet folder has no images/ and annotations/",
            "the newer release keeps images/<id>.jpg and annotations/<id>_exp.npy",
            "pass train_set or val_set, or the 2017 CSV",
        )
    walk = walk_images(base, base / "images")
    samples: list[Sample] = []
    dropped = 0
    for rel in walk.names:
        stem = Path(rel).stem
        exp = base / "annotations" / f"{stem}_exp.npy"
        code: int | None = None
        try:
            value = np.load(exp, allow_pickle=False)
            code = _code(str(value.reshape(-1)[0]))
        except (OSError, ValueError, IndexError):
            code = None
        label = _mapped(lmap, AFFECTNET_CODES, code)
        if label < 0:
            dropped += 1
            continue
        samples.append(resolve_sample(base, rel, label=label))
    return ImageDataset(
        samples, lmap.labels, root=base, kind="affectnet", ignored=walk.ignored, dropped=dropped
    )


def read_expw(
    label_lst: str | os.PathLike[str],
    *,
    images_root: str | os.PathLike[str] | None = None,
    min_confidence: float | None = None,
    labels: Sequence[str] | None = FER7,
) -> ImageDataset:
    """ExpW ``label/label.lst``: one face per line, cropped from the scene image.

    Lines: ``image_name face_id top left right bottom confidence expression``.
    ``images_root`` defaults to ``image/origin`` next to the ``label`` folder.
    """
    lst = annotation_file(label_lst, "ExpW label.lst")
    img_root = dataset_root(
        images_root if images_root is not None else lst.parent.parent / "image" / "origin",
        "ExpW images folder (image/origin)",
    )
    lmap = LabelMap(tuple(labels or FER7))
    samples: list[Sample] = []
    dropped = 0
    for number, text in iter_lines(lst, "ExpW label.lst"):
        parts = text.split()
        try:
            if len(parts) != 8:
                raise ValueError
            name = parts[0]
            face_id, top, left, right, bottom = (int(float(v)) for v in parts[1:6])
            confidence, code = float(parts[6]), _code(parts[7])
        except ValueError:
            raise DatasetError(
                f"line {number} of the ExpW label.lst is malformed",
                "lines are `name face_id top left right bottom confidence label`",
                "pass the original label.lst",
            ) from None
        label = _mapped(lmap, EXPW_CODES, code)
        if label < 0 or (min_confidence is not None and confidence < min_confidence):
            dropped += 1
            continue
        samples.append(
            resolve_sample(
                img_root,
                name,
                key=f"{name}#{face_id}",
                label=label,
                box=(left, top, right, bottom),
            )
        )
    return ImageDataset(
        samples, lmap.labels, root=img_root, kind="expw", sources=[lst], dropped=dropped
    )


_CK_EMOTION = re.compile(r"^(?P<stem>.+)_emotion\.txt$")


def read_ckplus(
    root: str | os.PathLike[str],
    *,
    last_frames: int = 3,
    neutral_first: bool = True,
    labels: Sequence[str] | None = FER7,
) -> ImageDataset:
    """CK+: labelled sequences from ``Emotion/S###/###/*_emotion.txt``.

    The usual protocol: the last ``last_frames`` frames of a labelled
    sequence get its label and, with ``neutral_first``, its first frame is
    neutral. Sequences without an emotion file have no label and are skipped.
    """
    base = dataset_root(root, "CK+ folder")
    images = base / "cohn-kanade-images"
    emotion = base / "Emotion"
    if not images.is_dir() or not emotion.is_dir():
        raise DatasetError(
            "the CK+ folder lacks cohn-kanade-images/ or Emotion/",
            "both are needed: frames and their emotion labels",
            "point at the folder that holds both",
        )
    if last_frames < 1:
        raise DatasetError(f"last_frames={last_frames} must be at least 1", "", "")
    lmap = LabelMap(tuple(labels or FER7))
    neutral = lmap.index("neutral") if neutral_first else None
    samples: list[Sample] = []
    sources: list[Path] = []
    dropped = 0
    for rel in sorted(_files(emotion), key=os.fsencode):
        m = _CK_EMOTION.match(Path(rel).name)
        if m is None:
            continue
        label_file = emotion / rel
        sources.append(label_file)
        lines = [t for _, t in iter_lines(label_file, "CK+ emotion file", max_bytes=4096)]
        label = _mapped(lmap, CKPLUS_CODES, _code(lines[0]) if lines else None)
        seq_dir = Path(rel).parent
        frames = walk_images(base, images / seq_dir).names if (images / seq_dir).is_dir() else []
        if label < 0 or not frames:
            dropped += 1
            continue
        tail = frames[-last_frames:]
        if neutral is not None and len(frames) > last_frames:
            samples.append(resolve_sample(base, frames[0], label=neutral))
        samples.extend(resolve_sample(base, f, label=label) for f in tail)
    return ImageDataset(
        samples, lmap.labels, root=base, kind="ckplus", sources=sources, dropped=dropped
    )


def _files(folder: Path) -> list[str]:
    out: list[str] = []
    for dirpath, _dirs, files in os.walk(folder):
        out.extend(os.path.relpath(os.path.join(dirpath, f), folder) for f in files)
    return out


def read_jaffe(
    root: str | os.PathLike[str], *, labels: Sequence[str] | None = FER7
) -> ImageDataset:
    """JAFFE: the expression code sits in the file name (``KA.AN1.39.tiff`` -> anger)."""
    base = dataset_root(root, "JAFFE folder")
    lmap = LabelMap(tuple(labels or FER7))
    walk = walk_images(base)
    samples: list[Sample] = []
    ignored, dropped = walk.ignored, 0
    for rel in walk.names:
        parts = Path(rel).name.split(".")
        code = parts[1][:2].upper() if len(parts) >= 3 else ""
        if code not in JAFFE_CODES:
            ignored += 1
            continue
        label = lmap.index(JAFFE_CODES[code])
        if label is None:
            dropped += 1
            continue
        samples.append(resolve_sample(base, rel, label=label))
    return ImageDataset(
        samples, lmap.labels, root=base, kind="jaffe", ignored=ignored, dropped=dropped
    )
