"""Pure-PyTorch references of the fused ops: the specification and the CPU path."""

from __future__ import annotations

import torch


def kmeans_assign(
    x: torch.Tensor, centroids: torch.Tensor, *, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by squared Euclidean distance, in row chunks.

    Never materialises the full N x K distance matrix: each chunk of rows
    computes ``|x|^2 - 2 x c^T + |c|^2`` with one ``addmm`` and an argmin.

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
    c_sq = (centroids * centroids).sum(dim=1)
    for start in range(0, n, chunk_size):
        xb = x[start : start + chunk_size]
        d = torch.addmm(c_sq.unsqueeze(0), xb, centroids.t(), beta=1.0, alpha=-2.0)
        d.add_((xb * xb).sum(dim=1, keepdim=True))
        best, idx = d.min(dim=1)
        labels[start : start + chunk_size] = idx
        dist[start : start + chunk_size] = best.clamp_min_(0)
    return labels, dist
