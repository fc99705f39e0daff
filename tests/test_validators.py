"""sourcefree.pipeline.validators: BNM, AMI and ClassAMI against hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sourcefree.errors import InputError
from sourcefree.pipeline import selection, validators

C = 7


def _one_hot_logits(labels: list[int], classes: int = C) -> torch.Tensor:
    return torch.eye(classes)[labels] * 60.0  # softmax is one-hot to ~1e-26


def test_bnm_of_one_hot_and_uniform_matrices() -> None:
    # Balanced one-hot, N = 4 C: A^T A = 4 I, every singular value 2: ||A||_* = 2 C.
    balanced = _one_hot_logits([c for c in range(C) for _ in range(4)])
    assert validators.batch_nuclear_norm(balanced) == pytest.approx(math.sqrt(C / (4 * C)))
    # One class for all N: a single singular value sqrt(N).
    collapsed = _one_hot_logits([3] * 28)
    assert validators.batch_nuclear_norm(collapsed) == pytest.approx(1 / math.sqrt(28))
    # Uniform rows 1/C: rank one, ||A||_* = ||A||_F = sqrt(N / C).
    uniform = torch.zeros(28, C)
    assert validators.batch_nuclear_norm(uniform) == pytest.approx(1 / math.sqrt(28 * C))


def test_bnm_of_a_two_by_two_matrix_by_hand() -> None:
    # A = [[p, q], [q, p]] (q = 1 - p) is symmetric with eigenvalues 1 and 2p - 1.
    a = 1.3
    p = 1 / (1 + math.exp(-a))
    logits = torch.tensor([[a, 0.0], [0.0, a]])
    assert validators.batch_nuclear_norm(logits) == pytest.approx((1 + abs(2 * p - 1)) / 2)


def _mi(a: list[int], b: list[int]) -> float:
    n = len(a)
    out = 0.0
    for x in set(a):
        for y in set(b):
            nxy = sum(1 for i in range(n) if a[i] == x and b[i] == y)
            if nxy:
                out += nxy / n * math.log(n * nxy / (a.count(x) * b.count(y)))
    return out


def _h(a: list[int]) -> float:
    n = len(a)
    return -sum(a.count(x) / n * math.log(a.count(x) / n) for x in set(a))


def test_expected_mutual_information_equals_the_mean_over_every_permutation() -> None:
    # The hypergeometric model: every relabelling of b is equally likely.
    a = [0, 0, 0, 1, 1, 2, 2]
    b = [0, 0, 1, 1, 1, 1, 2]
    perms = list(itertools.permutations(b))
    brute = sum(_mi(a, list(p)) for p in perms) / len(perms)
    counts = (torch.tensor([3, 2, 2]), torch.tensor([2, 4, 1]))
    assert validators.expected_mutual_information(*counts) == pytest.approx(brute, abs=1e-12)
    # And so AMI by its definition, term by term.
    want = (_mi(a, b) - brute) / ((_h(a) + _h(b)) / 2 - brute)
    assert validators.adjusted_mutual_information(np.array(a), np.array(b)) == pytest.approx(
        want, abs=1e-12
    )


def test_ami_of_identical_trivial_and_independent_partitions() -> None:
    ami = validators.adjusted_mutual_information
    a = np.array([0, 0, 1, 1, 2, 2, 2])
    assert ami(a, a) == pytest.approx(1.0)
    assert ami(a, np.array([5, 5, 9, 9, 1, 1, 1])) == pytest.approx(1.0)  # renamed labels
    assert ami(np.zeros(6, np.int64), np.arange(6)) == pytest.approx(0.0)
    assert ami(np.zeros(6, np.int64), np.zeros(6, np.int64)) == 1.0  # 0 / 0: identical
    assert ami(np.arange(6), np.arange(6)) == 1.0
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, C, 3000), rng.integers(0, C, 3000)
    assert abs(ami(x, y)) < 0.01  # independent: about 0 (plain MI would be ~0.006 nats > 0)
    assert ami(x, y) == pytest.approx(ami(y, x), abs=1e-12)
    # Worse than chance: each cluster of one is split evenly across the other.
    assert ami(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) < 0


def test_ami_refuses_bad_labels() -> None:
    with pytest.raises(InputError):
        validators.adjusted_mutual_information(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(InputError):
        validators.adjusted_mutual_information(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(InputError):
        validators.expected_mutual_information(torch.tensor([2, 2]), torch.tensor([3]))


def _blobs(n_per: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(C, 96) * 20.0
    labels = torch.arange(C).repeat_interleave(n_per)
    feats = centres[labels] + torch.randn(len(labels), 96, generator=gen)
    return feats, labels


def test_class_ami_is_one_when_predictions_follow_the_feature_clusters() -> None:
    feats, labels = _blobs()
    logits = _one_hot_logits(labels.tolist())
    assert validators.class_ami(feats, logits) == pytest.approx(1.0)
    # Predictions that ignore the clusters score about 0.
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert abs(validators.class_ami(feats, _one_hot_logits(shuffled.tolist()))) < 0.05
    # A model that predicts one class everywhere: no information, 0.
    assert validators.class_ami(feats, _one_hot_logits([0] * len(labels))) == pytest.approx(0.0)


def test_class_ami_refuses_features_that_do_not_match() -> None:
    feats, labels = _blobs()
    logits = _one_hot_logits(labels.tolist())
    with pytest.raises(InputError):
        validators.class_ami(feats[:-1], logits)
    with pytest.raises(InputError):
        validators.class_ami(feats.long(), logits)
    bad = feats.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError):
        validators.class_ami(bad, logits)


def test_validator_scores_reuse_the_selection_scores() -> None:
    feats, labels = _blobs(n_per=10)
    logits = _one_hot_logits(labels.tolist()) / 20 + torch.randn(len(labels), C) * 0.1
    out = validators.validator_scores(logits, feats)
    assert list(out) == list(validators.VALIDATORS)
    assert out["im"] == selection.information_maximisation(logits)
    assert out["snd"] == selection.soft_neighbourhood_density(logits)
    assert validators.validator_scores(logits)["class_ami"] is None
