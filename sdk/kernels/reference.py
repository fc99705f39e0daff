"""Pure-PyTorch references of the fused ops: the specification, the CPU path, the export path.

Every function here uses only standard differentiable PyTorch ops (no custom ops), so
autograd gives the gradients, ``torch.compile`` can fuse them and ONNX export sees
only standard-domain nodes. The Triton kernels in ``triton_kernels.py`` must match
these functions; the tests compare them.
"""

from __future__ import annotations

import torch
from torch.nn import functional as nnf


def kmeans_assign(
    x: torch.Tensor, centroids: torch.Tensor, *, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by squared Euclidean distance, in row chunks.

    Never materialises the full N x K distance matrix: each chunk of rows
    computes ``|c|^2 - 2 x c^T`` with one ``addmm`` and takes the row minimum;
    ``|x|^2`` is constant per row, so it is added to the N minima only, not to
    the chunk x K matrix.

    Args:
        x: points, shape (N, D).
        centroids: shape (K, D), same dtype and device as ``x``.
        chunk_size: rows per chunk.

    Returns:
        labels (N,) int64 and min squared distances (N,) in ``x``'s dtype,
        clamped at zero. Ties go to the lowest centroid index (``argmin``).
    """
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    c_sq = (centroids * centroids).sum(dim=1).unsqueeze(0)
    for start in range(0, n, chunk_size):
        xb = x[start : start + chunk_size]
        d = torch.addmm(c_sq, xb, centroids.t(), beta=1.0, alpha=-2.0)
        best, idx = d.min(dim=1)
        labels[start : start + chunk_size] = idx
        best.add_((xb * xb).sum(dim=1))
        dist[start : start + chunk_size] = best.clamp_min_(0)
    return labels, dist


def kmeans_assign_nograd(
    x: torch.Tensor, centroids: torch.Tensor, *, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kmeans_assign` without autograd: bitwise the same result, less memory traffic.

    Every chunk writes into one preallocated ``chunk x K`` buffer (``out=``) and the
    row minima go straight into the result tensors. A fresh chunk x K matrix per
    chunk, as autograd needs, is a large allocation that the allocator returns to
    the system and page-faults back in on every chunk: at N=100k, D=512, K=1000 on
    2 CPU threads that cost a third of an assignment (docs/benchmarks.md,
    "Clustering"). ``out=`` ops do not record gradients, so the dispatcher uses this
    only when no input requires them and nothing is being traced.
    """
    n, d = x.shape
    k = centroids.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    if n == 0:
        return labels, dist
    c_sq = (centroids * centroids).sum(dim=1).unsqueeze(0)
    c_t = centroids.t()
    rows = min(chunk_size, n)
    scores = x.new_empty((rows, k))
    squares = x.new_empty((rows, d))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xb = x[start:stop]
        s = scores[: stop - start]
        torch.addmm(c_sq, xb, c_t, beta=1.0, alpha=-2.0, out=s)
        torch.min(s, dim=1, out=(dist[start:stop], labels[start:stop]))
        sq = squares[: stop - start]
        torch.mul(xb, xb, out=sq)
        dist[start:stop].add_(sq.sum(dim=1))
    dist.clamp_min_(0)
    return labels, dist


# --------------------------------------------------------------------------- Sinkhorn


def sinkhorn_potentials(
    scores: torch.Tensor, epsilon: float, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain Sinkhorn-Knopp of SwAV (Caron et al. 2020, eq. 3 and appendix A.1).

    With ``L = scores / epsilon`` (R x K) and zero-initialised row potentials ``g``,
    each iteration sets ``f_k = -logsumexp_r(L_rk + g_r)`` (prototype marginal) then
    ``g_r = -logsumexp_k(L_rk + f_k)`` (sample marginal). The codes are
    ``q_rk = exp(L_rk + f_k + g_r)``; every row sums to one. This is the exp-form
    algorithm of SwAV/lightly with each multiplicative normalisation replaced by
    an additive potential, so the constant factors (1/B, 1/K, the initial total)
    cancel and the result is identical where the exp form is finite, while
    ``scores / epsilon`` beyond 88 can no longer overflow.

    Args:
        scores: (R, K) prototype scores, no gradient needed.
        epsilon: entropic regularisation (SwAV: 0.05).
        iterations: number of (prototype, sample) normalisation pairs (SwAV: 3).

    Returns:
        ``f`` (K,) and ``g`` (R,), in the dtype of ``scores``.
    """
    logits = scores / epsilon
    g = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    f = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    for _ in range(iterations):
        f = -torch.logsumexp(logits + g.unsqueeze(1), dim=0)
        g = -torch.logsumexp(logits + f.unsqueeze(0), dim=1)
    return f, g


def swapped_ce_rows(
    predictions: torch.Tensor,
    code_scores: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    epsilon: float,
    temperature: float,
) -> torch.Tensor:
    """Per-row swapped-prediction cross-entropy of SwAV (eq. 2): ``-sum_k q_bk log p_bk``.

    ``q_bk = exp(code_scores_bk / epsilon + f_k + g_b)`` are the Sinkhorn codes of the
    other view (no gradient) and ``p = softmax(predictions / temperature)``. Because
    each code row sums to one, the row loss is ``logsumexp(z_b / T) - sum_k q_bk z_bk / T``.

    Args:
        predictions: (B, K) scores of the predicting view (gradient flows here).
        code_scores: (R, K) with R >= B; only the first B rows are used (the queue
            rows that follow were only there for the Sinkhorn marginals).
        f: (K,) and g: (R,) potentials from :func:`sinkhorn_potentials`.
        epsilon: the Sinkhorn epsilon the potentials were computed with.
        temperature: softmax temperature of the predictions (SwAV: 0.1).

    Returns:
        (B,) losses.
    """
    b = predictions.shape[0]
    with torch.no_grad():
        codes = torch.exp(code_scores[:b] / epsilon + f.unsqueeze(0) + g[:b].unsqueeze(1))
    z = predictions / temperature
    return torch.logsumexp(z, dim=1) - (codes * z).sum(dim=1)


# ------------------------------------------------------------------------- margin CE


def margin_ce_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    margins: torch.Tensor,
    scale: float,
    label_smoothing: float,
    entropy_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row terms of margin cross-entropy with information maximisation.

    Margin logits (LDAM, Cao et al. 2019, margins ``m_j = C / n_j^{1/4}``):
    ``z = s (x - m_y e_y)``. Row loss with label smoothing ``a``:
    ``-(1-a) log softmax(z)_y - (a/C) sum_k log softmax(z)_k``.
    Predictions for the IM terms use no margin: ``p = softmax(s x)``; the row
    entropy is ``-sum_k p_k log p_k`` when ``entropy_eps == 0`` and SHOT's
    ``-sum_k p_k log(p_k + eps)`` otherwise (Liang et al. 2020 use 1e-5).

    Args:
        logits: (B, C) raw logits ``x``.
        target: (B,) int64 in [0, C) (callers map invalid labels to 0 and mask them).
        margins: (C,) additive margins ``m_j`` (zeros for plain CE), no gradient.
        scale: ``s``.
        label_smoothing: ``a`` in [0, 1).
        entropy_eps: 0 for the exact entropy, or SHOT's epsilon.

    Returns:
        ce_rows (B,), entropy_rows (B,), mean_prob (C,) = mean over rows of ``p``.
    """
    u = logits * scale
    onehot = nnf.one_hot(target, num_classes=logits.shape[1]).to(u.dtype)
    z = u - onehot * (margins.to(u.dtype)[target] * scale).unsqueeze(1)
    log_pz = torch.log_softmax(z, dim=1)
    nll = -(log_pz * onehot).sum(dim=1)
    if label_smoothing > 0.0:
        smooth = -log_pz.mean(dim=1)
        ce_rows = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    else:
        ce_rows = nll
    log_p = torch.log_softmax(u, dim=1)
    p = torch.exp(log_p)
    if entropy_eps > 0.0:
        ent_rows = -(p * torch.log(p + entropy_eps)).sum(dim=1)
    else:
        ent_rows = -(p * log_p).sum(dim=1)
    return ce_rows, ent_rows, p.mean(dim=0)


# ------------------------------------------------------------------------------- MMD


def mmd_bandwidths(points: torch.Tensor, kernel_mul: float, kernel_num: int) -> torch.Tensor:
    """Gaussian bandwidths from the data, DAN convention (Long et al. 2015), closed form.

    The base bandwidth is the mean off-diagonal squared distance of the N pooled
    points, ``(2N sum_i |t_i|^2 - 2 |sum_i t_i|^2) / (N^2 - N)``, computed in O(N d)
    without the N x N matrix; the ``kernel_num`` bandwidths are the base times
    ``kernel_mul ** (k - kernel_num // 2)``. Detached: bandwidths carry no gradient.

    Returns:
        (kernel_num,) bandwidths in float64-accumulated precision, ``points``' dtype.
    """
    t = points.detach().to(torch.float64)
    n = t.shape[0]
    total = 2.0 * n * (t * t).sum() - 2.0 * (t.sum(dim=0) ** 2).sum()
    base = (total / (n * n - n)).clamp_min(torch.finfo(points.dtype).tiny)
    base = base / kernel_mul ** (kernel_num // 2)
    powers = torch.tensor(
        [kernel_mul**k for k in range(kernel_num)], dtype=torch.float64, device=t.device
    )
    return (base * powers).to(points.dtype)


def mmd_rowsums(points: torch.Tensor, coef: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """``r_i = sum_j k(t_i, t_j) c_j`` with ``k = sum_k exp(-|t_i - t_j|^2 / bw_k)``.

    Matrix-multiply form: ``|t_i - t_j|^2 = |t_i|^2 + |t_j|^2 - 2 t_i.t_j`` (clamped at
    zero). With ``c = [w / sum w, -v / sum v]`` the weighted MMD^2 is ``c . r``
    (Gretton et al. 2012, eq. 5, with importance weights).

    Args:
        points: (N, d) pooled source and target rows.
        coef: (N,) signed weights, no gradient.
        bandwidths: (nk,) positive, no gradient.

    Returns:
        (N,) row sums.
    """
    sq = (points * points).sum(dim=1)
    dist = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (points @ points.t())).clamp_min(0)
    kern = torch.zeros_like(dist)
    for k in range(bandwidths.shape[0]):
        kern = kern + torch.exp(-dist / bandwidths[k])
    return kern @ coef
