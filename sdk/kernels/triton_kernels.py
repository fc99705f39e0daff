"""Triton kernels and their launchers. Imported lazily: importing it requires triton.

Each launcher takes contiguous tensors on one device and returns tensors; the
custom ops in ``custom_ops.py`` wrap them. Under ``TRITON_INTERPRET=1`` (set before this
module is imported) the launchers run on CPU tensors, which is how the tests
check them. Block sizes are arguments so tests can force awkward tilings.

Numerics shared by all kernels: fp16/bf16 operands are converted to fp32 before
``tl.dot`` (the interpreter's bf16 dot is wrong, and it keeps one code path);
accumulation is fp32, or fp64 for fp64 inputs. fp32 dots use TF32 on the GPU only
when PyTorch's own fp32 matmul precision allows it.
"""

# ruff: noqa: N803, SIM108
# mypy: disable-error-code="no-untyped-def,untyped-decorator"
# (Triton convention: UPPER_CASE constexpr names, untyped @triton.jit kernels.)
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "kmeans_assign",
    "margin_ce_bwd",
    "margin_ce_fwd",
    "mmd_bwd",
    "mmd_fwd",
    "sinkhorn_potentials",
    "swapped_ce_bwd",
    "swapped_ce_fwd",
]


def interpreting() -> bool:
    """True when triton runs kernels in its NumPy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _acc_dtype(t: torch.Tensor) -> tl.dtype:
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _dot_precision(t: torch.Tensor) -> str:
    if t.dtype == torch.float64 or not t.is_cuda:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _pow2(n: int, lo: int = 1, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, int(triton.next_power_of_2(max(int(n), 1)))))


def _warps(tile_elems: int, per_thread: int = 8) -> int:
    """Warps for element-wise tiles: about ``per_thread`` elements a thread, 4 to 16 warps.

    Each live tile costs ``tile_elems / (32 num_warps)`` registers a thread; the
    margin-CE and swapped-CE kernels keep several tiles live, and with 4 warps the
    widest ones spilled (seen in the sm_90 resource usage of ``compile_check``).
    """
    return max(4, min(16, tile_elems // (32 * per_thread)))


@triton.jit
def _offsets(idx, stride):
    # ``idx * stride`` in int64: with int32 indices the product wraps once a tensor
    # holds 2**31 elements (N x D), and the kernel reads or writes the wrong rows.
    return idx.to(tl.int64) * stride


# ------------------------------------------------------------------------ K-means


@triton.jit
def _kmeans_assign_kernel(
    x_ptr,
    c_ptr,
    csq_ptr,
    labels_ptr,
    dist_ptr,
    n_rows,
    n_clusters,
    dim,
    stride_xn,
    stride_cn,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    # One program owns BLOCK_N points and scans every centroid tile: running min and
    # argmin in registers, no atomics, no N x K matrix.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    best = tl.full((BLOCK_N,), float("inf"), ACC)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    x_sq = tl.zeros((BLOCK_N,), ACC)
    x_rows = _offsets(rows, stride_xn)
    for k0 in range(0, n_clusters, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < n_clusters
        c_rows = _offsets(cols, stride_cn)
        acc = tl.zeros((BLOCK_N, BLOCK_K), ACC)
        x_sq = tl.zeros((BLOCK_N,), ACC)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < dim
            xt = tl.load(
                x_ptr + x_rows[:, None] + ds[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(ACC)
            ct = tl.load(
                c_ptr + c_rows[:, None] + ds[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(ACC)
            acc = tl.dot(xt, tl.trans(ct), acc, input_precision=PRECISION, out_dtype=ACC)
            x_sq += tl.sum(xt * xt, axis=1)
        c_sq = tl.load(csq_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        dist = (c_sq[None, :] - 2.0 * acc) + x_sq[:, None]
        dist = tl.where(col_ok[None, :], dist, float("inf"))
        tile_min, tile_idx = tl.min(dist, axis=1, return_indices=True)
        better = tile_min < best  # strict: ties keep the lower index, as argmin
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_idx + k0, best_idx)
    tl.store(labels_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    tl.store(dist_ptr + rows, tl.maximum(best, 0.0), mask=row_ok)


def kmeans_assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    block_n: int = 128,
    block_k: int = 64,
    block_d: int = 32,
    num_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the assignment kernel; see ``reference.kmeans_assign`` for the contract."""
    x = x.contiguous()
    centroids = centroids.contiguous()
    n, d = x.shape
    k = centroids.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    if n == 0:
        return labels, dist
    c_sq = (centroids.to(torch.float64 if x.dtype == torch.float64 else torch.float32) ** 2).sum(1)
    grid = (triton.cdiv(n, block_n),)
    _kmeans_assign_kernel[grid](
        x,
        centroids,
        c_sq,
        labels,
        dist,
        n,
        k,
        d,
        x.stride(0),
        centroids.stride(0),
        ACC=_acc_dtype(x),
        PRECISION=_dot_precision(x),
        BLOCK_N=block_n,
        BLOCK_K=_pow2(k, 16, block_k),
        BLOCK_D=_pow2(d, 16, block_d),
        num_warps=num_warps,
    )
    return labels, dist


# ----------------------------------------------------------------------- Sinkhorn


@triton.jit
def _row_lse_kernel(
    s_ptr,
    f_ptr,
    g_ptr,
    n_rows,
    n_cols,
    stride_s,
    inv_eps,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    # g_r = -logsumexp_k(S_rk / eps + f_k), online over column tiles.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    m = tl.full((BLOCK_R,), float("-inf"), ACC)
    acc = tl.zeros((BLOCK_R,), ACC)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        s = tl.load(
            s_ptr + _offsets(rows, stride_s)[:, None] + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(ACC)
        f = tl.load(f_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        v = tl.where(col_ok[None, :], s * inv_eps + f[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(v, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(v - m_new[:, None]), axis=1)
        m = m_new
    tl.store(g_ptr + rows, -(m + tl.log(acc)), mask=row_ok)


@triton.jit
def _col_lse_kernel(
    s_ptr,
    g_ptr,
    f_ptr,
    n_rows,
    n_cols,
    stride_s,
    inv_eps,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    # f_k = -logsumexp_r(S_rk / eps + g_r), online over row tiles (coalesced along k).
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    m = tl.full((BLOCK_C,), float("-inf"), ACC)
    acc = tl.zeros((BLOCK_C,), ACC)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        s = tl.load(
            s_ptr + _offsets(rows, stride_s)[:, None] + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(ACC)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        v = tl.where(row_ok[:, None], s * inv_eps + g[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(v, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(v - m_new[None, :]), axis=0)
        m = m_new
    tl.store(f_ptr + cols, -(m + tl.log(acc)), mask=col_ok)


def sinkhorn_potentials(
    scores: torch.Tensor,
    epsilon: float,
    iterations: int,
    *,
    block_r: int = 32,
    block_c: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Potentials ``(f, g)`` of ``reference.sinkhorn_potentials``: 2 launches per iteration."""
    scores = scores.contiguous()
    r, k = scores.shape
    f = torch.zeros(k, dtype=scores.dtype, device=scores.device)
    g = torch.zeros(r, dtype=scores.dtype, device=scores.device)
    acc = _acc_dtype(scores)
    br = _pow2(r, 1, block_r)
    bc = _pow2(k, 1, block_c)
    for _ in range(iterations):
        _col_lse_kernel[(triton.cdiv(k, bc),)](
            scores, g, f, r, k, scores.stride(0), 1.0 / epsilon, ACC=acc, BLOCK_R=br, BLOCK_C=bc
        )
        _row_lse_kernel[(triton.cdiv(r, br),)](
            scores, f, g, r, k, scores.stride(0), 1.0 / epsilon, ACC=acc, BLOCK_R=br, BLOCK_C=bc
        )
    return f, g


@triton.jit
def _swapped_ce_fwd_kernel(
    z_ptr,
    s_ptr,
    f_ptr,
    g_ptr,
    loss_ptr,
    lse_ptr,
    n_rows,
    n_cols,
    stride_z,
    stride_s,
    inv_eps,
    inv_t,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    # loss_b = logsumexp_k(z_bk / T) - sum_k q_bk z_bk / T, q recomputed from (S, f, g).
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    z_rows = _offsets(rows, stride_z)
    s_rows = _offsets(rows, stride_s)
    m = tl.full((BLOCK_R,), float("-inf"), ACC)
    acc = tl.zeros((BLOCK_R,), ACC)
    dot = tl.zeros((BLOCK_R,), ACC)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.load(z_ptr + z_rows[:, None] + cols[None, :], mask=ok, other=0.0)
        z = z.to(ACC) * inv_t
        s = tl.load(s_ptr + s_rows[:, None] + cols[None, :], mask=ok, other=0.0)
        f = tl.load(f_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        q = tl.exp(s.to(ACC) * inv_eps + f[None, :] + g[:, None])
        q = tl.where(col_ok[None, :], q, 0.0)
        dot += tl.sum(q * z, axis=1)
        v = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(v, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(v - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(acc)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - dot, mask=row_ok)


@triton.jit
def _swapped_ce_bwd_kernel(
    z_ptr,
    s_ptr,
    f_ptr,
    g_ptr,
    lse_ptr,
    gout_ptr,
    dz_ptr,
    n_rows,
    n_cols,
    stride_z,
    stride_s,
    inv_eps,
    inv_t,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    # dz_bk = gout_b (softmax(z_b / T)_k - q_bk) / T, one tile per program.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    z_at = z_ptr + _offsets(rows, stride_z)[:, None] + cols[None, :]
    s_at = s_ptr + _offsets(rows, stride_s)[:, None] + cols[None, :]
    z = tl.load(z_at, mask=ok, other=0.0).to(ACC)
    s = tl.load(s_at, mask=ok, other=0.0).to(ACC)
    f = tl.load(f_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    go = tl.load(gout_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    p = tl.exp(z * inv_t - lse[:, None])
    q = tl.exp(s * inv_eps + f[None, :] + g[:, None])
    dz = (go * inv_t)[:, None] * (p - q)
    tl.store(dz_ptr + _offsets(rows, n_cols)[:, None] + cols[None, :], dz, mask=ok)


def swapped_ce_fwd(
    predictions: torch.Tensor,
    code_scores: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    epsilon: float,
    temperature: float,
    *,
    block_r: int = 16,
    block_c: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses and row log-sum-exps of ``reference.swapped_ce_rows``."""
    z = predictions.contiguous()
    s = code_scores.contiguous()
    b, k = z.shape
    loss = torch.empty(b, dtype=z.dtype, device=z.device)
    lse = torch.empty(b, dtype=z.dtype, device=z.device)
    br = _pow2(b, 1, block_r)
    bc = _pow2(k, 1, block_c)
    _swapped_ce_fwd_kernel[(triton.cdiv(b, br),)](
        z,
        s,
        f.contiguous(),
        g.contiguous(),
        loss,
        lse,
        b,
        k,
        z.stride(0),
        s.stride(0),
        1.0 / epsilon,
        1.0 / temperature,
        ACC=_acc_dtype(z),
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=_warps(br * bc),
    )
    return loss, lse


def swapped_ce_bwd(
    predictions: torch.Tensor,
    code_scores: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    epsilon: float,
    temperature: float,
    *,
    block_r: int = 32,
    block_c: int = 128,
) -> torch.Tensor:
    """Gradient of the row losses with respect to ``predictions``."""
    z = predictions.contiguous()
    s = code_scores.contiguous()
    b, k = z.shape
    dz = torch.empty((b, k), dtype=z.dtype, device=z.device)
    br = _pow2(b, 1, block_r)
    bc = _pow2(k, 1, block_c)
    _swapped_ce_bwd_kernel[(triton.cdiv(b, br), triton.cdiv(k, bc))](
        z,
        s,
        f.contiguous(),
        g.contiguous(),
        lse.contiguous(),
        grad_loss.contiguous(),
        dz,
        b,
        k,
        z.stride(0),
        s.stride(0),
        1.0 / epsilon,
        1.0 / temperature,
        ACC=_acc_dtype(z),
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=_warps(br * bc),
    )
    return dz


# ---------------------------------------------------------------------- margin CE


@triton.jit
def _margin_ce_fwd_kernel(
    x_ptr,
    y_ptr,
    m_ptr,
    ce_ptr,
    ent_ptr,
    colsum_ptr,
    n_rows,
    n_cols,
    stride_x,
    scale,
    smoothing,
    eps,
    ACC: tl.constexpr,
    HAS_EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    # One tile holds whole rows (BLOCK_C >= C): CE on margin logits, entropy of
    # softmax(s x), and this program's column sums of p for the diversity term.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + _offsets(rows, stride_x)[:, None] + cols[None, :], mask=ok, other=0.0)
    u = tl.where(col_ok[None, :], x.to(ACC) * scale, float("-inf"))
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    marg = tl.load(m_ptr + y, mask=row_ok, other=0.0).to(ACC)
    is_y = cols[None, :] == y[:, None]
    z = tl.where(is_y, u - (marg * scale)[:, None], u)
    mz = tl.max(z, axis=1)
    lse_z = mz + tl.log(tl.sum(tl.exp(z - mz[:, None]), axis=1))
    log_pz = tl.where(col_ok[None, :], z - lse_z[:, None], 0.0)
    nll = -tl.sum(tl.where(is_y, log_pz, 0.0), axis=1)
    smooth = -tl.sum(log_pz, axis=1) / n_cols
    ce = (1.0 - smoothing) * nll + smoothing * smooth
    mu = tl.max(u, axis=1)
    lse_u = mu + tl.log(tl.sum(tl.exp(u - mu[:, None]), axis=1))
    log_p = tl.where(col_ok[None, :], u - lse_u[:, None], 0.0)
    p = tl.where(col_ok[None, :], tl.exp(log_p), 0.0)
    if HAS_EPS:
        ent = -tl.sum(p * tl.log(p + eps), axis=1)
    else:
        ent = -tl.sum(p * log_p, axis=1)
    tl.store(ce_ptr + rows, ce, mask=row_ok)
    tl.store(ent_ptr + rows, ent, mask=row_ok)
    p = tl.where(row_ok[:, None], p, 0.0)
    tl.store(colsum_ptr + _offsets(pid, n_cols) + cols, tl.sum(p, axis=0), mask=col_ok)


@triton.jit
def _margin_ce_bwd_kernel(
    x_ptr,
    y_ptr,
    m_ptr,
    gce_ptr,
    gent_ptr,
    gmean_ptr,
    dx_ptr,
    n_rows,
    n_cols,
    stride_x,
    scale,
    smoothing,
    eps,
    ACC: tl.constexpr,
    HAS_EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    # dx = s [g_ce (softmax(z) - t) + p * (a - sum_j p_j a_j)],
    # a_k = g_ent dH/dp_k + g_mean_k / B, dH/dp_k = -log(p_k + eps) - p_k / (p_k + eps).
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + _offsets(rows, stride_x)[:, None] + cols[None, :], mask=ok, other=0.0)
    u = tl.where(col_ok[None, :], x.to(ACC) * scale, float("-inf"))
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    marg = tl.load(m_ptr + y, mask=row_ok, other=0.0).to(ACC)
    is_y = cols[None, :] == y[:, None]
    z = tl.where(is_y, u - (marg * scale)[:, None], u)
    mz = tl.max(z, axis=1)
    ez = tl.exp(z - mz[:, None])
    pz = ez / tl.sum(ez, axis=1)[:, None]
    target = tl.where(is_y, 1.0 - smoothing, 0.0) + smoothing / n_cols
    target = tl.where(col_ok[None, :], target, 0.0)
    g_ce = tl.load(gce_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    g_mean = tl.load(gmean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    mu = tl.max(u, axis=1)
    lse_u = mu + tl.log(tl.sum(tl.exp(u - mu[:, None]), axis=1))
    log_p = tl.where(col_ok[None, :], u - lse_u[:, None], 0.0)
    p = tl.where(col_ok[None, :], tl.exp(log_p), 0.0)
    if HAS_EPS:
        dh = -tl.log(p + eps) - p / (p + eps)
    else:
        dh = -log_p - 1.0
    a = g_ent[:, None] * dh + g_mean[None, :] / n_rows
    a = tl.where(col_ok[None, :], a, 0.0)
    pa = tl.sum(p * a, axis=1)
    dx = g_ce[:, None] * (pz - target) + p * (a - pa[:, None])
    tl.store(dx_ptr + _offsets(rows, n_cols)[:, None] + cols[None, :], dx * scale, mask=ok)


def _margin_blocks(c: int, block_elems: int) -> tuple[int, int]:
    bc = _pow2(c, 2)
    return max(1, block_elems // bc), bc


def margin_ce_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    margins: torch.Tensor,
    scale: float,
    label_smoothing: float,
    entropy_eps: float,
    *,
    block_elems: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row terms of ``reference.margin_ce_rows``; column sums reduced in two stages."""
    x = logits.contiguous()
    b, c = x.shape
    br, bc = _margin_blocks(c, block_elems)
    br = min(br, _pow2(b))
    n_prog = triton.cdiv(b, br)
    ce = torch.empty(b, dtype=x.dtype, device=x.device)
    ent = torch.empty(b, dtype=x.dtype, device=x.device)
    colsum = torch.empty((n_prog, c), dtype=x.dtype, device=x.device)
    _margin_ce_fwd_kernel[(n_prog,)](
        x,
        target.contiguous(),
        margins.to(x.dtype).contiguous(),
        ce,
        ent,
        colsum,
        b,
        c,
        x.stride(0),
        float(scale),
        float(label_smoothing),
        float(entropy_eps),
        ACC=_acc_dtype(x),
        HAS_EPS=entropy_eps > 0.0,
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=_warps(br * bc),
    )
    return ce, ent, colsum.sum(dim=0) / b


def margin_ce_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    margins: torch.Tensor,
    scale: float,
    label_smoothing: float,
    entropy_eps: float,
    grad_ce: torch.Tensor,
    grad_ent: torch.Tensor,
    grad_mean: torch.Tensor,
    *,
    block_elems: int = 4096,
) -> torch.Tensor:
    """Gradient of the three outputs of ``margin_ce_fwd`` with respect to ``logits``."""
    x = logits.contiguous()
    b, c = x.shape
    br, bc = _margin_blocks(c, block_elems)
    br = min(br, _pow2(b))
    dx = torch.empty((b, c), dtype=x.dtype, device=x.device)
    _margin_ce_bwd_kernel[(triton.cdiv(b, br),)](
        x,
        target.contiguous(),
        margins.to(x.dtype).contiguous(),
        grad_ce.contiguous(),
        grad_ent.contiguous(),
        grad_mean.contiguous(),
        dx,
        b,
        c,
        x.stride(0),
        float(scale),
        float(label_smoothing),
        float(entropy_eps),
        ACC=_acc_dtype(x),
        HAS_EPS=entropy_eps > 0.0,
        BLOCK_R=br,
        BLOCK_C=bc,
        num_warps=_warps(br * bc),
    )
    return dx


# ---------------------------------------------------------------------------- MMD


@triton.jit
def _sq_dist_tile(
    t_ptr,
    sq_ptr,
    rows,
    cols,
    n,
    dim,
    stride_t,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The (rows, cols) tile of d_ij = |t_i|^2 + |t_j|^2 - 2 t_i.t_j, clamped at 0, for
    # rows and cols < n. The dot is tiled over the features by BLOCK_D, so no operand
    # tile is wider than BLOCK_D whatever d is.
    row_ok = rows < n
    col_ok = cols < n
    i_rows = _offsets(rows, stride_t)
    j_rows = _offsets(cols, stride_t)
    dot = tl.zeros((rows.shape[0], cols.shape[0]), ACC)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < dim
        ti = tl.load(
            t_ptr + i_rows[:, None] + ds[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(ACC)
        tj = tl.load(
            t_ptr + j_rows[:, None] + ds[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(ACC)
        dot = tl.dot(ti, tl.trans(tj), dot, input_precision=PRECISION, out_dtype=ACC)
    sq_i = tl.load(sq_ptr + rows, mask=row_ok, other=0.0)
    sq_j = tl.load(sq_ptr + cols, mask=col_ok, other=0.0)
    return tl.maximum(sq_i[:, None] + sq_j[None, :] - 2.0 * dot, 0.0)


@triton.jit
def _mmd_fwd_kernel(
    t_ptr,
    sq_ptr,
    c_ptr,
    inv_bw_ptr,
    r_ptr,
    n,
    dim,
    stride_t,
    N_BW: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    # r_i = sum_j sum_k exp(-d_ij / bw_k) c_j; d_ij from norms and a tiled dot product.
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < n
    r = tl.zeros((BLOCK_I,), ACC)
    for j0 in range(0, n, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < n
        dist = _sq_dist_tile(t_ptr, sq_ptr, rows, cols, n, dim, stride_t, ACC, PRECISION, BLOCK_D)
        kern = tl.zeros((BLOCK_I, BLOCK_J), ACC)
        for k in tl.static_range(N_BW):
            kern += tl.exp(-dist * tl.load(inv_bw_ptr + k))
        c_j = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
        r += tl.sum(kern * c_j[None, :], axis=1)
    tl.store(r_ptr + rows, r, mask=row_ok)


@triton.jit
def _mmd_bwd_kernel(
    t_ptr,
    sq_ptr,
    c_ptr,
    g_ptr,
    inv_bw_ptr,
    dt_ptr,
    n,
    dim,
    stride_t,
    N_BW: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
) -> None:
    # For L = sum_i g_i r_i: dt_i = sum_j W_ij (t_i - t_j) with
    # W_ij = (g_i c_j + c_i g_j) sum_k (-2 / bw_k) exp(-d_ij / bw_k); tiles recomputed.
    # Program (i, o) owns rows i and output features [o BLOCK_DO, (o + 1) BLOCK_DO):
    # the distances take a BLOCK_D-tiled dot over all of d (recomputed once per
    # output chunk), so no tile is wider than max(BLOCK_D, BLOCK_DO) for any d.
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    dso = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_ok = rows < n
    do_ok = dso < dim
    i_rows = _offsets(rows, stride_t)
    ti_out = tl.load(
        t_ptr + i_rows[:, None] + dso[None, :],
        mask=row_ok[:, None] & do_ok[None, :],
        other=0.0,
    ).to(ACC)
    c_i = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    g_i = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_I, BLOCK_DO), ACC)
    w_sum = tl.zeros((BLOCK_I,), ACC)
    for j0 in range(0, n, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_ok = cols < n
        j_rows = _offsets(cols, stride_t)
        dist = _sq_dist_tile(t_ptr, sq_ptr, rows, cols, n, dim, stride_t, ACC, PRECISION, BLOCK_D)
        dk = tl.zeros((BLOCK_I, BLOCK_J), ACC)
        for k in tl.static_range(N_BW):
            inv_bw = tl.load(inv_bw_ptr + k)
            dk += -2.0 * inv_bw * tl.exp(-dist * inv_bw)
        c_j = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
        g_j = tl.load(g_ptr + cols, mask=col_ok, other=0.0)
        w = (g_i[:, None] * c_j[None, :] + c_i[:, None] * g_j[None, :]) * dk
        w = tl.where(row_ok[:, None] & col_ok[None, :], w, 0.0)
        w_sum += tl.sum(w, axis=1)
        tj_out = tl.load(
            t_ptr + j_rows[:, None] + dso[None, :],
            mask=col_ok[:, None] & do_ok[None, :],
            other=0.0,
        ).to(ACC)
        acc = tl.dot(w, tj_out, acc, input_precision=PRECISION, out_dtype=ACC)
    dt = w_sum[:, None] * ti_out - acc
    out = dt_ptr + _offsets(rows, dim)[:, None] + dso[None, :]
    tl.store(out, dt, mask=row_ok[:, None] & do_ok[None, :])


MMD_MAX_DIM = 1024
"""Widest features sent to the kernels (the dispatcher's limit; the kernels tile any d)."""
MMD_BWD_BLOCK_DO = 128
"""Output features per backward program: bounds the accumulator whatever d is."""


def _mmd_prep(
    points: torch.Tensor, coef: torch.Tensor, bandwidths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = torch.float64 if points.dtype == torch.float64 else torch.float32
    t = points.contiguous()
    sq = (t.to(acc) ** 2).sum(1)
    return t, sq, coef.to(acc).contiguous(), (1.0 / bandwidths.to(acc)).contiguous()


def mmd_fwd(
    points: torch.Tensor,
    coef: torch.Tensor,
    bandwidths: torch.Tensor,
    *,
    block_i: int = 64,
    block_j: int = 64,
    block_d: int = 32,
) -> torch.Tensor:
    """Row sums of ``reference.mmd_rowsums``."""
    t, sq, c, inv_bw = _mmd_prep(points, coef, bandwidths)
    n, d = t.shape
    r = torch.empty(n, dtype=sq.dtype, device=t.device)
    bi = _pow2(n, 16, block_i)
    bd = _pow2(d, 16, block_d)
    _mmd_fwd_kernel[(triton.cdiv(n, bi),)](
        t,
        sq,
        c,
        inv_bw,
        r,
        n,
        d,
        t.stride(0),
        N_BW=inv_bw.shape[0],
        ACC=_acc_dtype(t),
        PRECISION=_dot_precision(t),
        BLOCK_I=bi,
        BLOCK_J=_pow2(n, 16, block_j),
        BLOCK_D=bd,
        num_warps=8 if bd > 16 else 4,  # no spill stack either way (compile_check, sm_90)
    )
    return r.to(points.dtype)


def mmd_bwd(
    points: torch.Tensor,
    coef: torch.Tensor,
    bandwidths: torch.Tensor,
    grad_rows: torch.Tensor,
    *,
    block_i: int = 32,
    block_j: int = 32,
    block_d: int = 32,
    block_do: int = MMD_BWD_BLOCK_DO,
) -> torch.Tensor:
    """Gradient of ``sum_i grad_rows_i r_i`` with respect to ``points``.

    The grid is (row tiles, output-feature chunks of ``block_do``); every tile is
    at most ``max(block_i, block_j) x max(block_d, block_do)`` for any d.
    """
    t, sq, c, inv_bw = _mmd_prep(points, coef, bandwidths)
    n, d = t.shape
    dt = torch.empty((n, d), dtype=sq.dtype, device=t.device)
    bi = _pow2(n, 16, block_i)
    bdo = _pow2(d, 16, block_do)
    _mmd_bwd_kernel[(triton.cdiv(n, bi), triton.cdiv(d, bdo))](
        t,
        sq,
        c,
        grad_rows.to(sq.dtype).contiguous(),
        inv_bw,
        dt,
        n,
        d,
        t.stride(0),
        N_BW=inv_bw.shape[0],
        ACC=_acc_dtype(t),
        PRECISION=_dot_precision(t),
        BLOCK_I=bi,
        BLOCK_J=_pow2(n, 16, block_j),
        BLOCK_D=_pow2(d, 16, block_d),
        BLOCK_DO=bdo,
        num_warps=8,
    )
    return dt.to(points.dtype)
