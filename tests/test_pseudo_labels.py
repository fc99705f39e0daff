"""CluP cluster-level pseudo-labelling: selection rule, edge cases, determinism."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError

import pytest
import torch

from sourcefree.errors import ConfigError, InputError
from sourcefree.ops.clustering import KMeansConfig
from sourcefree.ops.pseudo_labels import (
    ClusterPseudoLabelConfig,
    PseudoLabelSelection,
    cluster_pseudo_labels,
    default_n_clusters,
    prepare_features,
    select_top_fraction_per_class,
    selection_quality,
)

FAST = KMeansConfig(n_init=2, max_iter=50)


def _domain(
    n: int, n_classes: int, accuracy_noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features in class blobs, source probabilities that are right only part of the time."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(n_classes, (n,), generator=g)
    means = 4.0 * torch.randn(n_classes, 16, generator=g)
    feats = means[y] + torch.randn(n, 16, generator=g)
    logits = 2.0 * torch.nn.functional.one_hot(y, n_classes).float()
    logits = logits + accuracy_noise * torch.randn(n, n_classes, generator=g)
    return feats, logits.softmax(dim=1), y


def _brute_select(
    labels: list[int], scores: list[float], tie: list[float], n_classes: int, q: float
) -> list[int]:
    kept: list[int] = []
    for c in range(n_classes):
        members = [i for i, lab in enumerate(labels) if lab == c]
        members.sort(key=lambda i: (-scores[i], -tie[i], i))
        kept += members[: math.ceil(round(q * len(members), 9))]
    return sorted(kept)


def test_prepare_features_appends_one_and_normalises() -> None:
    f = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    z = prepare_features(f)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    expected = torch.tensor([[3.0, 4.0, 1.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(z, expected / expected.norm(dim=1, keepdim=True))


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [(2000, 7, 70), (28709, 7, 956), (90000, 7, 1000), (100, 7, 20), (3, 7, 1), (5000, 8, 166)],
)
def test_default_n_clusters(n: int, c: int, k: int) -> None:
    assert default_n_clusters(n, c) == k
    assert default_n_clusters(n, c) <= n


def test_selection_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 300, 5
    labels = torch.randint(c, (n,), generator=g)
    scores = torch.randint(4, (n,), generator=g).float() / 4  # many ties
    tie = torch.randint(3, (n,), generator=g).float()  # ties in the tie-break too
    for q in (0.1, 0.25, 0.3, 0.5, 1.0):
        got = select_top_fraction_per_class(labels, scores, tie, c, q)
        want = _brute_select(labels.tolist(), scores.tolist(), tie.tolist(), c, q)
        assert got.tolist() == want


def test_quota_is_an_exact_ceil() -> None:
    labels = torch.tensor([0] * 30 + [1] * 3 + [2] * 11)
    scores = torch.linspace(0, 1, 44)
    keep = select_top_fraction_per_class(labels, scores, scores, 4, 0.1)
    counts = torch.bincount(labels[keep], minlength=4).tolist()
    # 0.1 * 30 is 3.0000000000000004 in floating point; the quota is still 3.
    # A class of 3 keeps 1 (ceil), not 0 (the reference's floor); class 3 is absent.
    assert counts == [3, 1, 2, 0]


def test_ties_at_the_cut_prefer_confidence_then_index() -> None:
    labels = torch.zeros(6, dtype=torch.int64)
    scores = torch.full((6,), 0.8)  # one cluster: all members share its purity
    conf = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.7, 0.1])
    keep = select_top_fraction_per_class(labels, scores, conf, 1, 0.5)
    assert keep.tolist() == [1, 3, 4]
    keep = select_top_fraction_per_class(labels, scores, conf, 1, 2 / 3)
    assert keep.tolist() == [0, 1, 3, 4]  # 0 beats 2 at equal confidence: lower index


def test_purity_selection_is_more_precise_than_the_source() -> None:
    feats, probs, y = _domain(1400, 7, 1.3, seed=1)
    source_acc = float((probs.argmax(dim=1) == y).float().mean())
    sel = cluster_pseudo_labels(feats, probs, ClusterPseudoLabelConfig(kmeans=FAST))
    quality = selection_quality(sel, y)
    assert source_acc < 0.8
    assert quality.precision > source_acc + 0.15
    assert sel.diagnostics.n_clusters == default_n_clusters(1400, 7)
    assert sum(sel.selected_per_class) == sel.indices.numel() == sel.diagnostics.n_selected
    assert sel.empty_classes == ()
    assert quality.coverage == pytest.approx(sel.indices.numel() / 1400)


def test_selection_structure_and_quotas() -> None:
    feats, probs, _ = _domain(700, 7, 1.0, seed=2)
    cfg = ClusterPseudoLabelConfig(n_clusters=35, keep_fraction=0.2, kmeans=FAST)
    sel = cluster_pseudo_labels(feats, probs, cfg)
    assert sel.indices.dtype == torch.int64
    assert torch.equal(sel.indices, sel.indices.sort().values)
    assert len(set(sel.indices.tolist())) == sel.indices.numel()
    for c in range(7):
        n_c = sel.candidates_per_class[c]
        assert sel.selected_per_class[c] == math.ceil(round(0.2 * n_c, 9))
        kept = sel.scores[sel.labels == c]
        if kept.numel():
            assert sel.thresholds[c] == pytest.approx(float(kept.min()))
    hist = sel.histogram
    assert hist.kind == "purity"
    assert sum(hist.sample_counts) == 700
    assert hist.cluster_counts is not None
    assert sum(hist.cluster_counts) == 35 - sel.diagnostics.n_empty_clusters
    assert sum(sel.diagnostics.clusters_per_class) == 35 - sel.diagnostics.n_empty_clusters
    # Every member of a cluster inherits its purity: scores are multiples of 1/size.
    assert (sel.scores >= 1 / 7 - 1e-6).all()
    with pytest.raises(FrozenInstanceError):
        sel.n_samples = 3  # type: ignore[misc]


def test_deterministic_by_seed() -> None:
    feats, probs, _ = _domain(500, 7, 1.0, seed=3)
    cfg = ClusterPseudoLabelConfig(kmeans=KMeansConfig(n_init=2, seed=4))
    a = cluster_pseudo_labels(feats, probs, cfg)
    b = cluster_pseudo_labels(feats, probs, cfg)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.labels, b.labels)
    assert a.diagnostics == b.diagnostics


def test_class_that_wins_no_cluster_gets_nothing_and_is_reported() -> None:
    feats, probs, _ = _domain(400, 3, 0.3, seed=5)
    # Add a 4th class that the source predicts only for 2 scattered samples: it never
    # holds a cluster majority.
    probs4 = torch.cat([probs * 0.9, torch.full((400, 1), 0.1)], dim=1)
    probs4[[7, 201]] = torch.tensor([0.05, 0.05, 0.05, 0.85])
    cfg = ClusterPseudoLabelConfig(n_clusters=12, kmeans=FAST)
    sel = cluster_pseudo_labels(feats, probs4, cfg)
    assert sel.selected_per_class[3] == 0
    assert sel.candidates_per_class[3] == 0
    assert sel.thresholds[3] is None
    assert 3 in sel.empty_classes
    assert sel.diagnostics.clusters_per_class[3] == 0
    assert sel.indices.numel() > 0


def test_empty_clusters_have_no_effect() -> None:
    # Five distinct points, K=5, but three of them duplicated: still every point is labelled.
    base = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    cfg = ClusterPseudoLabelConfig(n_clusters=5, keep_fraction=1.0, kmeans=FAST)
    sel = cluster_pseudo_labels(base, probs, cfg)
    assert sel.diagnostics.n_empty_clusters == 2
    assert sel.indices.tolist() == [0, 1, 2, 3, 4]
    assert sel.labels.tolist() == [0, 0, 1, 1, 0]
    assert not torch.isnan(sel.scores).any()


def test_confidence_ablation_uses_source_argmax_and_max_prob() -> None:
    feats, probs, _ = _domain(300, 4, 1.0, seed=6)
    cfg = ClusterPseudoLabelConfig(score="confidence", keep_fraction=0.3)
    sel = cluster_pseudo_labels(feats, probs, cfg)
    conf, pred = probs.max(dim=1)
    want = _brute_select(pred.tolist(), conf.tolist(), conf.tolist(), 4, 0.3)
    assert sel.indices.tolist() == want
    assert torch.equal(sel.labels, pred[sel.indices])
    torch.testing.assert_close(sel.scores, conf[sel.indices])
    assert sel.diagnostics.n_clusters == 0
    assert sel.diagnostics.selected_agreement == 1.0
    assert sel.histogram.cluster_counts is None


def test_explicit_k_larger_than_n_is_an_error() -> None:
    feats, probs, _ = _domain(20, 3, 1.0, seed=7)
    cfg = ClusterPseudoLabelConfig(n_clusters=50)
    with pytest.raises(ConfigError, match=r"n_clusters=50 is larger than the number of target"):
        cluster_pseudo_labels(feats, probs, cfg)
    # The automatic K fits any N, down to a single sample.
    sel = cluster_pseudo_labels(feats[:1], probs[:1], ClusterPseudoLabelConfig(kmeans=FAST))
    assert sel.indices.tolist() == [0]
    assert sel.diagnostics.n_clusters == 1


def test_bad_inputs_are_refused() -> None:
    feats, probs, y = _domain(50, 3, 1.0, seed=8)
    logits = torch.log(probs) * 3
    with pytest.raises(InputError, match=r"look like logits"):
        cluster_pseudo_labels(feats, logits)
    with pytest.raises(InputError, match=r"probabilities has 49 rows but features has 50"):
        cluster_pseudo_labels(feats, probs[:49])
    with pytest.raises(InputError, match=r"features has shape \(0, 16\)"):
        cluster_pseudo_labels(feats[:0], probs[:0])
    bad = feats.clone()
    bad[3, 2] = float("inf")
    with pytest.raises(InputError, match=r"features contains NaN or infinite"):
        cluster_pseudo_labels(bad, probs)
    sel = cluster_pseudo_labels(feats, probs, ClusterPseudoLabelConfig(kmeans=FAST))
    with pytest.raises(InputError, match=r"true_labels do not match the selection"):
        selection_quality(sel, y[:10])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_fraction": 0.0}, r"keep_fraction=0.0 is invalid"),
        ({"keep_fraction": 1.5}, r"keep_fraction=1.5 is invalid"),
        ({"n_clusters": 0}, r"n_clusters=0 is invalid"),
        ({"score": "entropy"}, r"score='entropy' is unknown"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ClusterPseudoLabelConfig(**kwargs)  # type: ignore[arg-type]


def test_selection_quality_by_hand() -> None:
    feats, probs, _ = _domain(40, 2, 1.0, seed=9)
    sel = cluster_pseudo_labels(
        feats, probs, ClusterPseudoLabelConfig(score="confidence", keep_fraction=0.25)
    )
    y = torch.zeros(40, dtype=torch.int64)
    q = selection_quality(sel, y)
    n_right = int((sel.labels == 0).sum())
    assert q.precision == pytest.approx(n_right / sel.indices.numel())
    assert q.coverage == pytest.approx(sel.indices.numel() / 40)
    assert q.correct_coverage == pytest.approx(n_right / 40)
    assert q.per_class_coverage == (n_right / 40, None)
    assert q.per_class_precision[1] == 0.0
    assert isinstance(sel, PseudoLabelSelection)
