"""SHOT centroid pseudo-labels against a brute-force reference written from the paper."""

from __future__ import annotations

import math

import pytest
import torch

from sourcefree.errors import ConfigError, InputError
from sourcefree.ops.pseudo_labels import CentroidPseudoLabels, centroid_pseudo_labels


def _reference(features: torch.Tensor, probs: torch.Tensor, rounds: int = 2) -> list[int]:
    """Loop-by-loop float64 version: [f;1]/||.||, weighted centroids, cosine distance."""
    n, c = probs.shape
    rows = []
    for i in range(n):
        v = [float(x) for x in features[i]] + [1.0]
        norm = math.sqrt(sum(x * x for x in v))
        rows.append([x / norm for x in v])
    weights = [[float(probs[i, k]) for k in range(c)] for i in range(n)]
    prev = [int(probs[i].argmax()) for i in range(n)]
    labels = prev
    for _ in range(rounds):
        present = {k for k in prev}
        cents = []
        for k in range(c):
            s = sum(weights[i][k] for i in range(n)) + 1e-8
            dims = range(len(rows[0]))
            cents.append([sum(weights[i][k] * rows[i][d] for i in range(n)) / s for d in dims])
        labels = []
        for i in range(n):
            best, best_d = -1, math.inf
            for k in sorted(present):
                ck = cents[k]
                cos = sum(a * b for a, b in zip(rows[i], ck, strict=True)) / math.sqrt(
                    sum(b * b for b in ck)
                )
                if 1 - cos < best_d - 1e-12:
                    best, best_d = k, 1 - cos
            labels.append(best)
        prev = labels
        weights = [[1.0 if labels[i] == k else 0.0 for k in range(c)] for i in range(n)]
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 5, generator=g) * 2
    y = torch.randint(0, 4, (40,), generator=g)
    feats = centres[y] + torch.randn(40, 5, generator=g)
    logits = torch.randn(40, 4, generator=g) + 2 * torch.nn.functional.one_hot(y, 4)
    probs = torch.softmax(logits, 1)
    got = centroid_pseudo_labels(feats, probs)
    assert isinstance(got, CentroidPseudoLabels)
    assert got.labels.dtype == torch.int64
    assert got.labels.tolist() == _reference(feats, probs)
    assert got.counts == tuple(torch.bincount(got.labels, minlength=4).tolist())
    one = centroid_pseudo_labels(feats, probs, rounds=1)
    assert one.labels.tolist() == _reference(feats, probs, rounds=1)


def test_hand_computed_case() -> None:
    # Two clusters on the axes; the model's probabilities mislabel sample 2.
    feats = torch.tensor([[3.0, 0.0], [2.0, 0.1], [2.5, -0.1], [0.0, 3.0], [0.1, 2.0]])
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.1, 0.9], [0.2, 0.8]])
    got = centroid_pseudo_labels(feats, probs)
    assert got.labels.tolist() == [0, 0, 0, 1, 1]
    assert got.agreement == pytest.approx(4 / 5)
    assert got.assignable == (0, 1)
    # Last-round centroids are class means of the prepared features.
    z = torch.cat([feats, torch.ones(5, 1)], 1)
    z = z / z.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got.centroids[0], z[:3].mean(0), rtol=1e-5, atol=1e-6)


def test_class_nobody_predicts_is_never_assigned() -> None:
    # Sample 3 sits right on class 2's direction, but no sample's argmax is class 2.
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 5.0]])
    probs = torch.tensor(
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.45, 0.1, 0.45 - 1e-3]]
    )
    probs = probs / probs.sum(1, keepdim=True)
    got = centroid_pseudo_labels(feats, probs)
    assert 2 not in got.labels.tolist()
    assert 2 not in got.assignable
    assert got.counts[2] == 0
    assert bool((got.centroids[2] == 0).all())


def test_threshold_removes_rare_classes() -> None:
    feats = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    probs = torch.full((12, 3), 0.1)
    probs[:6, 0] = 0.8
    probs[6:11, 1] = 0.8
    probs[11, 2] = 0.8
    got = centroid_pseudo_labels(feats, probs, threshold=1)
    assert 2 not in got.labels.tolist()


def test_bad_inputs() -> None:
    feats = torch.randn(4, 3)
    probs = torch.full((4, 2), 0.5)
    with pytest.raises(InputError):
        centroid_pseudo_labels(feats, torch.randn(4, 2))  # logits, not probabilities
    with pytest.raises(InputError):
        centroid_pseudo_labels(feats, probs[:3])
    with pytest.raises(InputError):
        centroid_pseudo_labels(feats.masked_fill(feats > 0, math.nan), probs)
    with pytest.raises(ConfigError):
        centroid_pseudo_labels(feats, probs, rounds=0)
    with pytest.raises(ConfigError):
        centroid_pseudo_labels(feats, probs, threshold=-1)
