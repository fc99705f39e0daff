"""One pseudo-label count (sourcefree.data.metrics) behind both quality reports.

``ops.pseudo_labels.selection_quality`` (torch, every sample labelled) and
``runtime.evaluation.pseudo_label_quality`` (numpy, -1 = no evaluation label) are
thin views of :func:`pseudo_label_counts`; these tests pin the counts and that the
two views agree on the same selection.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sourcefree.data.metrics import pseudo_label_counts
from sourcefree.errors import InputError
from sourcefree.ops.pseudo_labels import (
    ClusterPseudoLabelConfig,
    cluster_pseudo_labels,
    selection_quality,
)
from sourcefree.runtime.evaluation import pseudo_label_quality


def test_counts_by_hand() -> None:
    truth = np.array([0, 0, 1, -1, 2, 1])
    counts = pseudo_label_counts(np.array([0, 1, 2, 3]), np.array([0, 1, 1, 2]), truth, 3)
    assert (counts.images, counts.selected, counts.labelled, counts.correct) == (6, 4, 3, 2)
    assert counts.selected_per_class == (1, 2, 1)
    assert counts.labelled_per_class == (1, 2, 0)
    assert counts.correct_per_class == (1, 1, 0)
    assert counts.true_per_class == (2, 2, 1)
    assert counts.precision == pytest.approx(2 / 3)
    assert counts.coverage == pytest.approx(4 / 6)
    assert counts.correct_coverage == pytest.approx(2 / 6)
    assert counts.per_class_precision == (1.0, 0.5, None)
    assert counts.per_class_coverage == (0.5, 0.5, 0.0)


def test_empty_selection_and_empty_target() -> None:
    none = np.zeros(0, np.int64)
    counts = pseudo_label_counts(none, none, np.array([1, -1]), 2)
    assert counts.precision is None and counts.coverage == 0.0
    assert counts.per_class_precision == (None, None)
    assert counts.per_class_coverage == (None, 0.0)
    assert pseudo_label_counts(none, none, none, 2).coverage == 0.0


def test_both_reports_agree_on_one_selection() -> None:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(3, (60,), generator=g)
    feats = 4.0 * torch.nn.functional.one_hot(y, 3).float() + torch.randn(60, 3, generator=g)
    logits = 2.0 * torch.nn.functional.one_hot(y, 3).float() + torch.randn(60, 3, generator=g)
    sel = cluster_pseudo_labels(
        feats, logits.softmax(dim=1), ClusterPseudoLabelConfig(score="confidence")
    )
    q = selection_quality(sel, y)
    report = pseudo_label_quality(sel.indices.numpy(), sel.labels.numpy(), y.numpy(), "abc")
    assert report["precision"] == q.precision and report["coverage"] == q.coverage
    assert list(report["precision_per_class"].values()) == list(q.per_class_precision)
    assert sum(report["selected_per_class"].values()) == report["selected"] == sel.indices.numel()


def test_no_selection_is_nan_in_torch_and_none_in_the_report() -> None:
    none = np.zeros(0, np.int64)
    assert pseudo_label_quality(none, none, np.array([0, 1]), "ab")["precision"] is None
    feats = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    sel = cluster_pseudo_labels(feats, torch.full((8, 2), 0.5), ClusterPseudoLabelConfig())
    empty = torch.zeros(0, dtype=torch.int64)
    q = selection_quality(dataclasses.replace(sel, indices=empty, labels=empty), empty.new_zeros(8))
    assert math.isnan(q.precision) and q.coverage == 0.0 and q.correct_coverage == 0.0
    assert q.per_class_precision == (None, None) and q.per_class_coverage == (0.0, None)


@pytest.mark.parametrize(
    ("indices", "chosen", "truth", "match"),
    [
        ([0, 1], np.array([0, 1]), np.array([0, 1]), r"indices is a list"),
        (np.array([0.0]), np.array([0]), np.array([0]), r"indices is a float64 array"),
        (np.array([0, 1]), np.array([0]), np.array([0, 1]), r"2 selected indices but 1"),
        (np.array([0, 2]), np.array([0, 1]), np.array([0, 1]), r"outside \[0, 2\)"),
        (np.array([0]), np.array([-1]), np.array([0, 1]), r"pseudo-label is negative"),
        (np.array([0]), np.array([0]), np.array([0, -2]), r"truth holds values below -1"),
    ],
)
def test_malformed_arrays_are_typed_errors(
    indices: object, chosen: np.ndarray, truth: np.ndarray, match: str
) -> None:
    with pytest.raises(InputError, match=match):
        pseudo_label_counts(indices, chosen, truth, 2)  # type: ignore[arg-type]
