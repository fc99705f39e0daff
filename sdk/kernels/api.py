"""Public dispatchers: validate inputs, pick an implementation (``dispatch.py``), combine.

Each function has one code path for the combination step; only the row-level
primitive differs between the Triton custom op and the PyTorch reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from sourcefree.errors import InputError
from sourcefree.kernels import reference as ref
from sourcefree.kernels.dispatch import exporting, reference_impl, use_triton

__all__ = [
    "IMTerms",
    "gaussian_mmd",
    "kmeans_assign",
    "ldam_margins",
    "margin_ce_im",
    "sinkhorn_codes",
    "swav_loss",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_matrix(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise InputError(f"{name} is a {type(t).__name__}", "a torch.Tensor is required")
    if t.dim() != 2:
        raise InputError(
            f"{name} has shape {tuple(t.shape)}", "it must be 2-D (rows, features)", "reshape it"
        )
    if t.dtype not in _FLOATS:
        raise InputError(
            f"{name} has dtype {t.dtype}",
            "only float16, bfloat16, float32 and float64 are supported",
            "cast it with .float()",
        )
    return t


def _can_inspect(t: Tensor) -> bool:
    """Value checks only where they cost no device sync and no data-dependent trace."""
    return not (t.is_cuda or exporting() or torch.compiler.is_compiling())


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------- K-means


def kmeans_assign(x: Tensor, centroids: Tensor, *, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Nearest centroid by squared Euclidean distance, without an N x K matrix.

    Args:
        x: (N, D) points.
        centroids: (K, D), same dtype and device as ``x``, K >= 1.
        chunk_size: rows per chunk of the reference path (the kernel ignores it).

    Returns:
        labels (N,) int64 and min squared distances (N,) in ``x``'s dtype, clamped at
        zero; ties go to the lowest centroid index. On CUDA the distances use TF32
        when ``torch.get_float32_matmul_precision()`` is not "highest", as PyTorch's
        own matmul does, so near-ties may resolve differently from the CPU. When
        ``x`` or ``centroids`` requires grad, the differentiable reference runs on
        every device (the kernel has no backward), so gradients flow the same way.
    """
    _check_matrix("x", x)
    _check_matrix("centroids", centroids)
    if centroids.shape[0] < 1 or centroids.shape[1] != x.shape[1]:
        raise InputError(
            f"centroids has shape {tuple(centroids.shape)} for points {tuple(x.shape)}",
            "it needs at least one row and the points' feature size",
        )
    if centroids.dtype != x.dtype or centroids.device != x.device:
        raise InputError(
            f"centroids are {centroids.dtype} on {centroids.device}, points {x.dtype} on "
            f"{x.device}",
            "both must have one dtype and device",
            "convert with centroids.to(x)",
        )
    if chunk_size < 1:
        raise InputError(f"chunk_size={chunk_size}", "it must be positive")
    # Gradients first: the Triton op has no autograd rule, so a call that needs them
    # takes the differentiable reference on every device (CPU and CUDA alike).
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or centroids.requires_grad)
    if not needs_grad and use_triton(x):
        from sourcefree.kernels.custom_ops import kmeans_assign_op

        labels, dist = kmeans_assign_op(x, centroids)
        return labels, dist
    if not (needs_grad or exporting() or torch.compiler.is_compiling()):
        return ref.kmeans_assign_nograd(x, centroids, chunk_size=chunk_size)
    fn = reference_impl("kmeans_assign", ref.kmeans_assign, x.device, x.numel())
    return fn(x, centroids, chunk_size=chunk_size)


# ------------------------------------------------------------------------ Sinkhorn

_Potentials = Callable[[Tensor, float, int], tuple[Tensor, Tensor]]
_SwappedCE = Callable[[Tensor, Tensor, Tensor, Tensor, float, float], Tensor]


def _swapped_ce_triton(
    z: Tensor, s: Tensor, f: Tensor, g: Tensor, epsilon: float, temperature: float
) -> Tensor:
    from sourcefree.kernels.custom_ops import swapped_ce_op

    out: tuple[Tensor, Tensor] = swapped_ce_op(z, s, f, g, epsilon, temperature)
    return out[0]


def _sinkhorn_impls(scores: Tensor) -> tuple[_Potentials, _SwappedCE]:
    if use_triton(scores):
        from sourcefree.kernels.custom_ops import sinkhorn_potentials_op

        return sinkhorn_potentials_op, _swapped_ce_triton
    return (
        reference_impl("sinkhorn", ref.sinkhorn_potentials, scores.device, scores.numel()),
        reference_impl("swapped_ce", ref.swapped_ce_rows, scores.device, scores.numel()),
    )


def _global_sinkhorn_potentials(
    scores: Tensor, epsilon: float, iterations: int
) -> tuple[Tensor, Tensor]:
    """``reference.sinkhorn_potentials`` over the rows of every rank (SwAV's distributed form).

    The prototype marginal sums over the global batch: SwAV all-reduces the
    column sums of Q; in the log domain that is a logsumexp over all ranks' rows,
    computed from an all-reduced column maximum and an all-reduced sum of
    ``exp(L + g - max)``. Row potentials ``g`` stay local. With one process this
    is the reference computation.
    """
    from sourcefree.engine import distributed as dist

    logits = scores / epsilon
    g = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    f = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    for _ in range(iterations):
        shifted = logits + g.unsqueeze(1)
        top = dist.all_reduce_max(shifted.amax(dim=0))
        mass = dist.all_reduce_sum(torch.exp(shifted - top.unsqueeze(0)).sum(dim=0))
        f = -(top + torch.log(mass))
        g = -torch.logsumexp(logits + f.unsqueeze(0), dim=1)
    return f, g


def _sinkhorn_global(scores: Tensor, distributed: bool) -> _Potentials | None:
    if not distributed:
        return None
    from sourcefree.engine import distributed as dist

    return _global_sinkhorn_potentials if dist.is_distributed() else None


def _check_sinkhorn_params(epsilon: float, iterations: int, temperature: float = 1.0) -> None:
    if not epsilon > 0.0 or not temperature > 0.0:
        raise InputError(f"epsilon={epsilon}, temperature={temperature}", "both must be positive")
    if iterations < 1:
        raise InputError(f"iterations={iterations}", "at least one Sinkhorn iteration is needed")


def sinkhorn_codes(
    scores: Tensor, *, epsilon: float = 0.05, iterations: int = 3, distributed: bool = False
) -> Tensor:
    """SwAV codes ``Q`` (each row sums to one) by log-domain Sinkhorn-Knopp; no gradient.

    Equal to SwAV's/lightly's exp-form ``sinkhorn`` where that is finite, and finite
    for any ``scores / epsilon`` (see ``reference.sinkhorn_potentials``). Computed in
    fp32 (fp64 for fp64 scores).

    Args:
        scores: (R, K) prototype scores, queue rows included.
        epsilon: entropic regularisation.
        iterations: Sinkhorn iterations.
        distributed: ``scores`` are this rank's rows of a global batch: the
            prototype marginals are taken over every rank's rows (all-reduced, on
            the reference path), as SwAV does. No effect for one process.

    Returns:
        (R, K) codes in the compute dtype.
    """
    _check_matrix("scores", scores)
    _check_sinkhorn_params(epsilon, iterations)
    s = scores.detach().to(_compute_dtype(scores))
    potentials, _ = _sinkhorn_impls(s)
    potentials = _sinkhorn_global(s, distributed) or potentials
    f, g = potentials(s, float(epsilon), int(iterations))
    return torch.exp(s / epsilon + f.unsqueeze(0) + g.unsqueeze(1))


def swav_loss(
    high_resolution: Sequence[Tensor],
    low_resolution: Sequence[Tensor] = (),
    queue: Sequence[Tensor] | None = None,
    *,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    distributed: bool = False,
) -> Tensor:
    """SwAV swapped-prediction loss over multi-crop outputs (Caron et al. 2020, eq. 1-3).

    For each high-resolution crop ``i`` the codes come from Sinkhorn over its scores
    (detached) with ``queue[i]`` rows appended, which are dropped afterwards; every
    other crop ``v`` (high and low resolution) predicts them with
    ``-sum_k q_ik log softmax(z_v / T)_k``, averaged over rows. The total is
    ``mean_i sum_{v != i} loss_iv / (n_crops - 1)``, the convention of SwAV and
    lightly's ``SwaVLoss``; logits are cast to fp32 (fp64 stays fp64).

    Args:
        high_resolution: (B, K) prototype scores of each high-resolution crop.
        low_resolution: (B, K) scores of each low-resolution crop.
        queue: optional (Q, K) queue scores, one per high-resolution crop.
        temperature: softmax temperature of the predictions.
        epsilon: Sinkhorn regularisation.
        iterations: Sinkhorn iterations.
        distributed: the crops are this rank's slice of a global batch: Sinkhorn
            runs over the rows (batch and queue) of every rank, as SwAV does; the
            loss is this rank's mean (the trainer averages gradients over ranks).
            No effect for one process.

    Returns:
        0-d loss tensor; gradients flow into every crop's predictions, never the codes.
    """
    hi = [_check_matrix(f"high_resolution[{i}]", t) for i, t in enumerate(high_resolution)]
    lo = [_check_matrix(f"low_resolution[{i}]", t) for i, t in enumerate(low_resolution)]
    crops = hi + lo
    if not hi or len(crops) < 2:
        raise InputError(
            f"{len(hi)} high- and {len(lo)} low-resolution crops",
            "SwAV needs at least one high-resolution crop and two crops in all",
        )
    shape = crops[0].shape
    for i, t in enumerate(crops):
        if t.shape != shape or t.device != crops[0].device:
            raise InputError(
                f"crop {i} has shape {tuple(t.shape)} on {t.device}",
                f"all crops must share crop 0's shape {tuple(shape)} and device",
            )
    qs: list[Tensor] = []
    if queue is not None:
        qs = [_check_matrix(f"queue[{i}]", t) for i, t in enumerate(queue)]
        if len(qs) != len(hi) or any(t.shape[1] != shape[1] for t in qs):
            raise InputError(
                f"{len(qs)} queue tensors for {len(hi)} high-resolution crops",
                f"one (Q, {shape[1]}) queue tensor per high-resolution crop is needed",
            )
    _check_sinkhorn_params(epsilon, iterations, temperature)
    dtype = _compute_dtype(crops[0])
    preds = [t.to(dtype) for t in crops]
    potentials, swapped_ce = _sinkhorn_impls(preds[0])
    potentials = _sinkhorn_global(preds[0], distributed) or potentials
    eps, temp = float(epsilon), float(temperature)
    total = preds[0].new_zeros(())
    for i in range(len(hi)):
        code_scores = preds[i].detach()
        if qs:
            code_scores = torch.cat([code_scores, qs[i].detach().to(dtype)])
        f, g = potentials(code_scores, eps, int(iterations))
        sub = preds[0].new_zeros(())
        for v, z in enumerate(preds):
            if v != i:
                sub = sub + swapped_ce(z, code_scores, f, g, eps, temp).mean()
        total = total + sub / (len(crops) - 1)
    return total / len(hi)


# ----------------------------------------------------------------------- margin CE


class IMTerms(NamedTuple):
    """Components returned by :func:`margin_ce_im` (all 0-d tensors)."""

    ce: Tensor
    """Weighted, masked mean of the (margin, smoothed) cross-entropy over labelled rows."""
    entropy: Tensor
    """Mean per-row entropy of ``softmax(s x)``, all rows."""
    diversity: Tensor
    """Entropy of the mean prediction over all rows."""

    def loss(self, ce_weight: float = 1.0, im_weight: float = 1.0) -> Tensor:
        """``ce_weight * ce + im_weight * (entropy - diversity)``; SHOT: ``ce_weight=0.3``."""
        return ce_weight * self.ce + im_weight * (self.entropy - self.diversity)


def ldam_margins(class_counts: Tensor | Sequence[int], max_margin: float = 0.5) -> Tensor:
    """LDAM margins ``m_j = C / n_j^{1/4}`` (LDAM, Cao et al. 2019), max = max_margin."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0 or bool((counts <= 0).any()):
        raise InputError(
            f"class_counts={counts.tolist()}",
            "one positive count per class is needed",
            "drop empty classes or add one to every count",
        )
    m = counts.pow(-0.25)
    return (m * (max_margin / m.max())).to(torch.float32)


def _margin_terms(
    logits: Tensor,
    target: Tensor,
    margins: Tensor,
    weight: Tensor,
    scale: float,
    label_smoothing: float,
    entropy_eps: float,
    triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    c = logits.shape[1]
    valid = (target >= 0) & (target < c)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if triton:
        from sourcefree.kernels.custom_ops import margin_ce_op

        ce_rows, ent_rows, mean_prob = margin_ce_op(
            logits, safe_target, margins, scale, label_smoothing, entropy_eps
        )
    else:
        ce_rows, ent_rows, mean_prob = ref.margin_ce_rows(
            logits, safe_target, margins, scale, label_smoothing, entropy_eps
        )
    w = weight * valid.to(weight.dtype)
    ce = (w * ce_rows).sum() / valid.sum().clamp_min(1).to(w.dtype)
    if entropy_eps > 0.0:
        diversity = -(mean_prob * torch.log(mean_prob + entropy_eps)).sum()
    else:
        diversity = torch.special.entr(mean_prob).sum()
    return ce, ent_rows.mean(), diversity


def margin_ce_im(
    logits: Tensor,
    target: Tensor | None = None,
    *,
    margins: Tensor | None = None,
    scale: float = 1.0,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
    mask: Tensor | None = None,
    entropy_eps: float = 0.0,
) -> IMTerms:
    """Margin cross-entropy with information-maximisation terms, in one pass.

    CE on margin logits ``s (x - m_y e_y)`` (LDAM margin loss; DIFC passes its own
    margins), with optional label smoothing, averaged as
    ``sum_b w_b [b labelled] ce_b / #labelled``; a row is labelled when ``mask`` is
    true and its target lies in [0, C) (so -100 or -1 mean "no label"). The IM
    terms use ``p = softmax(s x)`` without margins over all rows: entropy
    ``mean_b H(p_b)`` and diversity ``H(mean_b p_b)``; SHOT's IM loss (Liang et al.
    2020: L_ent - L_div) is ``entropy - diversity``. ``entropy_eps=1e-5`` reproduces
    SHOT's ``-sum p log(p + 1e-5)`` exactly; 0 gives the exact entropy. Margins
    carry no gradient; ``weight`` does (it is applied outside the kernel).

    Args:
        logits: (B, C) logits ``x``; computed in fp32 (fp64 stays fp64).
        target: (B,) integer labels or pseudo-labels; None for IM only (ce = 0).
        margins: (C,) additive margins, e.g. :func:`ldam_margins`; None for none.
        scale: ``s`` (LDAM uses 30 with normalised logits).
        label_smoothing: in [0, 1).
        weight: (B,) per-row CE weights (e.g. confidences).
        mask: (B,) bool, rows whose label counts.
        entropy_eps: 0, or SHOT's 1e-5.

    Returns:
        :class:`IMTerms` ``(ce, entropy, diversity)``.
    """
    _check_matrix("logits", logits)
    b, c = logits.shape
    if b == 0:
        raise InputError("logits has no rows", "the IM terms need at least one row")
    if not 0.0 <= label_smoothing < 1.0 or entropy_eps < 0.0 or not scale > 0.0:
        raise InputError(
            f"label_smoothing={label_smoothing}, entropy_eps={entropy_eps}, scale={scale}",
            "need 0 <= label_smoothing < 1, entropy_eps >= 0 and scale > 0",
        )
    dev = logits.device
    if target is None:
        target = torch.full((b,), -1, dtype=torch.int64, device=dev)
    for name, t in (("target", target), ("weight", weight), ("mask", mask)):
        if t is not None and (t.shape != (b,) or t.device != dev):
            raise InputError(
                f"{name} has shape {tuple(t.shape)} on {t.device}",
                f"it must have shape ({b},) on {dev}, one entry per row of logits",
            )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise InputError(f"target has dtype {target.dtype}", "integer labels are required")
    dtype = _compute_dtype(logits)
    target = target.to(torch.int64)
    if mask is not None:
        target = torch.where(mask.to(torch.bool), target, torch.full_like(target, -1))
    if margins is None:
        margins = torch.zeros(c, dtype=dtype, device=dev)
    elif margins.shape != (c,):
        raise InputError(f"margins has shape {tuple(margins.shape)}", f"it must be ({c},)")
    margins = margins.detach().to(device=dev, dtype=dtype)
    w = torch.ones(b, dtype=dtype, device=dev) if weight is None else weight.to(dtype)
    x = logits.to(dtype)
    params = (float(scale), float(label_smoothing), float(entropy_eps))
    if use_triton(x) and c <= MARGIN_CE_MAX_CLASSES:
        ce, ent, div = _margin_terms(x, target, margins, w, *params, True)
    else:
        fn = reference_impl("margin_ce", _margin_terms, x.device, x.numel())
        ce, ent, div = fn(x, target, margins, w, *params, False)
    return IMTerms(ce, ent, div)


MARGIN_CE_MAX_CLASSES = 8192
"""The kernel holds whole rows in one tile; more classes use the reference."""


# ----------------------------------------------------------------------------- MMD


def _weights(name: str, w: Tensor | None, n: int, like: Tensor) -> Tensor:
    if w is None:
        return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    if w.shape != (n,) or w.device != like.device:
        raise InputError(
            f"{name} has shape {tuple(w.shape)} on {w.device}",
            f"it must have shape ({n},) on {like.device}",
        )
    w = w.detach().to(like.dtype)
    total = w.sum()
    if _can_inspect(w) and (bool((w < 0).any()) or not bool(total > 0)):
        raise InputError(f"{name} sums to {float(total)}", "weights must be >= 0, not all 0")
    return w / total


def _mmd_value(
    source: Tensor,
    target: Tensor,
    coef: Tensor,
    bandwidths: Tensor | None,
    kernel_mul: float,
    kernel_num: int,
    triton: bool,
) -> Tensor:
    points = torch.cat([source, target])
    bw = ref.mmd_bandwidths(points, kernel_mul, kernel_num) if bandwidths is None else bandwidths
    if triton:
        from sourcefree.kernels.custom_ops import mmd_rowsums_op

        rows: Tensor = mmd_rowsums_op(points, coef, bw)
    else:
        rows = ref.mmd_rowsums(points, coef, bw)
    return (coef * rows).sum()


def gaussian_mmd(
    source: Tensor,
    target: Tensor,
    *,
    source_weight: Tensor | None = None,
    target_weight: Tensor | None = None,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
    bandwidths: Tensor | None = None,
) -> Tensor:
    """Weighted multi-kernel Gaussian MMD^2 (DAN, Long et al. 2015), matrix-multiply form.

    ``MMD^2 = w^T K_ss w + v^T K_tt v - 2 w^T K_st v`` with ``w``, ``v`` the weights
    normalised to sum one (uniform by default, which is DAN's biased estimate) and
    ``K = sum_k exp(-|a - b|^2 / bw_k)``. Bandwidths default to DAN's data-driven
    closed form (``reference.mmd_bandwidths``). Weights and bandwidths are
    detached; gradients flow into ``source`` and ``target``.

    Args:
        source: (n, d) features. target: (m, d) features, same dtype and device.
        source_weight: (n,) non-negative, e.g. LA-CMFER hardness weights.
        target_weight: (m,) non-negative.
        kernel_mul: ratio between consecutive bandwidths.
        kernel_num: number of Gaussian kernels.
        bandwidths: explicit (nk,) positive bandwidths instead of the data-driven ones.

    Returns:
        0-d MMD^2 in fp32 (fp64 for fp64 inputs).
    """
    _check_matrix("source", source)
    _check_matrix("target", target)
    if source.shape[1] != target.shape[1] or source.device != target.device:
        raise InputError(
            f"source {tuple(source.shape)} on {source.device}, target {tuple(target.shape)} "
            f"on {target.device}",
            "both need the same feature size and device",
        )
    n, m = source.shape[0], target.shape[0]
    if n < 1 or m < 1:
        raise InputError(f"{n} source and {m} target rows", "each side needs a row")
    dtype = _compute_dtype(source)
    src, tgt = source.to(dtype), target.to(dtype)
    bw: Tensor | None = None
    if bandwidths is None:
        if kernel_num < 1 or not kernel_mul > 0.0:
            raise InputError(f"kernel_num={kernel_num}, kernel_mul={kernel_mul}", "must be > 0")
    else:
        bw = bandwidths.detach().to(device=src.device, dtype=dtype).reshape(-1)
        if bw.numel() == 0 or (_can_inspect(bw) and bool((bw <= 0).any())):
            raise InputError("bandwidths", "at least one, all positive")
    coef = torch.cat(
        [
            _weights("source_weight", source_weight, n, src),
            -_weights("target_weight", target_weight, m, src),
        ]
    )
    args = (src, tgt, coef, bw, float(kernel_mul), int(kernel_num))
    if use_triton(src) and src.shape[1] <= MMD_MAX_DIM:
        return _mmd_value(*args, True)
    fn = reference_impl("mmd", _mmd_value, src.device, (n + m) * src.shape[1])
    return fn(*args, False)


MMD_MAX_DIM = 1024
"""Mirror of ``triton_kernels.MMD_MAX_DIM`` (that module needs triton to import)."""
