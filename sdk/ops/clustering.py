"""K-means and cluster purity in plain PyTorch (CPU and CUDA).

K-means follows Lloyd's algorithm with greedy k-means++ seeding
(Arthur & Vassilvitskii 2007). Every assignment step goes through
:func:`sourcefree.kernels.kmeans_assign`, which works in row chunks and never
holds an N x K distance matrix. Centroids are updated with ``index_add_`` and
``bincount`` (no one-hot GEMM). Optionally, as faiss does, training runs on a
random subsample of at most ``max_points_per_centroid * K`` points, and one
final assignment pass then labels all N points.

Cluster purity is CluP's eq. 1 (Conti et al., BMVC 2022): for cluster C_j with
majority source prediction y_j, ``s_j = |{i in C_j : y_i = y_j}| / |C_j|``. It
is computed from one K x C contingency table built by a single ``bincount``.

Decisions (tested in tests/test_clustering.py):

- ``n_clusters > N`` is a :class:`~sourcefree.errors.ConfigError`, never
  silently clamped: a caller who asked for K clusters gets K clusters or an
  error. ``n_clusters == N`` is allowed.
- Empty clusters are repaired after each update: they move to the training
  points farthest from their current centroid (largest first, ties to the lower
  point index). When every point already sits on a centroid (fewer distinct
  points than K, e.g. identical points) no repair is possible; the cluster keeps
  its centroid, stays empty, and :attr:`KMeansResult.n_empty` reports it.
- Distance ties go to the lowest centroid index (``kmeans_assign``); majority
  ties in purity go to the lowest class index; empty clusters get label -1 and
  purity 0 (a mask, never NaN).
- Cost: each Lloyd iteration is one N x K x D GEMM (chunked) plus an O(N D)
  update. k-means++ reads every training point once per centre (K memory-bound
  passes), about as much as 10-20 Lloyd iterations at N=100k, D=512, K=1000 on
  a 2-core CPU; lower ``max_points_per_centroid`` (seeding and training run on
  the subsample) or ``n_init`` where that matters.
- Results are bitwise reproducible on CPU for a given seed. On CUDA,
  ``index_add_`` accumulates with atomics, so centroids can differ in the last
  bits between runs.
- ``distributed=True`` (multi-process runs, :mod:`sourcefree.engine.distributed`): each
  rank passes its contiguous shard of the points, in rank order. The subsample
  is drawn from the global indices with the same generator, k-means++ runs on
  rank 0 over the gathered training points and is broadcast, and every Lloyd
  step all-reduces the per-cluster sums and counts, so the result equals one
  process on the concatenated points up to the rounding of the partial sums.
  Labels come back for the rank's own points; centroids, inertia and sizes are
  global. One process (or no process group) runs the ordinary path.
- :class:`ChunkedPoints` (points read a part at a time, e.g. from a feature bank)
  take the same path: the training points (the subsample, or every point without
  one) are gathered with ``take``, so the draws and the seeding are the same, and
  the final pass labels the points a chunk at a time (inertia summed per chunk in
  float64). Of the N x D values, only the training points are held at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from sourcefree.engine import distributed as _dist
from sourcefree.errors import ConfigError, InputError
from sourcefree.kernels import kmeans_assign

__all__ = [
    "ChunkedPoints",
    "ClusterPurity",
    "KMeansConfig",
    "KMeansResult",
    "all_finite",
    "cluster_purity",
    "contingency_table",
    "kmeans",
    "kmeans_plusplus",
    "member_labels_and_scores",
]

_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class KMeansConfig:
    """K-means settings. Defaults are scikit-learn 1.1.2's, which CluP's reference code used.

    Attributes:
        n_init: independent k-means++ runs; the one with the lowest inertia wins.
        max_iter: Lloyd iterations per run at most.
        tol: stop when the summed squared centroid shift is at most
            ``tol * mean(per-feature variance)`` of the training points.
        max_points_per_centroid: train on at most this many points per cluster
            (faiss's default 256), then label all points in one pass; None trains on all.
        seed: seed of the torch.Generator behind seeding and subsampling.
        chunk_size: rows per chunk in the assignment step (bounds memory at chunk x K).
    """

    n_init: int = 10
    max_iter: int = 300
    tol: float = 1e-4
    max_points_per_centroid: int | None = 256
    seed: int = 0
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        _check_positive_int("n_init", self.n_init)
        _check_positive_int("max_iter", self.max_iter)
        if self.max_points_per_centroid is not None:
            _check_positive_int("max_points_per_centroid", self.max_points_per_centroid)
        _check_positive_int("chunk_size", self.chunk_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(
                f"kmeans seed={self.seed!r} is not an integer",
                "the seed feeds a torch.Generator",
                "pass an int such as 0",
            )
        if not isinstance(self.tol, (int, float)) or not math.isfinite(self.tol) or self.tol < 0:
            raise ConfigError(
                f"kmeans tol={self.tol!r} is invalid",
                "the tolerance must be a finite number >= 0",
                "use the default 1e-4, or 0 to run exactly max_iter iterations",
            )


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes:
        centroids: (K, D), dtype and device of the input.
        labels: (N,) int64 cluster index of every input point.
        inertia: sum over all N points of the squared distance to their centroid.
        n_iter: Lloyd iterations run by the winning initialisation.
        converged: whether that run stopped on ``tol`` rather than ``max_iter``.
        cluster_sizes: (K,) int64 number of points per cluster.
        n_empty: clusters with no point (only when fewer distinct points than K).
        n_train: points the centroids were trained on (N unless subsampled).
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int
    converged: bool
    cluster_sizes: torch.Tensor
    n_empty: int
    n_train: int


@runtime_checkable
class ChunkedPoints(Protocol):
    """Points that :func:`kmeans` reads a part at a time instead of one (N, D) tensor.

    Rows are float32 on :attr:`device`, finite, in a fixed order (this rank's
    contiguous shard under ``distributed``).
    """

    @property
    def rows(self) -> int:
        """Number of points N."""

    @property
    def dim(self) -> int:
        """Width D of every point."""

    @property
    def device(self) -> torch.device:
        """Where the rows are returned."""

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """(len(index), D) rows at ``index``, ascending int64 CPU row numbers."""

    def chunks(self) -> Iterator[torch.Tensor]:
        """Every row in order, a bounded number at a time."""


Points = torch.Tensor | ChunkedPoints


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{name}={value!r} is invalid",
            f"{name} must be a positive integer",
            f"pass an int >= 1 for {name}",
        )
    return value


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite, reading it once without a boolean copy.

    A finite sum proves it (NaN and +-inf propagate through a sum); only when the
    sum is not finite, e.g. overflow of huge finite values, is every value checked.
    """
    if bool(torch.isfinite(x.sum()).item()):
        return True
    return bool(torch.isfinite(x).all().item())


def _mean_feature_variance(x: torch.Tensor) -> float:
    """mean_d Var(x[:, d]) = (||X||_F^2 / N - ||mean||^2) / D, without copying ``x``."""
    frob = float(torch.linalg.vector_norm(x).item()) ** 2
    return _variance_from_moments(x.sum(dim=0, dtype=torch.float64), frob, x.shape[0])


def _variance_from_moments(sums: torch.Tensor, frob_sq: float, n: int) -> float:
    """mean_d Var from the column sums (D,) float64 and ``||X||_F^2`` of ``n`` points."""
    mean = sums / n
    return max(frob_sq / n - float((mean * mean).sum().item()), 0.0) / int(sums.shape[0])


def _check_points(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"{name} is a {type(x).__name__}, not a torch.Tensor",
            "clustering runs on torch tensors",
            "convert it with torch.as_tensor(...)",
        )
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(
            f"{name} has shape {tuple(x.shape)}",
            "points must form a non-empty 2-D tensor (N, D)",
            "pass features as one row per sample",
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"{name} has dtype {x.dtype}",
            "K-means runs in float32 (or float64 for checks)",
            "convert with x.float()",
        )
    if not all_finite(x):
        raise InputError(
            f"{name} contains NaN or infinite values",
            "distances to such points are undefined",
            "drop or repair the rows that are not finite before clustering",
        )
    return x


def _points(x: object) -> Points:
    """``x`` checked: a tensor (:func:`_check_points`) or non-empty :class:`ChunkedPoints`."""
    if not isinstance(x, ChunkedPoints) or isinstance(x, torch.Tensor):
        return _check_points(x)
    if x.rows < 1 or x.dim < 1:
        raise InputError(
            f"x has shape {(x.rows, x.dim)}",
            "points must form a non-empty 2-D tensor (N, D)",
            "pass features as one row per sample",
        )
    return x


def _layout(x: Points) -> tuple[int, int, torch.dtype, torch.device]:
    """(N, D, dtype, device) of the points."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]), int(x.shape[1]), x.dtype, x.device
    return x.rows, x.dim, torch.float32, x.device


def _training_points(x: Points, pick: torch.Tensor | None) -> torch.Tensor:
    """The rows ``pick`` (CPU indices) of ``x``, or all of them when None, as one tensor."""
    if isinstance(x, torch.Tensor):
        return x if pick is None else x.index_select(0, pick.to(x.device))
    return _check_points(x.take(torch.arange(x.rows) if pick is None else pick))


def _assign_all(x: Points, centroids: torch.Tensor, chunk_size: int) -> _Assigned:
    """Labels of every point and their squared distances (per-chunk float64 sums of
    them for :class:`ChunkedPoints`: their total is the inertia)."""
    if isinstance(x, torch.Tensor):
        return kmeans_assign(x, centroids, chunk_size=chunk_size)
    labels, sums = [], []
    for rows in x.chunks():
        part, dist = kmeans_assign(rows, centroids, chunk_size=chunk_size)
        labels.append(part)
        sums.append(dist.sum(dtype=torch.float64))
    return torch.cat(labels), torch.stack(sums)


def _check_n_clusters(n_clusters: object, n_points: int) -> int:
    k = _check_positive_int("n_clusters", n_clusters)
    if k > n_points:
        raise ConfigError(
            f"n_clusters={k} is larger than the number of points ({n_points})",
            "K-means needs at least one point per cluster",
            f"use n_clusters <= {n_points}, or cluster more samples",
        )
    return k


def kmeans_plusplus(
    x: torch.Tensor,
    n_clusters: int,
    generator: torch.Generator,
    *,
    n_local_trials: int | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding: returns (K, D) centroids drawn from the rows of ``x``.

    Each new centre is sampled with probability proportional to the squared
    distance to the nearest centre so far (D^2 sampling); ``n_local_trials``
    candidates (default ``2 + floor(ln K)``) are drawn and the one that lowers
    the potential most is kept. Random numbers come from ``generator`` (a CPU
    generator), so the result does not depend on the device. If every point
    already sits on a centre (potential 0) candidates are drawn uniformly.
    """
    x = _check_points(x)
    n, d = x.shape
    k = _check_n_clusters(n_clusters, n)
    trials = 2 + int(math.log(k)) if n_local_trials is None else n_local_trials
    _check_positive_int("n_local_trials", trials)
    dev = x.device

    x_sq = (x * x).sum(dim=1)
    centers = torch.empty((k, d), dtype=x.dtype, device=dev)
    first = int(torch.randint(n, (1,), generator=generator).item())
    centers[0] = x[first]
    closest = (x_sq - 2.0 * (x @ x[first]) + x_sq[first]).clamp_min_(0)
    potential = float(closest.sum(dtype=torch.float64).item())
    for j in range(1, k):
        if potential > 0.0:
            u = torch.rand(trials, generator=generator, dtype=torch.float64).to(dev) * potential
            cumulative = closest.to(torch.float64).cumsum(0)
            cand = torch.searchsorted(cumulative, u, right=True).clamp_max_(n - 1)
        else:
            cand = torch.randint(n, (trials,), generator=generator).to(dev)
        # Squared distances of every point to every candidate: one (N, trials) GEMM.
        d_cand = torch.addmm(x_sq[cand].unsqueeze(0), x, x[cand].t(), beta=1.0, alpha=-2.0)
        d_cand.add_(x_sq.unsqueeze(1)).clamp_min_(0)
        torch.minimum(d_cand, closest.unsqueeze(1), out=d_cand)
        pots = d_cand.sum(dim=0, dtype=torch.float64)
        best = int(torch.argmin(pots).item())
        centers[j] = x[cand[best]]
        closest = d_cand[:, best].contiguous()
        potential = float(pots[best].item())
    return centers


def _repair_empty(
    x: torch.Tensor,
    old_c: torch.Tensor,
    new_c: torch.Tensor,
    empty: torch.Tensor,
    dist: torch.Tensor,
) -> None:
    """Move empty clusters onto the points farthest from their centroid, in place.

    Farthest first, ties to the lower point index (stable sort). Only points with
    a positive distance are used; clusters left over keep their old centroid.
    """
    empty_idx = torch.nonzero(empty).flatten()
    order = torch.sort(dist, descending=True, stable=True).indices
    n_far = int((dist > 0).sum().item())
    m = min(int(empty_idx.numel()), n_far)
    new_c[empty_idx] = old_c[empty_idx]
    if m > 0:
        new_c[empty_idx[:m]] = x[order[:m]]


def kmeans(
    x: torch.Tensor | ChunkedPoints,
    n_clusters: int,
    config: KMeansConfig | None = None,
    *,
    init: torch.Tensor | None = None,
    distributed: bool = False,
) -> KMeansResult:
    """Cluster the rows of ``x`` (N, D) into ``n_clusters`` groups by Lloyd's K-means.

    Args:
        x: float32 (or float64) points on CPU or CUDA, or :class:`ChunkedPoints`
            (trained on the gathered training points, labelled a chunk at a time).
        n_clusters: K, with 1 <= K <= N.
        config: see :class:`KMeansConfig`; defaults follow CluP's reference (sklearn 1.1.2).
        init: optional (K, D) initial centroids (then ``config.n_init`` must be 1);
            otherwise greedy k-means++ on the training points.
        distributed: ``x`` is this rank's contiguous shard of the points (shards in
            rank order); sums and counts are all-reduced. No effect without a
            multi-process group.

    Returns:
        A :class:`KMeansResult`; labels and inertia cover all N points (with
        ``distributed``: labels of this rank's points, global inertia and sizes).
    """
    cfg = KMeansConfig() if config is None else config
    if distributed and _dist.is_distributed():
        return _kmeans_sharded(_points(x), n_clusters, cfg, init)
    x = _points(x)
    n = _layout(x)[0]
    k = _check_n_clusters(n_clusters, n)
    if init is not None:
        init = _check_init(init, cfg, k, x)
    generator = torch.Generator().manual_seed(cfg.seed)
    n_train, pick = _subsample(n, k, cfg, generator)
    # faiss-style: train on a random subsample, then one pass labels every point.
    xt = _training_points(x, pick)
    tol_abs = cfg.tol * _mean_feature_variance(xt) if cfg.tol > 0 else 0.0

    def seeds(_run: int) -> torch.Tensor:
        return init if init is not None else kmeans_plusplus(xt, k, generator)

    best = _best_run(xt, k, cfg, tol_abs, seeds, sharded=False)
    return _result(x, best, cfg, k=k, n_train=n_train, n=n, sharded=False)


def _check_init(init: torch.Tensor, cfg: KMeansConfig, k: int, x: Points) -> torch.Tensor:
    if cfg.n_init != 1:
        raise ConfigError(
            f"explicit initial centroids were given with n_init={cfg.n_init}",
            "every run would start from the same centroids",
            "pass KMeansConfig(n_init=1) with init=..., or drop init",
        )
    init = _check_points(init, "init")
    _, d, dtype, device = _layout(x)
    if tuple(init.shape) != (k, d) or init.dtype != dtype or init.device != device:
        raise InputError(
            f"init has shape {tuple(init.shape)}, {init.dtype} on {init.device}",
            f"it must be ({k}, {d}), {dtype} on {device} like the points",
            "pass one initial centroid per cluster in the points' dtype and device",
        )
    return init


def _subsample(
    n: int, k: int, cfg: KMeansConfig, generator: torch.Generator
) -> tuple[int, torch.Tensor | None]:
    """(n_train, sorted CPU indices of the training points among all N, or None for all).

    At most ``max_points_per_centroid * K`` points, drawn by one ``randperm`` of the
    global indices, so one process and every rank of a sharded run pick the same ones.
    """
    if cfg.max_points_per_centroid is None or cfg.max_points_per_centroid * k >= n:
        return n, None
    n_train = cfg.max_points_per_centroid * k
    return n_train, torch.randperm(n, generator=generator)[:n_train].sort().values


def _inertia(dist: torch.Tensor, *, sharded: bool) -> float:
    """Sum of squared distances in float64; all-reduced over the ranks when ``sharded``."""
    total = dist.sum(dtype=torch.float64)
    if sharded:
        total = _dist.all_reduce_sum(total.reshape(1).cpu())
    return float(total.item())


# One Lloyd run: (inertia, centroids, n_iter, converged, labels of the training points).
_Run = tuple[float, torch.Tensor, int, bool, torch.Tensor]
# Labels and squared distances (or sums of them) of an assignment pass.
_Assigned = tuple[torch.Tensor, torch.Tensor]


def _best_run(
    xt: torch.Tensor,
    k: int,
    cfg: KMeansConfig,
    tol_abs: float,
    seeds: Callable[[int], torch.Tensor],
    *,
    sharded: bool,
) -> _Run:
    """``cfg.n_init`` Lloyd runs from ``seeds(run)``; the lowest inertia wins (an equal one
    keeps the earlier run). Labels are those of the training points ``xt``."""
    runs: list[_Run] = []
    for run in range(cfg.n_init):
        c, n_iter, converged = _lloyd(
            xt, seeds(run), cfg.max_iter, tol_abs, cfg.chunk_size, sharded=sharded
        )
        labels, dist = kmeans_assign(xt, c, chunk_size=cfg.chunk_size)
        inertia = _inertia(dist, sharded=sharded)
        if not runs or inertia < runs[0][0]:
            runs = [(inertia, c, n_iter, converged, labels)]
    return runs[0]  # KMeansConfig makes n_init >= 1


def _result(
    x: Points, best: _Run, cfg: KMeansConfig, *, k: int, n_train: int, n: int, sharded: bool
) -> KMeansResult:
    """Assemble the :class:`KMeansResult` from the winning run; when it trained on a
    subsample (``n_train < n``, global counts when ``sharded``) one pass labels all of ``x``."""
    inertia, centroids, n_iter, converged, labels = best
    if n_train < n:
        labels, full_dist = _assign_all(x, centroids, cfg.chunk_size)
        inertia = _inertia(full_dist, sharded=sharded)
    sizes = torch.bincount(labels, minlength=k)
    if sharded:
        sizes = _dist.all_reduce_sum(sizes)
    return KMeansResult(
        centroids=centroids,
        labels=labels,
        inertia=inertia,
        n_iter=n_iter,
        converged=converged,
        cluster_sizes=sizes,
        n_empty=int((sizes == 0).sum().item()),
        n_train=n_train,
    )


def _kmeans_sharded(
    x: Points, n_clusters: int, cfg: KMeansConfig, init: torch.Tensor | None
) -> KMeansResult:
    """:func:`kmeans` over contiguous shards in rank order (see the module docstring)."""
    n_local, d, dtype, device = _layout(x)
    sizes = _dist.shard_sizes(n_local)
    if len(set(_dist.shard_sizes(d))) != 1:
        raise InputError(
            f"the ranks hold points of different widths ({d} here)",
            "every shard must have the same feature size",
            "pass features from the same model on every rank",
        )
    offset = sum(sizes[: _dist.rank()])
    n = sum(sizes)
    k = _check_n_clusters(n_clusters, n)
    if init is not None:
        init = _check_init(init, cfg, k, x)
        _dist.broadcast(init)
    generator = torch.Generator().manual_seed(cfg.seed)
    n_train, pick = _subsample(n, k, cfg, generator)
    mine = None
    if pick is not None:  # the same global subsample as one process; each rank keeps its own
        mine = pick[(pick >= offset) & (pick < offset + n_local)] - offset
    xt = _training_points(x, mine)
    # Global mean feature variance from all-reduced sums (float64).
    frob = torch.linalg.vector_norm(xt, dtype=torch.float64) ** 2
    moments = torch.cat([xt.sum(dim=0, dtype=torch.float64), frob.reshape(1)]).cpu()
    _dist.all_reduce_sum(moments)
    variance = _variance_from_moments(moments[:d], float(moments[d]), n_train)
    tol_abs = cfg.tol * variance if cfg.tol > 0 else 0.0
    gathered: list[torch.Tensor | None] = []

    def seeds(run: int) -> torch.Tensor:
        if init is not None:
            return init
        if run == 0:  # rank 0 gets every training point; the others get None
            gathered.append(_dist.gather_cat_to_main(xt))
        start = torch.empty((k, d), dtype=dtype, device=device)
        if gathered[0] is not None:  # rank 0 seeds, exactly as one process would
            start.copy_(kmeans_plusplus(gathered[0], k, generator))
        return _dist.broadcast(start)

    best = _best_run(xt, k, cfg, tol_abs, seeds, sharded=True)
    return _result(x, best, cfg, k=k, n_train=n_train, n=n, sharded=True)


def _lloyd(
    x: torch.Tensor,
    centroids: torch.Tensor,
    max_iter: int,
    tol_abs: float,
    chunk_size: int,
    *,
    sharded: bool = False,
) -> tuple[torch.Tensor, int, bool]:
    """Lloyd iterations from ``centroids``; returns (centroids, n_iter, converged).

    ``sharded``: ``x`` is this rank's shard; per-cluster sums and counts are
    all-reduced (identical centroids on every rank) and empty clusters are repaired
    from the farthest points of all ranks, in global order (exact gathers).
    """
    k, d = centroids.shape
    c = centroids.clone()
    sums = torch.empty((k, d), dtype=x.dtype, device=x.device)
    n_iter = 0
    converged = False
    for _ in range(max_iter):
        labels, dist = kmeans_assign(x, c, chunk_size=chunk_size)
        counts = torch.bincount(labels, minlength=k)
        sums.zero_().index_add_(0, labels, x)
        if sharded:
            _dist.all_reduce_sum(counts)
            _dist.all_reduce_sum(sums)
        new_c = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if bool(empty.any()):
            if sharded:
                _repair_empty(_dist.all_gather_cat(x), c, new_c, empty, _dist.all_gather_cat(dist))
            else:
                _repair_empty(x, c, new_c, empty, dist)
        shift = float(((new_c - c) ** 2).sum(dtype=torch.float64).item())
        c = new_c
        n_iter += 1
        if shift <= tol_abs:
            converged = True
            break
    return c, n_iter, converged


@dataclass(frozen=True, eq=False)
class ClusterPurity:
    """Per-cluster majority label and purity (CluP eq. 1).

    Attributes:
        table: (K, C) int64 contingency table, ``table[j, c] = |{i in C_j : y_i = c}|``.
        sizes: (K,) int64 cluster sizes ``m_j``.
        labels: (K,) int64 majority class (ties to the lowest class index), -1 if empty.
        purity: (K,) float32 ``max_c table[j, c] / m_j`` in [1/C, 1]; 0 for empty clusters.
    """

    table: torch.Tensor
    sizes: torch.Tensor
    labels: torch.Tensor
    purity: torch.Tensor

    @property
    def nonempty(self) -> torch.Tensor:
        """(K,) bool mask of clusters with at least one member."""
        return self.sizes > 0


def _check_index_vector(v: object, name: str, upper: int, n: int | None = None) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.dtype != torch.int64:
        desc = (
            f"a {v.dtype} tensor of shape {tuple(v.shape)}"
            if isinstance(v, torch.Tensor)
            else type(v).__name__
        )
        raise InputError(
            f"{name} is {desc}",
            "it must be a 1-D int64 tensor",
            f"convert with torch.as_tensor({name}, dtype=torch.int64).flatten()",
        )
    if n is not None and v.shape[0] != n:
        raise InputError(
            f"{name} has {v.shape[0]} entries but the cluster labels have {n}",
            "both describe the same samples",
            "pass one entry per sample, in the same order",
        )
    if v.numel() and (int(v.min().item()) < 0 or int(v.max().item()) >= upper):
        raise InputError(
            f"{name} holds values outside [0, {upper})",
            "they index a table of that size",
            f"check that {name} and the declared count match",
        )
    return v


def contingency_table(
    cluster_labels: torch.Tensor,
    class_labels: torch.Tensor,
    n_clusters: int,
    n_classes: int,
) -> torch.Tensor:
    """(K, C) int64 counts of each class in each cluster, by one ``bincount``."""
    _check_positive_int("n_clusters", n_clusters)
    _check_positive_int("n_classes", n_classes)
    cl = _check_index_vector(cluster_labels, "cluster_labels", n_clusters)
    y = _check_index_vector(class_labels, "class_labels", n_classes, cl.shape[0])
    flat = torch.bincount(cl * n_classes + y.to(cl.device), minlength=n_clusters * n_classes)
    return flat.view(n_clusters, n_classes)


def cluster_purity(
    cluster_labels: torch.Tensor,
    class_labels: torch.Tensor,
    n_clusters: int,
    n_classes: int,
    *,
    distributed: bool = False,
) -> ClusterPurity:
    """Majority label and purity of every cluster (CluP eq. 1), without a loop over clusters.

    Args:
        cluster_labels: (N,) int64 cluster of each sample, in [0, K).
        class_labels: (N,) int64 source prediction of each sample, in [0, C).
        n_clusters: K (clusters may be empty).
        n_classes: C.
        distributed: the labels are this rank's samples; the contingency table is
            all-reduced, so every rank gets the global purity (no-op for one process).
    """
    table = contingency_table(cluster_labels, class_labels, n_clusters, n_classes)
    if distributed:
        _dist.all_reduce_sum(table)
    sizes = table.sum(dim=1)
    # argmax returns the first maximum: ties go to the lowest class index. (argmax + gather,
    # not max(dim=1): the latter is ~100x slower on a K x 7 int64 table with 2 CPU threads.)
    labels = table.argmax(dim=1)
    top = table.gather(1, labels.unsqueeze(1)).squeeze(1)
    nonempty = sizes > 0
    purity = torch.where(
        nonempty,
        top.to(torch.float32) / sizes.clamp_min(1).to(torch.float32),
        torch.zeros((), dtype=torch.float32, device=table.device),
    )
    labels = torch.where(nonempty, labels, torch.full_like(labels, -1))
    return ClusterPurity(table=table, sizes=sizes, labels=labels, purity=purity)


def member_labels_and_scores(
    cluster_labels: torch.Tensor, purity: ClusterPurity
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample inherits its cluster's label and purity: (N,) int64 labels, (N,) float32 scores.

    A sample's cluster is never empty, so no label is -1.
    """
    k = int(purity.labels.shape[0])
    cl = _check_index_vector(cluster_labels, "cluster_labels", k)
    cl = cl.to(purity.labels.device)
    return purity.labels[cl], purity.purity[cl]
