"""CluP's two selection rules on hand-computed purities: samples (reference) vs clusters (paper)."""

from __future__ import annotations

import pytest
import torch

from sourcefree.errors import ConfigError, InputError
from sourcefree.ops.clustering import KMeansConfig
from sourcefree.ops.pseudo_labels import (
    ClusterPseudoLabelConfig,
    cluster_pseudo_labels,
    select_clusters_per_class,
)

# Seven clusters: four vote for class 0, two for class 1, one is empty; class 2 wins none.
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, -1])
PURITY = torch.tensor([1.0, 0.9, 0.6, 0.5, 1.0, 0.6, 0.0])


@pytest.mark.parametrize(
    ("q", "kept", "tau"),
    [
        # Q = 0.5. Class 0 sorted (0.5, 0.6, 0.9, 1.0): position 3 * 0.5 = 1.5,
        # tau = 0.6 + 0.5 * 0.3 = 0.75. Class 1 (0.6, 1.0): position 0.5, tau = 0.8.
        (0.5, [0, 1, 4], (0.75, 0.8, None)),
        # Q = 0.7. Class 0: position 2.1, tau = 0.9 + 0.1 * 0.1 = 0.91;
        # class 1: position 0.7, tau = 0.6 + 0.7 * 0.4 = 0.88.
        (0.3, [0, 4], (0.91, 0.88, None)),
        # Q = 0: tau is each class's lowest purity; every non-empty cluster is kept.
        (1.0, [0, 1, 2, 3, 4, 5], (0.5, 0.6, None)),
    ],
)
def test_cluster_rule_hand_computed(q: float, kept: list[int], tau: tuple[float | None]) -> None:
    mask, thresholds = select_clusters_per_class(LABELS, PURITY, 3, q)
    assert torch.nonzero(mask).flatten().tolist() == kept
    assert thresholds[2] is None
    assert thresholds[:2] == pytest.approx(tau[:2], abs=1e-6)


def test_clusters_at_the_percentile_are_kept() -> None:
    # Three pure clusters and one at 0.5, Q = 0.9: position 2.7 between two 1.0s, tau = 1.0.
    # "At or above" keeps the three; a strict "higher than" would keep nothing.
    labels = torch.tensor([0, 0, 0, 0, 1])
    mask, tau = select_clusters_per_class(labels, torch.tensor([1.0, 0.5, 1.0, 1.0, 0.7]), 2, 0.1)
    assert mask.tolist() == [True, False, True, True, True]  # a class of one cluster keeps it
    assert tau[0] == 1.0 and tau[1] == pytest.approx(0.7)


def test_percentile_position_is_exact_for_decimal_q() -> None:
    # 11 distinct purities, Q = 1 - 0.3: position 10 * 0.7 = 7 exactly, tau = 0.7 (numpy's
    # float 0.7000000000000001 would drop the 0.7 cluster); 4 clusters are kept.
    purity = torch.arange(11, dtype=torch.float64) / 10
    mask, tau = select_clusters_per_class(torch.zeros(11, dtype=torch.int64), purity, 1, 0.3)
    assert torch.nonzero(mask).flatten().tolist() == [7, 8, 9, 10]
    assert tau == (0.7,)


def test_cluster_rule_refuses_bad_inputs() -> None:
    with pytest.raises(InputError, match="int64"):
        select_clusters_per_class(LABELS.float(), PURITY, 3, 0.5)
    with pytest.raises(InputError, match="does not match"):
        select_clusters_per_class(LABELS, PURITY[:3], 3, 0.5)
    with pytest.raises(InputError, match="outside"):
        select_clusters_per_class(LABELS, PURITY, 1, 0.5)
    with pytest.raises(ConfigError, match="keep_fraction"):
        select_clusters_per_class(LABELS, PURITY, 3, 0.0)
    empty, tau = select_clusters_per_class(torch.full((3,), -1), torch.zeros(3), 2, 0.5)
    assert not empty.any() and tau == (None, None)


def _six_clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """40 samples in 6 point-clusters A-F with known source predictions (confidence 0.8).

    A 0-1: all class 0 (purity 1.0). B 2-11: nine 0, one 1 (0.9). C 12-21: six 0, four 1
    (0.6). D 22-29: four 0, four 2 (0.5, the tie goes to class 0). E 30-34: all 1 (1.0).
    F 35-39: three 1, two 2 (0.6).
    """
    sizes = [2, 10, 10, 8, 5, 5]
    feats = torch.cat([3.0 * torch.eye(6)[j].expand(m, 6) for j, m in enumerate(sizes)])
    pred = [0, 0] + [0] * 9 + [1] + [0] * 6 + [1] * 4 + [0] * 4 + [2] * 4 + [1] * 5
    pred += [1] * 3 + [2] * 2
    probs = torch.full((40, 3), 0.1)
    probs[torch.arange(40), torch.tensor(pred)] = 0.8
    return feats, probs


@pytest.mark.parametrize(
    ("selection", "kept"),
    [
        # Class 0 has 30 members: ceil(0.5 * 30) = 15, i.e. A, B and three of C (equal
        # purity and confidence: lowest index). Class 1: 5 of 10, i.e. E.
        ("samples", [*range(15), *range(30, 35)]),
        # Class 0: tau 0.75 keeps clusters A and B whole; class 1: tau 0.8 keeps E.
        ("clusters", [*range(12), *range(30, 35)]),
    ],
)
def test_both_rules_through_cluster_pseudo_labels(selection: str, kept: list[int]) -> None:
    feats, probs = _six_clusters()
    cfg = ClusterPseudoLabelConfig(
        n_clusters=6,
        keep_fraction=0.5,
        kmeans=KMeansConfig(n_init=1, max_iter=10),
        selection=selection,  # type: ignore[arg-type]
    )
    sel = cluster_pseudo_labels(feats, probs, cfg)
    assert sel.indices.tolist() == kept
    assert sel.labels.tolist() == [0] * (len(kept) - 5) + [1] * 5  # sample 11 takes B's 0
    assert sel.empty_classes == (2,)
    assert sel.diagnostics.selection == selection
    assert sel.diagnostics.clusters_kept == (3 if selection == "clusters" else 0)
    lowest = (0.9, 1.0, None) if selection == "clusters" else (0.6, 1.0, None)
    assert sel.thresholds == pytest.approx(lowest)


def test_selection_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        ClusterPseudoLabelConfig(selection="topk")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no clusters"):
        ClusterPseudoLabelConfig(score="confidence", selection="clusters")
    assert ClusterPseudoLabelConfig().selection == "samples"
