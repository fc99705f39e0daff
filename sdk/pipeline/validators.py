"""The field's label-free validators, written from their papers, to judge ours against.

``adapt`` uses ClassAMI alone, to rank the candidates that pass the do-no-harm gate
(:func:`sourcefree.pipeline.selection.rank_candidates`). ``benchmarks/selection.py``
scores the same candidate pools with them (weighted Spearman and regret, as
Musgrave et al. compare validators). Every score here is higher-is-better.

- ``im``: information maximisation, ``H(mean_i p_i) - mean_i H(p_i)``, the negative
  of SHOT's IM loss (Liang et al., ICML 2020, arXiv 2002.08546, Sec. 3.2; the IM
  validator of Musgrave et al.): :func:`sourcefree.pipeline.selection.information_maximisation`.
- ``snd``: soft neighbourhood density (Saito et al., ICCV 2021, arXiv 2108.10860,
  temperature 0.05): :func:`sourcefree.pipeline.selection.soft_neighbourhood_density`.
- ``bnm``: batch nuclear-norm (Cui et al., CVPR 2020, arXiv 2003.12237: the loss
  ``-||A||_* / B`` of the B x C softmax matrix ``A``): ``||A||_* / N`` over the N
  target images, as pytorch-adapt's BNM validator, :func:`batch_nuclear_norm`.
- ``class_ami``: ClassAMI (Musgrave et al., "Benchmarking validation methods for
  unsupervised domain adaptation", 2022, arXiv 2208.07360): K-means with K = C on
  the target features (reduced to 64 principal components first, as their
  evaluation does), and the adjusted mutual information between the cluster ids
  and the predicted labels: :func:`class_ami`, :func:`adjusted_mutual_information`.

DEV (deep embedded validation, You et al., ICML 2019) needs labelled *source*
validation images on the target site; a source-free customer has none, so it is
not offered.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sourcefree.errors import ConfigError, InputError
from sourcefree.ops.clustering import KMeansConfig, contingency_table, kmeans
from sourcefree.pipeline.selection import (
    ArrayLike,
    checked_logits,
    information_maximisation,
    soft_neighbourhood_density,
)

#: Principal components ClassAMI clusters in (Musgrave et al.'s evaluation default).
CLASS_AMI_PCA = 64
#: Validator names of :func:`validator_scores`, in table order.
VALIDATORS = ("im", "snd", "bnm", "class_ami")


def batch_nuclear_norm(logits: ArrayLike) -> float:
    """``||A||_* / N``: nuclear norm of the (N, C) softmax matrix over the image count.

    Cui et al., CVPR 2020 (the loss is its negative, per batch of B = N images;
    the authors' domain-adaptation code takes the mean singular value instead,
    ``||A||_* / min(N, C)``: within one pool N and C are fixed, so both rank the
    candidates alike). High for predictions that are confident (``||A||_F`` near
    its maximum ``sqrt(N)``) and diverse (many large singular values). A one-hot
    matrix with ``N / C`` images in each class scores ``sqrt(C / N)``; one class
    for every image ``1 / sqrt(N)``; uniform predictions ``1 / sqrt(N C)``.
    """
    t = checked_logits(logits).double()
    probs = torch.softmax(t, dim=1)
    return float(torch.linalg.matrix_norm(probs, ord="nuc")) / t.shape[0]


def _labels(values: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.ndim != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InputError(
            f"{name} of dtype {t.dtype} and shape {tuple(t.shape)}",
            "a partition is a non-empty 1-D array of integer labels",
            "pass one integer cluster id or class per sample",
        )
    inverse: torch.Tensor = torch.unique(t.long(), return_inverse=True)[1]
    return inverse


def _entropy(counts: torch.Tensor) -> float:
    p = counts.double() / float(counts.sum())
    return -float(torch.special.xlogy(p, p).sum())


def expected_mutual_information(a_counts: torch.Tensor, b_counts: torch.Tensor) -> float:
    """E[MI] (nats) of two partitions with these cluster sizes under random relabelling.

    Vinh, Epps & Bailey, JMLR 2010: the hypergeometric model, in which
    every contingency table with the given margins arises from a uniformly random
    permutation of one labelling. Sum over cells (i, j) and cell counts ``n_ij``
    from ``max(1, a_i + b_j - N)`` to ``min(a_i, b_j)`` of
    ``n_ij / N * log(N n_ij / (a_i b_j))`` times the hypergeometric probability
    of ``n_ij``, computed with ``lgamma`` in float64.
    """
    a = a_counts.double().flatten()
    b = b_counts.double().flatten()
    n = float(a.sum())
    if float(b.sum()) != n or n <= 0:
        raise InputError(
            f"cluster sizes summing to {float(a.sum()):g} and {float(b.sum()):g}",
            "both partitions must cover the same positive number of samples",
            "count the clusters of two labellings of the same samples",
        )
    lg = torch.lgamma
    total = 0.0
    for ai in a.tolist():
        for bj in b.tolist():
            low, high = max(1.0, ai + bj - n), min(ai, bj)
            if high < low:
                continue
            nij = torch.arange(low, high + 1, dtype=torch.float64)
            log_p = (
                math.lgamma(ai + 1)
                + math.lgamma(bj + 1)
                + math.lgamma(n - ai + 1)
                + math.lgamma(n - bj + 1)
                - math.lgamma(n + 1)
                - lg(nij + 1)
                - lg(ai - nij + 1)
                - lg(bj - nij + 1)
                - lg(n - ai - bj + nij + 1)
            )
            term = nij / n * torch.log(n * nij / (ai * bj)) * torch.exp(log_p)
            total += float(term.sum())
    return total


def adjusted_mutual_information(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor
) -> float:
    """AMI of two labellings of the same samples, arithmetic-mean normalisation.

    ``(MI - E[MI]) / ((H(a) + H(b)) / 2 - E[MI])`` (Vinh, Epps & Bailey, JMLR 2010;
    the arithmetic mean is scikit-learn's default, which Musgrave et al.
    used). 1 for identical partitions (up to renaming the labels), about 0 for
    independent ones, negative when they agree less than chance. When the
    denominator is 0 (both partitions put every sample in one cluster, or every
    sample in its own) the partitions are identical and the value is 1.
    """
    ia, ib = _labels(a, "labels a"), _labels(b, "labels b")
    if ia.numel() != ib.numel():
        raise InputError(
            f"{ia.numel()} and {ib.numel()} labels",
            "AMI compares two labellings of the same samples",
            "pass one label per sample in both",
        )
    ka, kb = int(ia.max()) + 1, int(ib.max()) + 1
    table = contingency_table(ia, ib, ka, kb).double()
    n = float(ia.numel())
    rows, cols = table.sum(1), table.sum(0)
    outer = rows[:, None] * cols[None, :]
    mask = table > 0
    mi = float((table[mask] / n * torch.log(n * table[mask] / outer[mask])).sum())
    emi = expected_mutual_information(rows, cols)
    denominator = (_entropy(rows) + _entropy(cols)) / 2 - emi
    if abs(denominator) < 1e-12:
        return 1.0
    return (mi - emi) / denominator


def _principal_components(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` centred and projected on its ``dim`` leading principal directions."""
    centred = x - x.mean(0, keepdim=True)
    if dim >= min(x.shape):
        return centred  # a rotation: K-means distances are unchanged
    vh: torch.Tensor = torch.linalg.svd(centred, full_matrices=False).Vh
    projected: torch.Tensor = centred @ vh[:dim].T
    return projected


def class_ami(
    features: torch.Tensor | np.ndarray,
    logits: ArrayLike,
    *,
    seed: int = 0,
    pca_dim: int = CLASS_AMI_PCA,
    n_init: int = 10,
) -> float:
    """ClassAMI (Musgrave et al. 2022): AMI of K-means clusters (K = C) and predicted labels.

    ``features`` (N, D) are the model's penultimate features of the target images,
    ``logits`` its (N, C) outputs on the same images. The features are reduced to
    ``pca_dim`` principal components (64, as in their evaluation; none when D is
    smaller), clustered by K-means with K = C (k-means++, ``n_init`` seeded runs on
    every point, as scikit-learn's ``KMeans``), and scored with
    :func:`adjusted_mutual_information` against the argmax labels. High when the
    classifier's decisions follow the clusters of its own feature space.
    """
    t = checked_logits(logits)
    f = torch.as_tensor(features)
    if f.ndim != 2 or f.shape[0] != t.shape[0] or not f.dtype.is_floating_point:
        raise InputError(
            f"features of dtype {f.dtype} and shape {tuple(f.shape)} for {t.shape[0]} images",
            "ClassAMI clusters one floating-point feature row per scored image",
            "pass the model's features of the images its logits came from",
        )
    if not bool(torch.isfinite(f).all()):
        raise InputError(
            "the features contain NaN or Inf",
            "K-means distances to such points are undefined",
            "check the model (a diverged adaptation?)",
        )
    if pca_dim < 1:
        raise ConfigError(f"pca_dim={pca_dim}", "at least one component is kept", "pass 64")
    k = int(t.shape[1])
    points = _principal_components(f.double(), pca_dim).float()  # K-means in float32
    config = KMeansConfig(n_init=n_init, max_points_per_centroid=None, seed=seed)
    clusters = kmeans(points, k, config).labels
    return adjusted_mutual_information(clusters.cpu(), t.argmax(1))


def validator_scores(
    logits: ArrayLike, features: torch.Tensor | np.ndarray | None = None, *, seed: int = 0
) -> dict[str, float | None]:
    """Every validator of :data:`VALIDATORS` (``class_ami`` None without ``features``)."""
    return {
        "im": information_maximisation(logits),
        "snd": soft_neighbourhood_density(logits),
        "bnm": batch_nuclear_norm(logits),
        "class_ami": None if features is None else class_ami(features, logits, seed=seed),
    }
