"""``torch.library`` custom ops around the Triton launchers, with fake and autograd rules.

The ops run the Triton kernels on any device (on CPU only under the Triton
interpreter, which is how the tests drive them); ``api.py`` routes only CUDA
tensors here. ``register_fake`` lets a caller's ``torch.compile`` trace through
them without graph breaks; the backward of each differentiable op is itself a
custom op, so compiled backward graphs stay traceable too. Triton is imported
only when a kernel actually runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _tk() -> Any:
    from sourcefree.kernels import triton_kernels

    return triton_kernels


# ------------------------------------------------------------------------- K-means


@torch.library.custom_op("sourcefree::kmeans_assign", mutates_args=())
def kmeans_assign_op(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and min squared distances (Triton)."""
    labels, dist = _tk().kmeans_assign(x, centroids)
    return labels, dist


@kmeans_assign_op.register_fake
def _(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n)


# ------------------------------------------------------------------------ Sinkhorn


@torch.library.custom_op("sourcefree::sinkhorn_potentials", mutates_args=())
def sinkhorn_potentials_op(
    scores: Tensor, epsilon: float, iterations: int
) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn potentials ``(f, g)`` (Triton); no gradient."""
    f, g = _tk().sinkhorn_potentials(scores, epsilon, iterations)
    return f, g


@sinkhorn_potentials_op.register_fake
def _(scores: Tensor, epsilon: float, iterations: int) -> tuple[Tensor, Tensor]:
    return scores.new_empty(scores.shape[1]), scores.new_empty(scores.shape[0])


@torch.library.custom_op("sourcefree::swapped_ce", mutates_args=())
def swapped_ce_op(
    predictions: Tensor,
    code_scores: Tensor,
    f: Tensor,
    g: Tensor,
    epsilon: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Row losses and row log-sum-exps of the swapped prediction (Triton)."""
    loss, lse = _tk().swapped_ce_fwd(predictions, code_scores, f, g, epsilon, temperature)
    return loss, lse


@swapped_ce_op.register_fake
def _(
    predictions: Tensor,
    code_scores: Tensor,
    f: Tensor,
    g: Tensor,
    epsilon: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    b = predictions.shape[0]
    return predictions.new_empty(b), predictions.new_empty(b)


@torch.library.custom_op("sourcefree::swapped_ce_bwd", mutates_args=())
def swapped_ce_bwd_op(
    predictions: Tensor,
    code_scores: Tensor,
    f: Tensor,
    g: Tensor,
    lse: Tensor,
    grad_loss: Tensor,
    epsilon: float,
    temperature: float,
) -> Tensor:
    """Gradient of the swapped-prediction row losses with respect to ``predictions``."""
    dz: Tensor = _tk().swapped_ce_bwd(
        predictions, code_scores, f, g, lse, grad_loss, epsilon, temperature
    )
    return dz


@swapped_ce_bwd_op.register_fake
def _(
    predictions: Tensor,
    code_scores: Tensor,
    f: Tensor,
    g: Tensor,
    lse: Tensor,
    grad_loss: Tensor,
    epsilon: float,
    temperature: float,
) -> Tensor:
    return torch.empty_like(predictions, memory_format=torch.contiguous_format)


def _swapped_ce_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    predictions, code_scores, f, g, epsilon, temperature = inputs
    ctx.save_for_backward(predictions, code_scores, f, g, output[1])
    ctx.epsilon = epsilon
    ctx.temperature = temperature


def _swapped_ce_backward(
    ctx: Any, grad_loss: Tensor, grad_lse: Tensor | None
) -> tuple[Tensor | None, ...]:
    predictions, code_scores, f, g, lse = ctx.saved_tensors
    dz = swapped_ce_bwd_op(
        predictions, code_scores, f, g, lse, grad_loss, ctx.epsilon, ctx.temperature
    )
    return dz, None, None, None, None, None


swapped_ce_op.register_autograd(_swapped_ce_backward, setup_context=_swapped_ce_setup)


# ----------------------------------------------------------------------- margin CE


@torch.library.custom_op("sourcefree::margin_ce", mutates_args=())
def margin_ce_op(
    logits: Tensor,
    target: Tensor,
    margins: Tensor,
    scale: float,
    label_smoothing: float,
    entropy_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ce_rows, entropy_rows, mean_prob)`` of ``reference.margin_ce_rows`` (Triton)."""
    ce, ent, mean = _tk().margin_ce_fwd(
        logits, target, margins, scale, label_smoothing, entropy_eps
    )
    return ce, ent, mean


@margin_ce_op.register_fake
def _(
    logits: Tensor,
    target: Tensor,
    margins: Tensor,
    scale: float,
    label_smoothing: float,
    entropy_eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    b, c = logits.shape
    return logits.new_empty(b), logits.new_empty(b), logits.new_empty(c)


@torch.library.custom_op("sourcefree::margin_ce_bwd", mutates_args=())
def margin_ce_bwd_op(
    logits: Tensor,
    target: Tensor,
    margins: Tensor,
    scale: float,
    label_smoothing: float,
    entropy_eps: float,
    grad_ce: Tensor,
    grad_ent: Tensor,
    grad_mean: Tensor,
) -> Tensor:
    """Gradient of the three margin-CE outputs with respect to ``logits``."""
    dx: Tensor = _tk().margin_ce_bwd(
        logits,
        target,
        margins,
        scale,
        label_smoothing,
        entropy_eps,
        grad_ce,
        grad_ent,
        grad_mean,
    )
    return dx


@margin_ce_bwd_op.register_fake
def _(
    logits: Tensor,
    target: Tensor,
    margins: Tensor,
    scale: float,
    label_smoothing: float,
    entropy_eps: float,
    grad_ce: Tensor,
    grad_ent: Tensor,
    grad_mean: Tensor,
) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _margin_ce_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    logits, target, margins, scale, label_smoothing, entropy_eps = inputs
    ctx.save_for_backward(logits, target, margins)
    ctx.params = (scale, label_smoothing, entropy_eps)


def _margin_ce_backward(
    ctx: Any, grad_ce: Tensor | None, grad_ent: Tensor | None, grad_mean: Tensor | None
) -> tuple[Tensor | None, ...]:
    logits, target, margins = ctx.saved_tensors
    b, c = logits.shape
    zeros_b = logits.new_zeros(b)
    dx = margin_ce_bwd_op(
        logits,
        target,
        margins,
        *ctx.params,
        zeros_b if grad_ce is None else grad_ce,
        zeros_b if grad_ent is None else grad_ent,
        logits.new_zeros(c) if grad_mean is None else grad_mean,
    )
    return dx, None, None, None, None, None


margin_ce_op.register_autograd(_margin_ce_backward, setup_context=_margin_ce_setup)


# ----------------------------------------------------------------------------- MMD


@torch.library.custom_op("sourcefree::mmd_rowsums", mutates_args=())
def mmd_rowsums_op(points: Tensor, coef: Tensor, bandwidths: Tensor) -> Tensor:
    """``r_i = sum_j k(t_i, t_j) c_j`` of ``reference.mmd_rowsums`` (Triton)."""
    r: Tensor = _tk().mmd_fwd(points, coef, bandwidths)
    return r


@mmd_rowsums_op.register_fake
def _(points: Tensor, coef: Tensor, bandwidths: Tensor) -> Tensor:
    return points.new_empty(points.shape[0])


@torch.library.custom_op("sourcefree::mmd_rowsums_bwd", mutates_args=())
def mmd_rowsums_bwd_op(
    points: Tensor, coef: Tensor, bandwidths: Tensor, grad_rows: Tensor
) -> Tensor:
    """Gradient of ``sum_i grad_rows_i r_i`` with respect to ``points``."""
    dt: Tensor = _tk().mmd_bwd(points, coef, bandwidths, grad_rows)
    return dt


@mmd_rowsums_bwd_op.register_fake
def _(points: Tensor, coef: Tensor, bandwidths: Tensor, grad_rows: Tensor) -> Tensor:
    return torch.empty_like(points, memory_format=torch.contiguous_format)


def _mmd_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _mmd_backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
    points, coef, bandwidths = ctx.saved_tensors
    return mmd_rowsums_bwd_op(points, coef, bandwidths, grad_rows), None, None


mmd_rowsums_op.register_autograd(_mmd_backward, setup_context=_mmd_setup)
