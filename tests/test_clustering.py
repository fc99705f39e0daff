"""K-means and cluster purity against brute-force references on small data."""

from __future__ import annotations

import pytest
import torch

from sourcefree.errors import ConfigError, InputError
from sourcefree.ops.clustering import (
    ClusterPurity,
    KMeansConfig,
    cluster_purity,
    contingency_table,
    kmeans,
    kmeans_plusplus,
    member_labels_and_scores,
)


def _blobs(
    n_per: int, centers: torch.Tensor, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, d = centers.shape
    y = torch.arange(k).repeat_interleave(n_per)
    x = centers[y] + spread * torch.randn(k * n_per, d, generator=g, dtype=centers.dtype)
    return x, y


def _brute_lloyd(x: torch.Tensor, c: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Textbook Lloyd with a full distance matrix and a loop per cluster (no empty clusters)."""
    c = c.clone()
    for _ in range(n_iter):
        labels = torch.cdist(x, c).argmin(dim=1)
        c = torch.stack([x[labels == j].mean(dim=0) for j in range(c.shape[0])])
    return c


def test_lloyd_matches_brute_force_in_float64() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    init = x[:6].clone()
    res = kmeans(x, 6, KMeansConfig(n_init=1, max_iter=7, tol=0.0), init=init)
    ref = _brute_lloyd(x, init, res.n_iter)
    torch.testing.assert_close(res.centroids, ref, rtol=1e-10, atol=1e-10)
    full = torch.cdist(x, res.centroids) ** 2
    assert torch.equal(res.labels, full.argmin(dim=1))
    assert res.inertia == pytest.approx(float(full.min(dim=1).values.sum()), rel=1e-9)
    assert torch.equal(res.cluster_sizes, torch.bincount(res.labels, minlength=6))


def test_recovers_well_separated_blobs() -> None:
    centers = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    x, y = _blobs(50, centers, 0.5, seed=1)
    res = kmeans(x, 4, KMeansConfig(seed=5))
    table = contingency_table(res.labels, y, 4, 4)
    # Each cluster holds exactly one blob.
    assert torch.equal((table > 0).sum(dim=1), torch.ones(4, dtype=torch.int64))
    assert res.converged
    assert res.n_iter < 300
    assert res.n_empty == 0


def test_deterministic_by_seed() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    a = kmeans(x, 10, KMeansConfig(seed=7, n_init=2))
    b = kmeans(x, 10, KMeansConfig(seed=7, n_init=2))
    c = kmeans(x, 10, KMeansConfig(seed=8, n_init=2))
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.labels, b.labels)
    assert a.inertia == b.inertia
    assert not torch.equal(a.centroids, c.centroids)


def test_kmeans_plusplus_picks_data_points_deterministically() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    c1 = kmeans_plusplus(x, 12, torch.Generator().manual_seed(1))
    c2 = kmeans_plusplus(x, 12, torch.Generator().manual_seed(1))
    assert torch.equal(c1, c2)
    # Every centre is a row of x, and no row is picked twice (distinct points).
    match = (c1[:, None, :] == x[None, :, :]).all(dim=2).nonzero()[:, 1]
    assert match.numel() == 12
    assert len(set(match.tolist())) == 12


def test_kmeans_plusplus_spreads_over_blobs() -> None:
    centers = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    x, _ = _blobs(100, centers, 0.1, seed=2)
    c = kmeans_plusplus(x, 3, torch.Generator().manual_seed(0))
    assert torch.cdist(c, centers).argmin(dim=1).sort().values.tolist() == [0, 1, 2]


def test_more_inits_never_worse_than_the_first() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 3, generator=g)
    one = kmeans(x, 15, KMeansConfig(n_init=1, seed=11))
    many = kmeans(x, 15, KMeansConfig(n_init=5, seed=11))
    assert many.inertia <= one.inertia


def test_k_equals_one_is_the_mean() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=g, dtype=torch.float64)
    res = kmeans(x, 1)
    torch.testing.assert_close(res.centroids[0], x.mean(dim=0))
    assert torch.equal(res.labels, torch.zeros(100, dtype=torch.int64))
    assert res.inertia == pytest.approx(float(((x - x.mean(0)) ** 2).sum()))


def test_k_equals_n_gives_zero_inertia() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g)
    res = kmeans(x, 20)
    assert res.inertia == pytest.approx(0.0, abs=1e-8)
    assert res.n_empty == 0


def test_identical_points_leave_clusters_empty_without_nan() -> None:
    x = torch.ones(30, 4)
    res = kmeans(x, 5, KMeansConfig(n_init=2))
    assert res.inertia == 0.0
    assert torch.equal(res.labels, torch.zeros(30, dtype=torch.int64))  # ties -> lowest index
    assert res.n_empty == 4
    assert torch.isfinite(res.centroids).all()
    pur = cluster_purity(res.labels, torch.zeros(30, dtype=torch.int64), 5, 3)
    assert pur.labels.tolist() == [0, -1, -1, -1, -1]
    assert pur.purity.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_empty_cluster_is_repaired_with_the_farthest_points() -> None:
    g = torch.Generator().manual_seed(6)
    blob = 0.3 * torch.randn(40, 2, generator=g)
    x = torch.cat([blob, torch.tensor([[50.0, 0.0], [0.0, 50.0]])])
    # Three identical starting centroids: clusters 1 and 2 win no point (ties -> lowest index)
    # and must move onto the two outliers, the points farthest from centroid 0.
    init = torch.zeros(3, 2)
    res = kmeans(x, 3, KMeansConfig(n_init=1, tol=0.0), init=init)
    assert res.n_empty == 0
    assert res.cluster_sizes.tolist() == [40, 1, 1]
    assert sorted(res.centroids[1:].tolist()) == [[0.0, 50.0], [50.0, 0.0]]


def test_subsampled_training_labels_every_point() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1000, 4, generator=g)
    res = kmeans(x, 5, KMeansConfig(max_points_per_centroid=40, n_init=1))
    assert res.n_train == 200
    assert res.labels.shape == (1000,)
    full = torch.cdist(x, res.centroids) ** 2
    assert torch.equal(res.labels, full.argmin(dim=1))
    assert res.inertia == pytest.approx(float(full.min(dim=1).values.sum()), rel=1e-4)
    assert kmeans(x, 5, KMeansConfig(max_points_per_centroid=None, n_init=1)).n_train == 1000


def test_tol_zero_runs_until_fixed_point_or_max_iter() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 2, generator=g)
    res = kmeans(x, 8, KMeansConfig(n_init=1, tol=0.0, max_iter=3))
    assert res.n_iter == 3
    assert not res.converged


def test_n_clusters_larger_than_n_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"n_clusters=5 is larger than the number of points \(4\)"
    ):
        kmeans(torch.randn(4, 2), 5)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(5), r"has shape \(5,\)"),
        (torch.zeros(0, 3), r"has shape \(0, 3\)"),
        (torch.ones(4, 2, dtype=torch.int64), "has dtype torch.int64"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), "NaN or infinite"),
    ],
)
def test_bad_points_are_refused(x: torch.Tensor, match: str) -> None:
    with pytest.raises(InputError, match=match):
        kmeans(x, 1)


def test_bad_config_and_init_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"n_init=0 is invalid"):
        KMeansConfig(n_init=0)
    with pytest.raises(ConfigError, match=r"tol=-1.0 is invalid"):
        KMeansConfig(tol=-1.0)
    with pytest.raises(ConfigError, match=r"n_clusters=True is invalid"):
        kmeans(torch.randn(4, 2), True)
    x = torch.randn(10, 2)
    with pytest.raises(ConfigError, match=r"with n_init=10"):
        kmeans(x, 2, init=x[:2].clone())
    with pytest.raises(InputError, match=r"init has shape \(3, 2\)"):
        kmeans(x, 2, KMeansConfig(n_init=1), init=x[:3].clone())


def test_contingency_and_purity_match_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    k, c, n = 13, 7, 400
    cl = torch.randint(k - 1, (n,), generator=g)  # cluster k-1 stays empty
    y = torch.randint(c, (n,), generator=g)
    table = contingency_table(cl, y, k, c)
    loop = torch.tensor([[int(((cl == j) & (y == m)).sum()) for m in range(c)] for j in range(k)])
    assert torch.equal(table, loop)
    pur = cluster_purity(cl, y, k, c)
    for j in range(k):
        size = int((cl == j).sum())
        if size == 0:
            assert int(pur.labels[j]) == -1
            assert float(pur.purity[j]) == 0.0
            continue
        best = max(range(c), key=lambda m: (int(loop[j, m]), -m))  # ties -> lowest class
        assert int(pur.labels[j]) == best
        assert float(pur.purity[j]) == pytest.approx(int(loop[j, best]) / size)
    assert not torch.isnan(pur.purity).any()
    assert pur.nonempty.tolist() == [True] * (k - 1) + [False]


def test_purity_ties_go_to_lowest_class() -> None:
    cl = torch.tensor([0, 0, 0, 0, 1, 1])
    y = torch.tensor([3, 1, 3, 1, 2, 0])
    pur = cluster_purity(cl, y, 2, 4)
    assert pur.labels.tolist() == [1, 0]
    assert pur.purity.tolist() == [0.5, 0.5]


def test_member_labels_and_scores_inherit_cluster_values() -> None:
    cl = torch.tensor([0, 0, 1, 2, 2, 2])
    y = torch.tensor([1, 1, 0, 2, 2, 1])
    pur = cluster_purity(cl, y, 4, 3)
    labels, scores = member_labels_and_scores(cl, pur)
    assert labels.tolist() == [1, 1, 0, 2, 2, 2]
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 1.0, 2 / 3, 2 / 3, 2 / 3]))
    assert isinstance(pur, ClusterPurity)


def test_purity_refuses_out_of_range_labels() -> None:
    with pytest.raises(InputError, match=r"class_labels holds values outside \[0, 3\)"):
        cluster_purity(torch.tensor([0, 1]), torch.tensor([0, 3]), 2, 3)
    with pytest.raises(InputError, match=r"class_labels has 1 entries"):
        cluster_purity(torch.tensor([0, 1]), torch.tensor([0]), 2, 3)
    with pytest.raises(InputError, match=r"cluster_labels is a torch.float32 tensor"):
        cluster_purity(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 2, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 16, generator=g)
    cfg = KMeansConfig(n_init=2, seed=3)
    cpu = kmeans(x, 20, cfg)
    gpu = kmeans(x.cuda(), 20, cfg)
    assert gpu.centroids.is_cuda
    assert gpu.labels.is_cuda
    agree = (gpu.labels.cpu() == cpu.labels).float().mean().item()
    assert agree > 0.99
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)
    pur = cluster_purity(gpu.labels, (gpu.labels % 3).contiguous(), 20, 3)
    assert pur.purity.is_cuda


def test_all_finite_and_tolerance_variance() -> None:
    from sourcefree.ops.clustering import _mean_feature_variance, all_finite

    x = torch.randn(50, 3, dtype=torch.float64) * 3 + 7
    assert _mean_feature_variance(x) == pytest.approx(
        float(x.var(dim=0, unbiased=False).mean()), rel=1e-9
    )
    assert all_finite(x)
    huge = torch.full((4, 2), 3e38)  # finite values whose float32 sum overflows
    assert all_finite(huge)
    huge[1, 1] = float("-inf")
    assert not all_finite(huge)
    assert not all_finite(torch.tensor([1.0, float("nan")]))
