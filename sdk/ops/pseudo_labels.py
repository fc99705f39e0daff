"""Pseudo-label selection for source-free adaptation (CluP's cluster-level labels first).

CluP (Conti et al., BMVC 2022, Sec. 3.1) labels the unlabeled target set from
the frozen source model:

1. features of the source model get a constant 1 appended and are
   L2-normalised (the SHOT trick, also in CluP's reference code);
2. K-means over-clusters them (K >> C);
3. every cluster takes the majority source prediction as its label and its
   purity (eq. 1) as its score; every member inherits both;
4. per class, a selection rule (``selection``) keeps the reliable part:

   - ``"samples"`` (default; the reference code's ``topk``): the top
     ``ceil(q * n_c)`` members of the class by score, ``q = 1 - Q``;
   - ``"clusters"`` (the paper's text, Sec. 3.1): the Q-th percentile of the
     purities of the clusters that vote for the class is its threshold
     ``tau_n``; the clusters at or above it are kept whole
     (:func:`select_clusters_per_class`).

``score="confidence"`` is the ablation of the paper's Table 4 and of the
reference code's ``normal`` mode: label = source argmax, score = source
softmax maximum, same per-class selection, no clustering.

:func:`cluster_pseudo_labels_chunked` runs the same over a
:class:`~sourcefree.engine.feature_bank.FeatureBank` (features over the memory
budget): K-means gathers only its training rows, and the rest reads the bank a
chunk at a time.

Target labels never enter here; :func:`selection_quality` measures a selection
against labels for reporting only. SHOT-style centroid labelling can be added
beside :func:`cluster_pseudo_labels`, reusing :func:`select_top_fraction_per_class`.

Decisions (tested in tests/test_pseudo_labels.py and tests/test_pseudo_label_rules.py):

- **Ranking.** Within a class, samples are ranked by score (descending), then
  by source confidence (descending), then by index (ascending). All members of
  a cluster share one purity, so the cut often falls inside a cluster; the
  reference's ``topk`` breaks those ties arbitrarily, here they are broken
  deterministically in favour of the members the source model is surest of.
- **Quota.** A class with n_c members keeps ``ceil(q * n_c)`` of them, computed
  exactly for decimal q (0.1 * 30 keeps 3, not 4). The reference uses
  ``floor``, which silently drops every class with fewer than 1/q members; CluP
  over-clusters precisely so that minor classes survive, so a present class
  keeps at least one sample here.
- **A class that wins no cluster** gets zero samples (there is nothing to
  select) and is listed in :attr:`PseudoLabelSelection.empty_classes`; no error.
- **Empty clusters** have no members and therefore no effect; they are counted
  in the diagnostics.
- **N < K.** An explicit ``n_clusters`` larger than N is a ConfigError; the
  automatic K (:func:`default_n_clusters`) never exceeds N.
- **Cluster rule.** ``tau_n`` is the linearly interpolated Q-th percentile of
  the class's non-empty cluster purities (numpy's and ``torch.quantile``'s
  default), with Q = 1 - q taken exactly for decimal q. Clusters *at or above*
  ``tau_n`` are kept: the paper writes "higher than", but a strict comparison
  drops every class whose best clusters tie at the percentile (a class won by
  one cluster always, and most classes whose top clusters are all pure), and
  ``q = 1`` would not keep everything. ``score="confidence"`` has no clusters:
  ``selection="clusters"`` with it is a ConfigError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch

from sourcefree.data.metrics import pseudo_label_counts
from sourcefree.engine import distributed as _dist
from sourcefree.engine.feature_bank import FeatureBank
from sourcefree.errors import ConfigError, InputError
from sourcefree.ops.clustering import (
    ChunkedPoints,
    KMeansConfig,
    all_finite,
    cluster_purity,
    kmeans,
    member_labels_and_scores,
)

__all__ = [
    "CentroidPseudoLabels",
    "ClusterPseudoLabelConfig",
    "PseudoLabelDiagnostics",
    "PseudoLabelSelection",
    "ScoreHistogram",
    "SelectionQuality",
    "centroid_pseudo_labels",
    "centroid_pseudo_labels_chunked",
    "cluster_pseudo_labels",
    "cluster_pseudo_labels_chunked",
    "default_n_clusters",
    "prepare_features",
    "select_clusters_per_class",
    "select_top_fraction_per_class",
    "selection_quality",
]

Score = Literal["purity", "confidence"]
Selection = Literal["samples", "clusters"]

#: Tolerance on probability rows: they must sum to 1 within this.
_PROB_SUM_TOL = 1e-3
#: Histogram bins over [0, 1].
_N_BINS = 10


def default_n_clusters(n_samples: int, n_classes: int) -> int:
    """K for over-clustering N samples of C classes when the user does not set it.

    ``K = min(max(N // 30, 10 * C), 1000, max(1, N // 5))``:

    - about 30 members per cluster on average, so purity resolves ~3 % steps and a
      class holding 5 % of the data still spans several clusters;
    - at least 10 clusters per class (over-clustering, K >> C, Sec. 3.1);
    - at most 1000, the paper's largest value (K = 250 / 1000 for 28k-92k images);
    - at least 5 members per cluster on average for tiny data, so purity means
      something, and never more clusters than samples.

    2000 images, 7 classes: K = 70; 28,709 (FER2013 train): 956; 90,000: 1000.
    """
    n = int(n_samples)
    c = int(n_classes)
    if n < 1 or c < 1:
        raise ConfigError(
            f"cannot choose K for {n} samples and {c} classes",
            "both must be at least 1",
            "pass a non-empty target set and the source model's class count",
        )
    return min(max(n // 30, 10 * c), 1000, max(1, n // 5))


@dataclass(frozen=True)
class ClusterPseudoLabelConfig:
    """CluP pseudo-labelling settings (paper Sec. 3.1 and 4; reference code defaults).

    Attributes:
        n_clusters: K for K-means; None picks :func:`default_n_clusters` (paper: 250/1000).
        keep_fraction: q = 1 - Q, fraction of each class kept. The paper's Q is
            0.9 for AFE->ExpW and AFE->FER2013 (0.7, 0.8 for RAF-DB); the reference's
            default is 0.1. Use 0.2-0.3 for milder shifts.
        score: "purity" (CluP) or "confidence" (source max-probability ablation, Table 4).
        kmeans: K-means settings (n_init=10, max_iter=300 as in sklearn 1.1.2 used by CluP).
        selection: "samples" keeps the top ``ceil(q n_c)`` members of each class (the
            reference code's ``topk``); "clusters" keeps the clusters at or above the
            Q-th percentile of the class's cluster purities (the paper's Sec. 3.1).
    """

    n_clusters: int | None = None
    keep_fraction: float = 0.1
    score: Score = "purity"
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    selection: Selection = "samples"

    def __post_init__(self) -> None:
        k = self.n_clusters
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(
                f"n_clusters={k!r} is invalid",
                "K must be a positive integer",
                "pass an int >= 1, or None to scale K with the data size",
            )
        _check_fraction(self.keep_fraction)
        if self.score not in ("purity", "confidence"):
            raise ConfigError(
                f"score={self.score!r} is unknown",
                "CluP ranks samples by cluster purity or by source confidence",
                "use score='purity' or score='confidence'",
            )
        if not isinstance(self.kmeans, KMeansConfig):
            raise ConfigError(
                f"kmeans={self.kmeans!r} is not a KMeansConfig",
                "the K-means settings are a KMeansConfig",
                "pass kmeans=KMeansConfig(...)",
            )
        if self.selection not in ("samples", "clusters"):
            raise ConfigError(
                f"selection={self.selection!r} is unknown",
                "CluP keeps the top samples of each class or whole clusters",
                "use selection='samples' or selection='clusters'",
            )
        if self.selection == "clusters" and self.score != "purity":
            raise ConfigError(
                "selection='clusters' with score='confidence'",
                "the confidence ablation does not cluster, so there are no clusters to keep",
                "use selection='samples' with score='confidence'",
            )


def _check_fraction(q: object) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0.0 < q <= 1.0):
        raise ConfigError(
            f"keep_fraction={q!r} is invalid",
            "it is the fraction of each class kept (q = 1 - Q), in (0, 1]",
            "use a value such as 0.1 (the paper's Q = 0.9)",
        )
    return float(q)


@dataclass(frozen=True)
class ScoreHistogram:
    """Aggregate histogram of the selection scores over ``bin_edges`` (10 bins on [0, 1]).

    Attributes:
        kind: "purity" or "confidence".
        bin_edges: 11 edges; the last bin includes 1.0.
        sample_counts: samples per bin, by their score.
        cluster_counts: non-empty clusters per bin by purity ("purity" only, else None).
    """

    kind: Score
    bin_edges: tuple[float, ...]
    sample_counts: tuple[int, ...]
    cluster_counts: tuple[int, ...] | None


@dataclass(frozen=True)
class PseudoLabelDiagnostics:
    """Aggregates describing one pseudo-labelling run (no per-sample data).

    Attributes:
        score: the ranking score used.
        keep_fraction: q.
        n_samples: N.
        n_selected: samples kept.
        n_clusters: K (0 in confidence mode, which does not cluster).
        n_empty_clusters: clusters without members.
        clusters_per_class: (C,) clusters whose majority is each class.
        kmeans_inertia: K-means objective on the normalised features (nan without K-means).
        kmeans_iterations: Lloyd iterations of the kept initialisation.
        kmeans_converged: whether K-means stopped on its tolerance.
        mean_cluster_purity: size-weighted mean purity, i.e. the fraction of samples
            whose source prediction agrees with their cluster (nan without K-means).
        selected_agreement: fraction of selected samples whose source prediction equals
            their pseudo-label (1.0 in confidence mode; nan when nothing is selected).
        selection: the selection rule ("samples" or "clusters").
        clusters_kept: clusters kept whole ("clusters" rule; 0 otherwise).
    """

    score: Score
    keep_fraction: float
    n_samples: int
    n_selected: int
    n_clusters: int
    n_empty_clusters: int
    clusters_per_class: tuple[int, ...]
    kmeans_inertia: float
    kmeans_iterations: int
    kmeans_converged: bool
    mean_cluster_purity: float
    selected_agreement: float
    selection: Selection = "samples"
    clusters_kept: int = 0


@dataclass(frozen=True, eq=False)
class PseudoLabelSelection:
    """The selected subset D~ and its pseudo-labels (input of CluP's eq. 4).

    Attributes:
        indices: (M,) int64 selected sample indices, ascending.
        labels: (M,) int64 pseudo-label of each selected sample.
        scores: (M,) float32 its score (cluster purity or source confidence).
        n_samples: N, the size of the target set.
        n_classes: C.
        candidates_per_class: (C,) samples carrying each pseudo-label before selection.
        selected_per_class: (C,) samples kept per class.
        thresholds: (C,) lowest kept score per class, None where none is kept (with
            ``selection="clusters"`` the lowest kept cluster purity, >= ``tau_n``).
        empty_classes: classes with zero selected samples.
        histogram: aggregate score histogram for reports.
        diagnostics: aggregate run description.
    """

    indices: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    n_samples: int
    n_classes: int
    candidates_per_class: tuple[int, ...]
    selected_per_class: tuple[int, ...]
    thresholds: tuple[float | None, ...]
    empty_classes: tuple[int, ...]
    histogram: ScoreHistogram
    diagnostics: PseudoLabelDiagnostics


def prepare_features(features: torch.Tensor) -> torch.Tensor:
    """Append a constant 1 to every feature row and L2-normalise it (float32).

    The appended 1 keeps every norm >= 1, so no row divides by zero.
    """
    f = _check_matrix(features, "features")
    f = f.to(torch.float32)
    ones = torch.ones((f.shape[0], 1), dtype=f.dtype, device=f.device)
    z = torch.cat((f, ones), dim=1)
    unit: torch.Tensor = z / z.norm(dim=1, keepdim=True)
    return unit


def _check_matrix(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(
            f"{name} is a {type(t).__name__}, not a torch.Tensor",
            "pseudo-labelling runs on torch tensors",
            "convert it with torch.as_tensor(...)",
        )
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(
            f"{name} has shape {tuple(t.shape)}",
            f"{name} must be a non-empty 2-D tensor with one row per target sample",
            "pass an (N, D) tensor with N >= 1",
        )
    if not t.is_floating_point():
        raise InputError(
            f"{name} has dtype {t.dtype}",
            "it must hold floating-point values",
            f"convert with {name}.float()",
        )
    if not all_finite(t):
        raise InputError(
            f"{name} contains NaN or infinite values",
            "scores and distances of such rows are undefined",
            "check the source model's outputs for these samples",
        )
    return t


def _check_probabilities(p: object, n: int) -> torch.Tensor:
    probs = _check_matrix(p, "probabilities")
    if probs.shape[0] != n:
        raise InputError(
            f"probabilities has {probs.shape[0]} rows but features has {n}",
            "both describe the same target samples",
            "pass one row of each per sample, in the same order",
        )
    row_sum = probs.to(torch.float64).sum(dim=1)
    if float(probs.min().item()) < 0.0 or float((row_sum - 1.0).abs().max().item()) > _PROB_SUM_TOL:
        raise InputError(
            "probabilities rows are not probability distributions",
            "every row must be >= 0 and sum to 1 (these look like logits)",
            "apply torch.softmax(logits, dim=1) first",
        )
    return probs


def select_top_fraction_per_class(
    labels: torch.Tensor,
    scores: torch.Tensor,
    tiebreak: torch.Tensor,
    n_classes: int,
    keep_fraction: float,
) -> torch.Tensor:
    """Per-class Q-percentile selection: keep the top ``ceil(q * n_c)`` samples of each class.

    Ranking inside a class: ``scores`` descending, then ``tiebreak`` descending,
    then sample index ascending. Classes are processed together by stable sorts
    (no Python loop over classes or samples).

    Args:
        labels: (N,) int64 pseudo-labels in [0, C).
        scores: (N,) ranking score (purity or confidence).
        tiebreak: (N,) secondary key (the source confidence).
        n_classes: C.
        keep_fraction: q in (0, 1].

    Returns:
        (M,) int64 indices of the kept samples, ascending.
    """
    q = Fraction(_check_fraction(keep_fraction)).limit_denominator(1_000_000)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        raise InputError(
            "labels is not a 1-D int64 tensor",
            "it holds one class index per sample",
            "convert with torch.as_tensor(labels, dtype=torch.int64)",
        )
    n = int(labels.shape[0])
    if n and (int(labels.min().item()) < 0 or int(labels.max().item()) >= n_classes):
        raise InputError(
            f"labels hold values outside [0, {n_classes})",
            "every selected sample needs a valid class",
            "drop unlabeled samples (e.g. -1) before selecting",
        )
    if tuple(scores.shape) != (n,) or tuple(tiebreak.shape) != (n,):
        raise InputError(
            f"labels, scores and tiebreak have shapes {tuple(labels.shape)}, "
            f"{tuple(scores.shape)}, {tuple(tiebreak.shape)}",
            "they describe the same samples",
            "pass three 1-D tensors of equal length",
        )
    dev = labels.device
    order = torch.arange(n, device=dev)
    # Least significant key first; every sort is stable, so earlier keys break ties.
    for key, descending in ((tiebreak, True), (scores, True), (labels, False)):
        perm = torch.sort(key[order], descending=descending, stable=True).indices
        order = order[perm]
    counts = torch.bincount(labels, minlength=n_classes)
    quota = (counts * q.numerator + (q.denominator - 1)) // q.denominator  # exact ceil
    starts = torch.cumsum(counts, 0) - counts
    sorted_labels = labels[order]
    rank = torch.arange(n, device=dev) - starts[sorted_labels]
    keep = rank < quota[sorted_labels]
    kept: torch.Tensor = order[keep]
    return torch.sort(kept).values


def select_clusters_per_class(
    cluster_labels: torch.Tensor,
    purity: torch.Tensor,
    n_classes: int,
    keep_fraction: float,
) -> tuple[torch.Tensor, tuple[float | None, ...]]:
    """The paper's rule (Sec. 3.1): per class, keep the clusters at or above ``tau_n``.

    ``tau_n`` is the Q-th percentile (``Q = 1 - keep_fraction``, linear interpolation
    as ``numpy.percentile``) of the purities of the non-empty clusters whose majority
    label is ``n``. Kept clusters enter whole; no Python loop over classes or clusters.

    Args:
        cluster_labels: (K,) int64 majority class of each cluster, -1 for an empty one.
        purity: (K,) purity of each cluster (eq. 1).
        n_classes: C.
        keep_fraction: q in (0, 1].

    Returns:
        ((K,) bool mask of the kept clusters, (C,) ``tau_n`` per class, None for a
        class that wins no cluster).
    """
    q = Fraction(_check_fraction(keep_fraction)).limit_denominator(1_000_000)
    big_q = 1 - q
    labels = cluster_labels
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        raise InputError(
            "cluster_labels is not a 1-D int64 tensor",
            "it holds one majority class per cluster (-1 for an empty cluster)",
            "pass ClusterPurity.labels",
        )
    if not isinstance(purity, torch.Tensor) or tuple(purity.shape) != tuple(labels.shape):
        raise InputError(
            "purity does not match cluster_labels",
            "both hold one value per cluster",
            "pass ClusterPurity.purity and ClusterPurity.labels",
        )
    k = int(labels.shape[0])
    if k and (int(labels.min().item()) < -1 or int(labels.max().item()) >= n_classes):
        raise InputError(
            f"cluster_labels hold values outside [-1, {n_classes})",
            "every non-empty cluster votes for one of the C classes",
            "pass ClusterPurity.labels of the same class count",
        )
    mask = torch.zeros(k, dtype=torch.bool, device=labels.device)
    idx = torch.nonzero(labels >= 0).flatten()
    if idx.numel() == 0:
        return mask, (None,) * n_classes
    lab = labels[idx]
    pur = purity[idx].to(torch.float64)
    # Class ascending, purity ascending inside a class (stable sorts, minor key first).
    order = torch.sort(pur, stable=True).indices
    order = order[torch.sort(lab[order], stable=True).indices]
    sorted_pur = pur[order]
    counts = torch.bincount(lab, minlength=n_classes)
    starts = torch.cumsum(counts, 0) - counts
    last = (counts - 1).clamp_min(0)
    # The percentile's position (m - 1) Q = lo + rem / den, computed exactly.
    num = last * big_q.numerator
    lo = num // big_q.denominator
    rem = num % big_q.denominator
    hi = torch.minimum(lo + 1, last)
    top = sorted_pur.shape[0] - 1
    below = sorted_pur[(starts + lo).clamp_max(top)]
    above = sorted_pur[(starts + hi).clamp_max(top)]
    tau = below + (rem.to(torch.float64) / big_q.denominator) * (above - below)
    # Between two consecutive sorted purities no purity lies strictly inside, so
    # ``s >= tau`` is exactly ``s >= below`` on the knot and ``s >= above`` past it.
    cut = torch.where(rem == 0, below, above)
    mask[idx] = pur >= cut[lab]
    sizes = counts.tolist()
    thresholds = tuple(float(t) if sizes[i] else None for i, t in enumerate(tau.tolist()))
    return mask, thresholds


def _histogram(values: torch.Tensor) -> tuple[int, ...]:
    v = values.to(torch.float32).cpu()
    bins = (v * _N_BINS).floor().clamp(0, _N_BINS - 1).to(torch.int64)
    return tuple(int(c) for c in torch.bincount(bins, minlength=_N_BINS).tolist())


def _n_clusters(cfg: ClusterPseudoLabelConfig, n: int, c: int) -> int:
    """K of a run: the config's, or :func:`default_n_clusters`; never more than N."""
    k = default_n_clusters(n, c) if cfg.n_clusters is None else cfg.n_clusters
    if k > n:
        raise ConfigError(
            f"n_clusters={k} is larger than the number of target samples ({n})",
            "every cluster needs at least one sample",
            "lower n_clusters, or set it to None to scale K with the data size",
        )
    return k


def _members_of(kept_clusters: torch.Tensor, members: torch.Tensor, sharded: bool) -> torch.Tensor:
    """Ascending indices of the samples whose cluster is kept (all ranks' samples if sharded)."""
    if sharded:
        members = _dist.all_gather_cat(members)
    return torch.nonzero(kept_clusters[members.to(kept_clusters.device)]).flatten()


def _lowest_kept(
    sel_labels: torch.Tensor, sel_scores: torch.Tensor, selected: torch.Tensor
) -> tuple[float | None, ...]:
    """Lowest kept score per class (scatter-min over the selected samples); None if none."""
    c = int(selected.shape[0])
    lowest = torch.full((c,), math.inf, dtype=torch.float32, device=sel_scores.device)
    lowest.scatter_reduce_(0, sel_labels, sel_scores, reduce="amin")
    return tuple(
        None if int(s) == 0 else float(t)
        for s, t in zip(selected.tolist(), lowest.tolist(), strict=True)
    )


def _sharded(distributed: bool) -> bool:
    if not distributed:
        return False
    return _dist.is_distributed()


def cluster_pseudo_labels(
    features: torch.Tensor,
    probabilities: torch.Tensor,
    config: ClusterPseudoLabelConfig | None = None,
    *,
    distributed: bool = False,
) -> PseudoLabelSelection:
    """CluP cluster-level pseudo-labels (Sec. 3.1): cluster, vote, score by purity, select.

    Args:
        features: (N, D) source-model features of the un-augmented target images.
        probabilities: (N, C) source softmax outputs (rows sum to 1).
        config: see :class:`ClusterPseudoLabelConfig`.
        distributed: both are this rank's contiguous shard of the samples, in rank
            order (:mod:`sourcefree.engine.distributed`): K-means and the purity table are
            all-reduced, the per-sample labels and scores (N numbers each) gathered,
            and every rank returns the same selection in global sample indices.
            No effect without a multi-process group.

    Returns:
        The selected subset with its labels, per-class counts and aggregates.
    """
    cfg = ClusterPseudoLabelConfig() if config is None else config
    feats = _check_matrix(features, "features")
    probs = _check_probabilities(probabilities, int(feats.shape[0])).to(feats.device)
    return _cluster_and_select(lambda: prepare_features(feats), probs, cfg, _sharded(distributed))


def cluster_pseudo_labels_chunked(
    bank: FeatureBank,
    probabilities: torch.Tensor,
    config: ClusterPseudoLabelConfig | None = None,
    *,
    chunk_rows: int | None = None,
    device: torch.device | str | None = None,
    distributed: bool = False,
) -> PseudoLabelSelection:
    """:func:`cluster_pseudo_labels` over a feature bank, never all N x D rows at once.

    The same maths on the same draws: K-means trains on the rows of the same random
    subsample, gathered from the bank (``[f; 1] / ||.||`` computed for them only), with
    the same k-means++ seeding; then one pass reads the bank a chunk at a time to give
    every sample its cluster. Votes, purity and selection use N-sized vectors only.
    On a float32 bank the selection is that of :func:`cluster_pseudo_labels` (only the
    inertia is summed in another order); float16 rows move the normalised rows by at
    most about 5e-4, which can move points that are almost equally near two centroids.

    Args:
        bank: (N, D) features of this rank's samples
            (:class:`~sourcefree.engine.feature_bank.FeatureBank`).
        probabilities: (N, C) softmax outputs of the same samples.
        config: see :class:`ClusterPseudoLabelConfig`.
        chunk_rows: rows per chunk of the labelling pass; None: about 16 MiB of float32.
        device: where the rows are computed; None: the probabilities' device.
        distributed: as in :func:`cluster_pseudo_labels` (this rank's shard).

    Raises:
        InputError: an empty bank, rows that are not distributions.
        ConfigError: a bad config or ``chunk_rows < 1``.
    """
    cfg = ClusterPseudoLabelConfig() if config is None else config
    size = _chunk_rows(_bank_width(bank), chunk_rows)
    probs = _check_probabilities(probabilities, bank.rows)
    dev = probs.device if device is None else torch.device(device)
    rows = _PreparedRows(bank, size, dev)
    return _cluster_and_select(lambda: rows, probs.to(dev), cfg, _sharded(distributed))


@dataclass(frozen=True, eq=False)
class _PreparedRows:
    """A bank's rows as K-means points ``[f; 1] / ||.||`` (:class:`ChunkedPoints`)."""

    bank: FeatureBank
    chunk_rows: int
    device: torch.device

    @property
    def rows(self) -> int:
        return self.bank.rows

    @property
    def dim(self) -> int:
        return self.bank.dim + 1

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at ``index``, gathered and normalised a chunk at a time."""
        out = torch.empty((int(index.numel()), self.dim), dtype=torch.float32, device=self.device)
        for s in range(0, int(index.numel()), self.chunk_rows):
            part = index[s : s + self.chunk_rows]
            out[s : s + int(part.numel())] = prepare_features(self.bank.take(part, self.device))
        return out

    def chunks(self) -> Iterator[torch.Tensor]:
        for rows in self.bank.chunks(self.chunk_rows, self.device):
            yield prepare_features(rows)


def _cluster_and_select(
    points: Callable[[], torch.Tensor | ChunkedPoints],
    probs: torch.Tensor,
    cfg: ClusterPseudoLabelConfig,
    sharded: bool,
) -> PseudoLabelSelection:
    """Sec. 3.1 from checked probabilities and the prepared points (made only to cluster)."""
    n = int(probs.shape[0])
    c = int(probs.shape[1])
    confidence, predicted = probs.to(torch.float32).max(dim=1)  # ties: lowest class index
    if sharded:
        n = sum(_dist.shard_sizes(n))

    n_clusters = 0
    n_empty = 0
    inertia = math.nan
    n_iter = 0
    converged = False
    mean_purity = math.nan
    cluster_hist: tuple[int, ...] | None = None
    clusters_per_class = (0,) * c
    kept_clusters: torch.Tensor | None = None
    members = predicted  # replaced by each sample's cluster under the "clusters" rule
    if cfg.score == "purity":
        k = _n_clusters(cfg, n, c)
        km = kmeans(points(), k, cfg.kmeans, distributed=sharded)
        pur = cluster_purity(km.labels, predicted, k, c, distributed=sharded)
        labels, scores = member_labels_and_scores(km.labels, pur)
        nonempty = pur.nonempty
        n_clusters = k
        n_empty = km.n_empty
        inertia = km.inertia
        n_iter = km.n_iter
        converged = km.converged
        agree = pur.table.gather(1, pur.labels.clamp_min(0).unsqueeze(1)).sum()
        mean_purity = float(agree.item()) / n
        cluster_hist = _histogram(pur.purity[nonempty])
        won = torch.bincount(pur.labels[nonempty], minlength=c)
        clusters_per_class = tuple(int(v) for v in won.tolist())
        members = km.labels
        if cfg.selection == "clusters":
            # The purity table is global (all-reduced): every rank keeps the same clusters.
            kept, _ = select_clusters_per_class(pur.labels, pur.purity, c, cfg.keep_fraction)
            kept_clusters = kept
    else:
        labels, scores = predicted, confidence
    if sharded:
        labels, scores, confidence, predicted = (
            _dist.all_gather_cat(t) for t in (labels, scores, confidence, predicted)
        )

    if kept_clusters is None:
        keep = select_top_fraction_per_class(labels, scores, confidence, c, cfg.keep_fraction)
    else:
        keep = _members_of(kept_clusters, members, sharded)
    sel_labels = labels[keep]
    sel_scores = scores[keep].to(torch.float32)
    candidates = torch.bincount(labels, minlength=c)
    selected = torch.bincount(sel_labels, minlength=c)
    thresholds = _lowest_kept(sel_labels, sel_scores, selected)
    m = int(keep.numel())
    agreement = float((predicted[keep] == sel_labels).sum().item()) / m if m else math.nan
    histogram = ScoreHistogram(
        kind=cfg.score,
        bin_edges=tuple(i / _N_BINS for i in range(_N_BINS + 1)),
        sample_counts=_histogram(scores),
        cluster_counts=cluster_hist,
    )
    diagnostics = PseudoLabelDiagnostics(
        score=cfg.score,
        keep_fraction=cfg.keep_fraction,
        n_samples=n,
        n_selected=m,
        n_clusters=n_clusters,
        n_empty_clusters=n_empty,
        clusters_per_class=clusters_per_class,
        kmeans_inertia=inertia,
        kmeans_iterations=n_iter,
        kmeans_converged=converged,
        mean_cluster_purity=mean_purity,
        selected_agreement=agreement,
        selection=cfg.selection,
        clusters_kept=0 if kept_clusters is None else int(kept_clusters.sum().item()),
    )
    selected_counts = tuple(int(v) for v in selected.tolist())
    return PseudoLabelSelection(
        indices=keep,
        labels=sel_labels,
        scores=sel_scores,
        n_samples=n,
        n_classes=c,
        candidates_per_class=tuple(int(v) for v in candidates.tolist()),
        selected_per_class=selected_counts,
        thresholds=thresholds,
        empty_classes=tuple(i for i, s in enumerate(selected_counts) if s == 0),
        histogram=histogram,
        diagnostics=diagnostics,
    )


@dataclass(frozen=True)
class SelectionQuality:
    """How good a selection is against true labels. For reports only: never feed it back.

    Attributes:
        precision: fraction of selected samples whose pseudo-label is correct (nan if none).
        coverage: fraction of the target set that was selected.
        correct_coverage: fraction of the target set selected with a correct label.
        per_class_precision: (C,) precision by pseudo-label class, None where none selected.
        per_class_coverage: (C,) fraction of each true class selected with a correct
            label, None where the class is absent.
    """

    precision: float
    coverage: float
    correct_coverage: float
    per_class_precision: tuple[float | None, ...]
    per_class_coverage: tuple[float | None, ...]


def selection_quality(
    selection: PseudoLabelSelection, true_labels: torch.Tensor
) -> SelectionQuality:
    """Precision and coverage of ``selection`` given the target's true labels (reporting only).

    The counting is :func:`sourcefree.data.metrics.pseudo_label_counts`, the same as the
    adapt report's ``pseudo_label_quality``; here every target sample has a label.
    """
    n, c = selection.n_samples, selection.n_classes
    y = true_labels
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.int64 or y.numel() != n:
        raise InputError(
            "true_labels do not match the selection",
            f"they must be a 1-D int64 tensor with one entry per target sample ({n})",
            "pass the evaluation labels in the same order as the features",
        )
    if n and (int(y.min().item()) < 0 or int(y.max().item()) >= c):
        raise InputError(
            f"true_labels hold values outside [0, {c})",
            "they must index the source model's classes",
            "map the evaluation labels onto the package's label order",
        )
    counts = pseudo_label_counts(
        selection.indices.detach().cpu().numpy(),
        selection.labels.detach().cpu().numpy(),
        y.detach().cpu().numpy(),
        c,
    )
    precision = counts.precision
    return SelectionQuality(
        precision=math.nan if precision is None else precision,
        coverage=counts.coverage,
        correct_coverage=counts.correct_coverage,
        per_class_precision=counts.per_class_precision,
        per_class_coverage=counts.per_class_coverage,
    )


# --- SHOT-style centroid pseudo-labels (shared by SHOT, DIFC, POCAN, LA-CMFER) ----------

#: Added to the weight sums of the centroids (SHOT's reference value).
_CENTROID_EPS = 1e-8


@dataclass(frozen=True, eq=False)
class CentroidPseudoLabels:
    """Result of :func:`centroid_pseudo_labels` (and of :func:`centroid_pseudo_labels_chunked`).

    Attributes:
        labels: (N,) int64 pseudo-label of every target sample (all samples are labelled).
        centroids: (C, D+1) float32 centroids of the last round in the prepared feature
            space; rows of classes that could not be assigned are zero.
        assignable: classes that could receive labels in the last round (those the
            previous round predicted for at least ``threshold + 1`` samples).
        counts: (C,) samples per pseudo-label.
        agreement: fraction of samples whose pseudo-label equals the model's argmax.
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    assignable: tuple[int, ...]
    counts: tuple[int, ...]
    agreement: float


def _eligible(predicted: torch.Tensor, c: int, threshold: int, sharded: bool) -> torch.Tensor:
    """Classes that more than ``threshold`` samples carry (counts all-reduced if sharded)."""
    counts = torch.bincount(predicted, minlength=c)
    if sharded:
        counts = _dist.all_reduce_sum(counts)
    eligible: torch.Tensor = counts > threshold
    return eligible


def _nearest(z: torch.Tensor, centroids: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Each row's nearest eligible centroid by cosine distance (ties: lower class)."""
    unit = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # Cosine distance 1 - <z, c>/(|z||c|); rows of z are unit vectors already.
    dist = 1.0 - z @ unit.T
    dist = dist.masked_fill(~eligible.unsqueeze(0), math.inf)
    labels: torch.Tensor = dist.argmin(dim=1)
    return labels


def _nearest_centroid(
    z: torch.Tensor,
    weights: torch.Tensor,
    predicted: torch.Tensor,
    threshold: int,
    sharded: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One labelling round: weighted centroids, then nearest eligible centroid by cosine."""
    c = weights.shape[1]
    if sharded:
        sums = _dist.all_reduce_sum(weights.T @ z)
        mass = _dist.all_reduce_sum(weights.sum(dim=0))
        centroids = sums / (mass.unsqueeze(1) + _CENTROID_EPS)
    else:
        centroids = weights.T @ z / (weights.sum(dim=0).unsqueeze(1) + _CENTROID_EPS)
    eligible = _eligible(predicted, c, threshold, sharded)
    labels = _nearest(z, centroids, eligible)
    return labels, centroids * eligible.unsqueeze(1).to(centroids.dtype), eligible


def _check_rounds(rounds: object, threshold: object) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds={rounds!r}", "at least one labelling round is needed", "")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ConfigError(f"threshold={threshold!r}", "the threshold is a count >= 0", "")


def _centroid_result(
    labels: torch.Tensor,
    first: torch.Tensor,
    centroids: torch.Tensor,
    eligible: torch.Tensor,
    sharded: bool,
) -> CentroidPseudoLabels:
    """Counts and agreement with the model's argmax ``first`` (global when sharded)."""
    counts = torch.bincount(labels, minlength=int(eligible.shape[0]))
    if sharded:
        counts = _dist.all_reduce_sum(counts)
        same = torch.tensor([float((labels == first).sum().item()), float(labels.numel())])
        _dist.all_reduce_sum(same)
        agreement = float(same[0] / same[1])
    else:
        agreement = float((labels == first).to(torch.float64).mean().item())
    return CentroidPseudoLabels(
        labels=labels.to(torch.int64),
        centroids=centroids,
        assignable=tuple(int(k) for k in torch.nonzero(eligible).flatten().tolist()),
        counts=tuple(int(v) for v in counts.tolist()),
        agreement=agreement,
    )


def centroid_pseudo_labels(
    features: torch.Tensor,
    probabilities: torch.Tensor,
    *,
    rounds: int = 2,
    threshold: int = 0,
    distributed: bool = False,
) -> CentroidPseudoLabels:
    """SHOT's self-supervised centroid pseudo-labels (Liang et al., ICML 2020, Sec. 3.3).

    1. ``z_i = [f_i; 1] / ||[f_i; 1]||`` (:func:`prepare_features`).
    2. Round 1: soft centroids ``c_k = sum_i p_ik z_i / (sum_i p_ik + 1e-8)``
       weighted by the model's probabilities; every sample takes the nearest
       centroid by cosine distance, among the classes that the argmax
       of ``probabilities`` predicts for more than ``threshold`` samples.
    3. Round 2: the same with one-hot weights from round 1's labels,
       eligible classes again those round 1 assigned more than ``threshold``.

    As in the reference code, a class nobody predicts can never be assigned
    (``threshold`` is 0 for closed-set adaptation). Ties go to the lower class index.
    :func:`centroid_pseudo_labels_chunked` is the same over a
    :class:`~sourcefree.engine.feature_bank.FeatureBank`, a chunk of rows at a time.

    Args:
        features: (N, D) floating features of the target samples (eval mode, no augmentation).
        probabilities: (N, C) softmax outputs of the same samples.
        rounds: labelling rounds (SHOT: 2, one soft and one hard); at least 1.
        threshold: a class is eligible when more than this many samples carry it.
        distributed: features and probabilities are this rank's shard of the samples
            (:mod:`sourcefree.engine.distributed`): centroid sums, weights and counts are
            all-reduced, labels come back for this rank's samples, counts and
            agreement are global. No effect without a multi-process group.

    Raises:
        InputError: bad shapes, non-finite values, rows that are not distributions.
        ConfigError: ``rounds < 1`` or ``threshold < 0``.
    """
    _check_rounds(rounds, threshold)
    z = prepare_features(features)
    probs = _check_probabilities(probabilities, z.shape[0]).to(device=z.device, dtype=z.dtype)
    predicted = probs.argmax(dim=1)
    first = predicted
    weights = probs
    labels = predicted
    centroids = torch.zeros((probs.shape[1], z.shape[1]), dtype=z.dtype, device=z.device)
    eligible = torch.zeros(probs.shape[1], dtype=torch.bool, device=z.device)
    sharded = _sharded(distributed)
    for _ in range(rounds):
        labels, centroids, eligible = _nearest_centroid(z, weights, predicted, threshold, sharded)
        predicted = labels
        weights = torch.nn.functional.one_hot(labels, probs.shape[1]).to(z.dtype)
    return _centroid_result(labels, first, centroids, eligible, sharded)


#: Bytes of float32 features one chunk of :func:`centroid_pseudo_labels_chunked` holds.
_CHUNK_BYTES = 1 << 24


def _bank_width(bank: FeatureBank) -> int:
    """D of a bank that holds rows (InputError for an empty one)."""
    if bank.rows == 0 or bank.dim == 0:
        raise InputError(
            f"features has shape {(bank.rows, bank.dim)}",
            "features must be a non-empty 2-D tensor with one row per target sample",
            "pass an (N, D) tensor with N >= 1",
        )
    return bank.dim


def _chunk_rows(dim: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        return max(1, _CHUNK_BYTES // (4 * (dim + 1)))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"chunk_rows={chunk_rows!r}", "a chunk has at least 1 row", "")
    return chunk_rows


def _centroids_of(sums: torch.Tensor, mass: torch.Tensor, sharded: bool) -> torch.Tensor:
    """float32 centroids from float64 sums and weight masses (all-reduced when sharded)."""
    if sharded:
        sums = _dist.all_reduce_sum(sums)
        mass = _dist.all_reduce_sum(mass)
    return (sums / (mass.unsqueeze(1) + _CENTROID_EPS)).to(torch.float32)


def centroid_pseudo_labels_chunked(
    bank: FeatureBank,
    probabilities: torch.Tensor,
    *,
    rounds: int = 2,
    threshold: int = 0,
    chunk_rows: int | None = None,
    device: torch.device | str | None = None,
    distributed: bool = False,
) -> CentroidPseudoLabels:
    """:func:`centroid_pseudo_labels` over a feature bank, a chunk of rows at a time.

    The same maths: ``z = [f; 1] / ||.||`` is computed per chunk (never for all rows
    at once), the centroid sums are accumulated in float64 across chunks, then each
    chunk takes its nearest eligible centroids. A round's labelling pass also sums
    the next round's centroids, so the bank is read ``rounds + 1`` times. Labels
    agree with :func:`centroid_pseudo_labels` on the same float32 rows up to
    rounding (centroids within about 1e-6).

    Args:
        bank: (N, D) features of this rank's samples
            (:class:`~sourcefree.engine.feature_bank.FeatureBank`).
        probabilities: (N, C) softmax outputs of the same samples.
        rounds, threshold: as in :func:`centroid_pseudo_labels`.
        chunk_rows: rows per chunk; None: about 16 MiB of float32 features.
        device: where the chunks are computed; None: the probabilities' device.
        distributed: as in :func:`centroid_pseudo_labels` (sums, masses and counts
            all-reduced; labels of this rank's samples).

    Raises:
        InputError: an empty bank, non-finite values, rows that are not distributions.
        ConfigError: ``rounds < 1``, ``threshold < 0`` or ``chunk_rows < 1``.
    """
    _check_rounds(rounds, threshold)
    n, d = bank.rows, _bank_width(bank)
    size = _chunk_rows(d, chunk_rows)
    probs = _check_probabilities(probabilities, n)
    dev = probs.device if device is None else torch.device(device)
    probs = probs.to(device=dev, dtype=torch.float32)
    c = int(probs.shape[1])
    sharded = _sharded(distributed)
    first = probs.argmax(dim=1)
    sums = torch.zeros((c, d + 1), dtype=torch.float64, device=dev)
    start = 0
    for chunk in bank.chunks(size, dev):
        stop = start + int(chunk.shape[0])
        z = prepare_features(chunk).to(torch.float64)
        sums += probs[start:stop].to(torch.float64).T @ z
        start = stop
    centroids = _centroids_of(sums, probs.sum(dim=0, dtype=torch.float64), sharded)
    eligible = _eligible(first, c, threshold, sharded)
    labels = first
    for r in range(rounds):
        last = r == rounds - 1
        parts, sums = [], torch.zeros((c, d + 1), dtype=torch.float64, device=dev)
        for chunk in bank.chunks(size, dev):
            z = prepare_features(chunk)
            part = _nearest(z, centroids, eligible)
            if not last:
                sums.index_add_(0, part, z.to(torch.float64))
            parts.append(part)
        labels = torch.cat(parts)
        if not last:
            mass = torch.bincount(labels, minlength=c).to(torch.float64)
            centroids = _centroids_of(sums, mass, sharded)
            eligible = _eligible(labels, c, threshold, sharded)
    masked = centroids * eligible.unsqueeze(1).to(centroids.dtype)
    return _centroid_result(labels, first, masked, eligible, sharded)
