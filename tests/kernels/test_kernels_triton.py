"""Each Triton kernel run directly on CPU tensors under TRITON_INTERPRET=1, against the reference.

Shapes are small and awkward (not multiples of the block, one row, K = 1, ties) and
block sizes are forced small so several tiles and loop trips are exercised while
the interpreter (~0.4 ms per program instance) stays fast.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from torch.nn import functional as nnf

from sourcefree.kernels import reference as ref

D64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------ K-means

KM_BLOCKS = {"block_n": 16, "block_k": 16, "block_d": 16}


@pytest.mark.parametrize(
    ("n", "k", "d"), [(37, 5, 19), (1, 1, 3), (20, 33, 40), (16, 1, 16), (5, 17, 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_kmeans_kernel_matches_reference(
    tk: ModuleType, n: int, k: int, d: int, dtype: torch.dtype
) -> None:
    g = _gen(n * 100 + k)
    x = torch.randn(n, d, dtype=dtype, generator=g)
    c = torch.randn(k, d, dtype=dtype, generator=g)
    labels, dist = tk.kmeans_assign(x, c, **KM_BLOCKS)
    exp_labels, exp_dist = ref.kmeans_assign(x, c)
    assert labels.dtype == torch.int64
    assert dist.dtype == dtype
    assert torch.equal(labels, exp_labels)
    tol = 1e-12 if dtype == D64 else 1e-4
    torch.testing.assert_close(dist, exp_dist, atol=tol, rtol=tol)


def test_kmeans_kernel_ties_go_to_lowest_index(tk: ModuleType) -> None:
    # Duplicated centroids in different K tiles and inside one tile: argmin keeps the first.
    base = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    c = torch.cat([base, torch.full((14, 2), 100.0), base, base])  # 3 + 14 + 3 + 3 = 23 rows
    x = torch.tensor([[0.1, 0.2], [3.9, 0.0], [0.0, 4.5], [2.0, 0.0]])
    labels, _ = tk.kmeans_assign(x, c, **KM_BLOCKS)
    assert labels.tolist() == [0, 1, 2, 0]  # [2, 0] is equidistant from rows 0 and 1
    assert torch.equal(labels, ref.kmeans_assign(x, c)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kmeans_kernel_half_inputs_upcast_before_dot(tk: ModuleType, dtype: torch.dtype) -> None:
    g = _gen(7)
    x = torch.randn(40, 24, generator=g).to(dtype)
    c = torch.randn(9, 24, generator=g).to(dtype)
    labels, dist = tk.kmeans_assign(x, c, **KM_BLOCKS)
    exp_labels, exp_dist = ref.kmeans_assign(x.float(), c.float())
    assert torch.equal(labels, exp_labels)
    assert dist.dtype == dtype
    torch.testing.assert_close(dist.float(), exp_dist, atol=0.05, rtol=1e-2)


def test_kmeans_kernel_empty_input(tk: ModuleType) -> None:
    labels, dist = tk.kmeans_assign(torch.empty(0, 4), torch.randn(3, 4))
    assert labels.shape == (0,)
    assert dist.shape == (0,)


# ----------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize(("r", "k"), [(23, 41), (1, 5), (9, 1), (40, 17)])
def test_sinkhorn_kernel_matches_reference(tk: ModuleType, r: int, k: int) -> None:
    s = nnf.normalize(torch.randn(r, k, dtype=D64, generator=_gen(r + k)), dim=1)
    f, g = tk.sinkhorn_potentials(s, 0.05, 3, block_r=8, block_c=16)
    ef, eg = ref.sinkhorn_potentials(s, 0.05, 3)
    torch.testing.assert_close(f, ef)
    torch.testing.assert_close(g, eg)


def test_sinkhorn_kernel_small_epsilon_fp32(tk: ModuleType) -> None:
    s = torch.randn(21, 30, generator=_gen(3)) * 2
    f, g = tk.sinkhorn_potentials(s, 0.02, 3, block_r=8, block_c=16)
    ef, eg = ref.sinkhorn_potentials(s.double(), 0.02, 3)
    q = torch.exp(s.double() / 0.02 + f.double() + g.double().unsqueeze(1))
    eq = torch.exp(s.double() / 0.02 + ef + eg.unsqueeze(1))
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, eq, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("b", "r", "k"), [(20, 45, 41), (1, 1, 3), (7, 7, 1)])
def test_swapped_ce_kernel_fwd_bwd(tk: ModuleType, b: int, r: int, k: int) -> None:
    gen = _gen(b + r + k)
    s = nnf.normalize(torch.randn(r, k, dtype=D64, generator=gen), dim=1)
    f, g = ref.sinkhorn_potentials(s, 0.05, 3)
    z = nnf.normalize(torch.randn(b, k, dtype=D64, generator=gen), dim=1).requires_grad_()
    expected = ref.swapped_ce_rows(z, s, f, g, 0.05, 0.1)
    loss, lse = tk.swapped_ce_fwd(z.detach(), s, f, g, 0.05, 0.1, block_r=8, block_c=16)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(lse, torch.logsumexp(z.detach() / 0.1, dim=1))
    go = torch.randn(b, dtype=D64, generator=gen)
    (exp_dz,) = torch.autograd.grad(expected, z, go)
    dz = tk.swapped_ce_bwd(z.detach(), s, f, g, lse, go, 0.05, 0.1, block_r=8, block_c=16)
    torch.testing.assert_close(dz, exp_dz)


# ---------------------------------------------------------------------- margin CE


@pytest.mark.parametrize(("b", "c"), [(13, 7), (1, 7), (9, 1), (6, 33)])
@pytest.mark.parametrize(("smoothing", "eps"), [(0.0, 0.0), (0.1, 1e-5)])
def test_margin_ce_kernel_fwd_bwd(
    tk: ModuleType, b: int, c: int, smoothing: float, eps: float
) -> None:
    gen = _gen(b * c)
    x = torch.randn(b, c, dtype=D64, generator=gen).requires_grad_()
    y = torch.randint(0, c, (b,), generator=gen)
    m = torch.rand(c, dtype=D64, generator=gen)
    expected = ref.margin_ce_rows(x, y, m, 2.5, smoothing, eps)
    got = tk.margin_ce_fwd(x.detach(), y, m, 2.5, smoothing, eps, block_elems=32)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e.detach())
    grads = (
        torch.randn(b, dtype=D64, generator=gen),
        torch.randn(b, dtype=D64, generator=gen),
        torch.randn(c, dtype=D64, generator=gen),
    )
    (exp_dx,) = torch.autograd.grad(expected, x, grads)
    dx = tk.margin_ce_bwd(x.detach(), y, m, 2.5, smoothing, eps, *grads, block_elems=32)
    torch.testing.assert_close(dx, exp_dx)


def test_margin_ce_kernel_fp32_extreme_logits(tk: ModuleType) -> None:
    # Saturated softmax: p underflows to 0 in some columns; no NaN in values or grads.
    x = torch.tensor([[50.0, -50.0, 0.0, 10.0, -80.0, 3.0, 1.0]] * 3)
    y = torch.tensor([1, 0, 4])
    m = torch.zeros(7)
    for eps in (0.0, 1e-5):
        got = tk.margin_ce_fwd(x, y, m, 1.0, 0.0, eps)
        expected = ref.margin_ce_rows(x, y, m, 1.0, 0.0, eps)
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e)
        ones = torch.ones(3)
        dx = tk.margin_ce_bwd(x, y, m, 1.0, 0.0, eps, ones, ones, torch.ones(7))
        assert torch.isfinite(dx).all()


# ---------------------------------------------------------------------------- MMD


@pytest.mark.parametrize(("n", "d"), [(45, 21), (2, 1), (17, 40)])
def test_mmd_kernel_fwd_bwd(tk: ModuleType, n: int, d: int) -> None:
    gen = _gen(n + d)
    t = torch.randn(n, d, dtype=D64, generator=gen).requires_grad_()
    c = torch.randn(n, dtype=D64, generator=gen)
    bw = ref.mmd_bandwidths(t, 2.0, 5)
    expected = ref.mmd_rowsums(t, c, bw)
    got = tk.mmd_fwd(t.detach(), c, bw, block_i=16, block_j=16, block_d=16)
    torch.testing.assert_close(got, expected.detach())
    gr = torch.randn(n, dtype=D64, generator=gen)
    (exp_dt,) = torch.autograd.grad(expected, t, gr)
    dt = tk.mmd_bwd(t.detach(), c, bw, gr, block_i=16, block_j=16)
    torch.testing.assert_close(dt, exp_dt)


def test_mmd_kernel_bf16_upcast(tk: ModuleType) -> None:
    gen = _gen(5)
    t = torch.randn(20, 16, generator=gen).bfloat16()
    c = torch.randn(20, generator=gen)
    bw = ref.mmd_bandwidths(t.float(), 2.0, 3)
    got = tk.mmd_fwd(t, c, bw, block_i=16, block_j=16, block_d=16)
    torch.testing.assert_close(got.float(), ref.mmd_rowsums(t.float(), c, bw), atol=2e-2, rtol=1e-2)


def test_mmd_kernel_wide_features_default_blocks(tk: ModuleType) -> None:
    # d > 256 selects the smaller backward tiles; default forward blocks.
    gen = _gen(9)
    t = torch.randn(19, 300, dtype=D64, generator=gen).requires_grad_()
    c = torch.randn(19, dtype=D64, generator=gen)
    bw = ref.mmd_bandwidths(t, 2.0, 5)
    expected = ref.mmd_rowsums(t, c, bw)
    torch.testing.assert_close(tk.mmd_fwd(t.detach(), c, bw), expected.detach())
    gr = torch.randn(19, dtype=D64, generator=gen)
    (exp_dt,) = torch.autograd.grad(expected, t, gr)
    torch.testing.assert_close(tk.mmd_bwd(t.detach(), c, bw, gr), exp_dt)


@pytest.mark.parametrize(
    ("n", "d", "blocks"),
    [
        (23, 40, {"block_i": 16, "block_j": 16, "block_d": 16, "block_do": 16}),  # 3 chunks
        (17, 33, {"block_i": 16, "block_j": 16, "block_d": 16, "block_do": 32}),  # 1 + edge
        (9, 1024, {}),  # MMD_MAX_DIM with the default tiles: 8 output chunks
    ],
)
def test_mmd_kernel_bwd_tiles_the_feature_dimension(
    tk: ModuleType, n: int, d: int, blocks: dict[str, int]
) -> None:
    # The backward's accumulator spans block_do features, not d (issue 19): every chunk,
    # the partial last one included, must equal the reference gradient.
    gen = _gen(n * d)
    t = torch.randn(n, d, dtype=D64, generator=gen).requires_grad_()
    c = torch.randn(n, dtype=D64, generator=gen)
    bw = ref.mmd_bandwidths(t, 2.0, 3)
    gr = torch.randn(n, dtype=D64, generator=gen)
    (exp_dt,) = torch.autograd.grad(ref.mmd_rowsums(t, c, bw), t, gr)
    dt = tk.mmd_bwd(t.detach(), c, bw, gr, **blocks)
    torch.testing.assert_close(dt, exp_dt)
