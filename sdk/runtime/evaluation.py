"""Evaluate a package on labelled images through the onnxruntime runtime (what ships).

The images are read by format (:func:`sourcefree.data.sources.open_dataset`); a
format that carries labels (FER2013, RAF-DB, ExpW, a labels CSV, ...) is judged
with them, mapped to the package's label order by name. Otherwise labels are
read from a CSV (``path,label``; names or indices in the package's label
order) and matched to the images of the data folder by their path relative to
that folder (or to the CSV's folder when the CSV lies inside it); every
labelled row must name an image of the folder (a typo is refused, not skipped).
Metrics: accuracy, mean class recall over the classes present, per-class
recall and the confusion matrix (rows: true class, columns: prediction).
No torch import.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sourcefree.data.dataset import ImageDataset, LoadedImages
from sourcefree.data.decode import check_workers
from sourcefree.data.metrics import pseudo_label_counts
from sourcefree.data.readers import read_labels_csv
from sourcefree.data.sources import (
    Options,
    check_options,
    get_format,
    open_dataset,
    open_unlabelled,
)
from sourcefree.errors import ConfigError, DatasetError
from sourcefree.fsutil import shown
from sourcefree.package.loader import Package, load_package
from sourcefree.package.manifest import InputSpec


@dataclass(frozen=True)
class Metrics:
    """Classification metrics of one package on one labelled set (aggregates only)."""

    labels: tuple[str, ...]
    accuracy: float
    mean_class_recall: float
    """Mean of the per-class recalls over classes that have at least one image."""
    per_class_recall: dict[str, float | None]
    """None for classes with no image."""
    confusion: list[list[int]]
    """``confusion[true][predicted]`` counts."""
    images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "mean_class_recall": self.mean_class_recall,
            "per_class_recall": self.per_class_recall,
            "confusion": self.confusion,
            "labels": list(self.labels),
            "images": self.images,
        }


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> Metrics:
    """Accuracy, mean class recall, per-class recall and confusion matrix."""
    k = len(labels)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise DatasetError(
            "nothing to evaluate",
            f"{y_true.size} labelled images were matched",
            "check that the labels CSV names images of the data folder",
        )
    confusion = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    support = confusion.sum(axis=1)
    recalls: dict[str, float | None] = {}
    present = []
    for c, name in enumerate(labels):
        if support[c] > 0:
            r = float(confusion[c, c] / support[c])
            recalls[name] = r
            present.append(r)
        else:
            recalls[name] = None
    return Metrics(
        labels=tuple(labels),
        accuracy=float(np.trace(confusion) / confusion.sum()),
        mean_class_recall=float(np.mean(present)),
        per_class_recall=recalls,
        confusion=confusion.astype(int).tolist(),
        images=int(y_true.size),
    )


def pseudo_label_quality(
    indices: np.ndarray, chosen: np.ndarray, truth: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Precision and coverage of pseudo-labels (aggregates only).

    Args:
        indices: target-image indices the method selected (int64).
        chosen: their pseudo-labels (int64, same length).
        truth: evaluation label of every target image, -1 where unlabelled.
        labels: class names.

    Returns:
        ``selected``, ``images``, ``coverage`` (selected / images), ``labelled_selected``
        (selected images with an evaluation label), ``precision`` (share of those whose
        pseudo-label is right; None when there is none), ``selected_per_class`` and
        ``precision_per_class`` by class name; the counting is
        :func:`sourcefree.data.metrics.pseudo_label_counts`.

    Raises:
        InputError: malformed arrays (see ``pseudo_label_counts``).
    """
    counts = pseudo_label_counts(indices, chosen, truth, len(labels))
    return {
        "selected": counts.selected,
        "images": counts.images,
        "coverage": counts.coverage,
        "labelled_selected": counts.labelled,
        "precision": counts.precision,
        "selected_per_class": dict(zip(labels, counts.selected_per_class, strict=True)),
        "precision_per_class": dict(zip(labels, counts.per_class_precision, strict=True)),
    }


def labelled_dataset(
    data: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    labels: Sequence[str],
    *,
    data_format: str = "folder",
    format_options: Options = None,
) -> ImageDataset:
    """The images of ``data`` that the CSV labels, with labels in the package's order.

    Every labelled row must name an image of ``data`` (relative to it, or to the
    CSV's folder when the CSV lies inside it), once or always with the same label.
    ``data_format``, ``format_options``: how ``data`` is listed (default: a folder).

    Raises:
        ConfigError: an unknown format or a bad option.
        DatasetError: as :func:`labelled_keys`.
    """
    folder = open_unlabelled(data, data_format, format_options)
    by_key = labelled_keys(folder, labels_csv, labels)
    picked = [
        dataclasses.replace(s, label=by_key[s.key]) for s in folder.samples if s.key in by_key
    ]
    return ImageDataset(picked, tuple(labels), root=folder.root, kind="evaluation")


def format_labelled(
    data: str | os.PathLike[str],
    data_format: str,
    format_options: Options,
    labels: Sequence[str],
) -> ImageDataset:
    """The samples of a format that carry a label of ``labels`` (a package's order).

    Native labels are mapped by name; samples of other classes are dropped and
    counted (``dropped``), unlabelled ones (e.g. Kaggle's FER2013 ``test.csv``) left out.

    Raises:
        ConfigError: the format carries no labels (a plain folder), or a bad option.
        DatasetError: no sample has a label of ``labels``, or the data cannot be read.
    """
    check_labelled_format(data_format, format_options)
    dataset = open_dataset(data, data_format, format_options, labels=labels)
    spec = get_format(data_format)
    picked = [s for s in dataset.samples if s.label >= 0]
    if dataset.labels is None or not picked:
        raise DatasetError(
            f"the {spec.name} data labels no image of this package's classes",
            f"{len(dataset)} samples, none labelled with one of {', '.join(labels)} "
            f"({dataset.dropped} had labels of other classes)",
            "pass data with labels of the package's classes, or --labels CSV",
        )
    return ImageDataset(
        picked,
        tuple(labels),
        root=dataset.root,
        kind=dataset.kind,
        sources=dataset.sources,
        ignored=dataset.ignored,
        dropped=dataset.dropped,
    )


def check_labelled_format(data_format: str, format_options: Options) -> None:
    """Refuse a format (with these options) that carries no labels; nothing is read.

    Raises:
        ConfigError: a plain folder of images, an unknown format or a bad option.
    """
    spec = get_format(data_format)
    if not spec.carries_labels(check_options(data_format, format_options)):
        raise ConfigError(
            f"the {spec.name} format carries no labels",
            "a folder of images is unlabelled (unless --format-option classes=true: "
            "one subfolder per class)",
            "pass --labels CSV, or a --format that carries labels",
        )


def labelled_keys(
    folder: ImageDataset, labels_csv: str | os.PathLike[str], labels: Sequence[str]
) -> dict[str, int]:
    """The label index (package order) of every image of ``folder`` that the CSV labels, by key.

    The one lookup of evaluation labels: the CSV is read once, here.

    Raises:
        DatasetError: the CSV names a class the package does not have, a labelled
            row names no image of ``folder``, or an image twice with two labels.
    """
    try:
        table = read_labels_csv(labels_csv, labels=labels)
    except DatasetError as exc:
        if "unknown label" in exc.what or "label index" in exc.what:
            raise DatasetError(
                exc.what,
                f"the package predicts only {', '.join(labels)}",
                "evaluate with labels of this package's classes (drop or map the other rows)",
            ) from None
        raise
    rows = [(n, s) for n, s in enumerate(table.samples, 1) if s.label >= 0]
    if not rows:
        raise DatasetError(
            "the labels CSV labels no image",
            f"{len(table)} rows, none with a label",
            "give at least one row a path and a label of this package",
        )
    # CSV paths are relative to the CSV's folder (re-based here on the data
    # folder, wherever the CSV sits) or, failing that, relative to the data folder.
    csv_root, data_root = table.root.resolve(), folder.root.resolve()
    keys = {s.key for s in folder.samples}
    rebased = [_relative_key(csv_root / s.key, data_root) for _, s in rows]
    as_given: list[str | None] = [Path(s.key).as_posix() for _, s in rows]
    chosen = max((rebased, as_given), key=lambda ks: sum(k in keys for k in ks))
    by_key: dict[str, int] = {}
    for (n, s), key in zip(rows, chosen, strict=True):
        if key not in keys:
            raise DatasetError(
                f"row {n} of the labels CSV (header not counted) names {shown(s.key)}, "
                "not an image of the data folder",
                f"the data folder holds {len(keys)} images; every labelled row must name "
                "one of them (a path relative to the data folder, or to the CSV's folder)",
                "fix the path, or remove the row",
            )
        if by_key.setdefault(key, s.label) != s.label:
            raise DatasetError(
                f"row {n} of the labels CSV (header not counted) labels {shown(s.key)} again, "
                "with another label",
                "an image has one true label",
                "keep one row per image",
            )
    return by_key


def _relative_key(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` as a posix key, None when it lies outside."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def labels_of(by_key: Mapping[str, int], keys: Sequence[str]) -> np.ndarray:
    """The label of each key in a :func:`labelled_keys` lookup (int64; -1 where it has none)."""
    return np.asarray([by_key.get(k, -1) for k in keys], dtype=np.int64)


def load_images(
    dataset: ImageDataset,
    spec: InputSpec,
    *,
    max_bad_fraction: float = 0.05,
    strict: bool = False,
    progress: bool = False,
    workers: int | None = None,
) -> LoadedImages:
    """Decode ``dataset`` as uint8 at the spec's size, colour and interpolation.

    The one decode of evaluation images and of the adaptation's target images
    (``progress``: a bar on stderr, :mod:`sourcefree.data.progress`; ``workers``:
    decoding processes, None: the usable cores, see :meth:`ImageDataset.load`).
    """
    return dataset.load(
        spec=spec,
        max_bad_fraction=max_bad_fraction,
        strict=strict,
        progress=progress,
        workers=workers,
    )


def load_inputs(
    dataset: ImageDataset,
    spec: InputSpec,
    *,
    max_bad_fraction: float = 0.05,
    strict: bool = False,
    workers: int | None = None,
) -> tuple[np.ndarray, LoadedImages]:
    """Decode ``dataset`` at the spec's size into the float32 NCHW the graph takes."""
    loaded = load_images(
        dataset, spec, max_bad_fraction=max_bad_fraction, strict=strict, workers=workers
    )
    return loaded.to_float(spec), loaded


def evaluate(
    package: str | os.PathLike[str] | Package,
    data: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    data_format: str = "folder",
    format_options: Options = None,
    device: str = "auto",
    max_bad_fraction: float = 0.05,
    strict: bool = False,
    batch_size: int = 256,
    workers: int | None = None,
) -> Metrics:
    """Evaluate a package with :class:`sourcefree.runtime.predictor.Predictor` on labelled images.

    Args:
        labels_csv: ``path,label`` rows naming images of ``data``; None: the labels
            the format carries (:func:`format_labelled`).
        data_format, format_options: how ``data`` is read
            (:func:`sourcefree.data.sources.open_dataset`; default: a folder).
        workers: decoding processes (None: the usable cores; 1: in this process);
            the metrics are the same for any count.

    Raises:
        ConfigError: an unknown format, a bad option, no labels at all, or
            ``workers`` below 1.
        PackageError: the package does not verify.
        DatasetError: unreadable data, labels naming unknown classes or no image.
    """
    # a bad format, option, worker count or missing labels is refused before the package is read
    check_workers(workers)
    if labels_csv is None:
        check_labelled_format(data_format, format_options)
    else:
        check_options(data_format, format_options)
    pkg = package if isinstance(package, Package) else load_package(package)
    names = pkg.manifest.labels
    if labels_csv is not None:
        dataset = labelled_dataset(
            data, labels_csv, names, data_format=data_format, format_options=format_options
        )
    else:
        dataset = format_labelled(data, data_format, format_options, names)
    x, loaded = load_inputs(
        dataset,
        pkg.manifest.input,
        max_bad_fraction=max_bad_fraction,
        strict=strict,
        workers=workers,
    )
    # Counts only (no file names): e.g. "...; no face found in 1 (1 skipped)".
    logging.getLogger("sourcefree").info("read: %s", loaded.report.summary())
    return evaluate_inputs(pkg, x, loaded.labels, device=device, batch_size=batch_size)


def evaluate_inputs(
    package: Package, x: np.ndarray, y: np.ndarray, *, device: str = "auto", batch_size: int = 256
) -> Metrics:
    """Metrics of ``package`` on preprocessed float32 NCHW ``x`` with label indices ``y``."""
    from sourcefree.runtime.predictor import Predictor

    pred = Predictor(package, device=device, batch_size=batch_size).predict_array(x)
    return compute_metrics(y, pred.indices.astype(np.int64), package.manifest.labels)


def format_metrics(m: Metrics) -> str:
    """A short text table: accuracy, mean class recall, per-class recall, confusion."""
    width = max(8, *(len(n) for n in m.labels))
    lines = [
        f"images             {m.images}",
        f"accuracy           {m.accuracy:.4f}",
        f"mean class recall  {m.mean_class_recall:.4f}",
        "",
        "per-class recall",
    ]
    for name in m.labels:
        r = m.per_class_recall[name]
        lines.append(f"  {name:<{width}}  {'-' if r is None else f'{r:.4f}'}")
    lines += ["", "confusion (rows: true, columns: predicted)"]
    lines.append(" " * (width + 2) + " ".join(f"{i:>6d}" for i in range(len(m.labels))))
    for i, (name, row) in enumerate(zip(m.labels, m.confusion, strict=True)):
        lines.append(f"  {name:<{width}}" + " ".join(f"{v:>6d}" for v in row) + f"   [{i}]")
    return "\n".join(lines)
