"""Precision and coverage of pseudo-labels against evaluation labels, in numpy (torch-free).

One count of a selection serves both reports that measure it:
``sourcefree.ops.pseudo_labels.selection_quality`` (torch tensors, every target
sample labelled) and ``sourcefree.runtime.evaluation.pseudo_label_quality`` (the
adapt report, where an image without an evaluation label has truth -1). Only
aggregates come out; the numbers are for reports and are never fed back into a
method (the adaptation stays source-free and label-free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sourcefree.errors import InputError

__all__ = ["PseudoLabelCounts", "pseudo_label_counts"]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class PseudoLabelCounts:
    """The counts behind precision and coverage of one selection (aggregates only).

    Attributes:
        images: N, the target images.
        selected: images selected.
        labelled: selected images that carry an evaluation label.
        correct: selected images whose pseudo-label equals their evaluation label.
        selected_per_class: (C,) selected images by pseudo-label.
        labelled_per_class: (C,) selected images with an evaluation label, by pseudo-label.
        correct_per_class: (C,) correct images by pseudo-label.
        true_per_class: (C,) labelled target images by evaluation label.
    """

    images: int
    selected: int
    labelled: int
    correct: int
    selected_per_class: tuple[int, ...]
    labelled_per_class: tuple[int, ...]
    correct_per_class: tuple[int, ...]
    true_per_class: tuple[int, ...]

    @property
    def precision(self) -> float | None:
        """correct / labelled: share of the labelled selected images labelled right."""
        return _ratio(self.correct, self.labelled)

    @property
    def coverage(self) -> float:
        """selected / images (0.0 without images)."""
        return self.selected / self.images if self.images else 0.0

    @property
    def correct_coverage(self) -> float:
        """correct / images: share of the target set selected with a right label."""
        return self.correct / self.images if self.images else 0.0

    @property
    def per_class_precision(self) -> tuple[float | None, ...]:
        """Precision by pseudo-label class; None where no labelled image was selected."""
        return tuple(
            _ratio(r, m)
            for r, m in zip(self.correct_per_class, self.labelled_per_class, strict=True)
        )

    @property
    def per_class_coverage(self) -> tuple[float | None, ...]:
        """Share of each true class selected with a right label; None where it is absent."""
        return tuple(
            _ratio(r, t) for r, t in zip(self.correct_per_class, self.true_per_class, strict=True)
        )


def _int_vector(a: object, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu":
        desc = (
            f"a {a.dtype} array of shape {a.shape}"
            if isinstance(a, np.ndarray)
            else f"a {type(a).__name__}"
        )
        raise InputError(
            f"{name} is {desc}",
            "pseudo-label counts take 1-D integer arrays",
            f"pass {name} as a 1-D int64 numpy array",
        )
    return a


def _per_class(values: np.ndarray, n_classes: int) -> tuple[int, ...]:
    # Values >= C fall in no class (they still count as selected, never as correct).
    return tuple(int(v) for v in np.bincount(values, minlength=n_classes)[:n_classes])


def pseudo_label_counts(
    indices: np.ndarray, chosen: np.ndarray, truth: np.ndarray, n_classes: int
) -> PseudoLabelCounts:
    """Count a selection against the evaluation labels of the whole target set.

    Args:
        indices: (M,) target indices of the selected samples, in [0, N).
        chosen: (M,) their pseudo-labels, >= 0.
        truth: (N,) evaluation label of every target sample, -1 where it has none.
        n_classes: C.

    Raises:
        InputError: the arrays are not 1-D integer arrays, ``indices`` and ``chosen``
            differ in length, or an index, pseudo-label or label is out of range.
    """
    indices = _int_vector(indices, "indices")
    chosen = _int_vector(chosen, "chosen")
    truth = _int_vector(truth, "truth")
    n = int(truth.size)
    if indices.shape != chosen.shape:
        raise InputError(
            f"{indices.size} selected indices but {chosen.size} pseudo-labels",
            "every selected sample has exactly one pseudo-label",
            "pass indices and pseudo-labels of equal length",
        )
    if indices.size and (indices.min() < 0 or indices.max() >= n or chosen.min() < 0):
        raise InputError(
            f"a selected index lies outside [0, {n}) or a pseudo-label is negative",
            "indices point into the target set, pseudo-labels are class indices",
            "pass target indices and class indices of the same dataset",
        )
    if n and truth.min() < -1:
        raise InputError(
            "truth holds values below -1",
            "truth is a class index, or -1 for a sample without an evaluation label",
            "map the evaluation labels onto the class order first",
        )
    y_sel = truth[indices]
    known = y_sel >= 0
    right = chosen[known] == y_sel[known]
    return PseudoLabelCounts(
        images=n,
        selected=int(indices.size),
        labelled=int(known.sum()),
        correct=int(right.sum()),
        selected_per_class=_per_class(chosen, n_classes),
        labelled_per_class=_per_class(chosen[known], n_classes),
        correct_per_class=_per_class(chosen[known][right], n_classes),
        true_per_class=_per_class(truth[truth >= 0], n_classes),
    )
