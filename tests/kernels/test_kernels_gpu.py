"""The same comparisons on CUDA, where the compiled Triton kernels run (skipped without a GPU).

Tolerances allow TF32 dots (PyTorch's default fp32 matmul precision on these GPUs may
be TF32 too) and near-tie argmin flips in k-means; a GPU compile is the only proof
that the kernels build, since the interpreter accepts shapes the compiler rejects.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn import functional as nnf

from sourcefree.kernels import (
    dispatch,
    gaussian_mmd,
    kmeans_assign,
    margin_ce_im,
    swav_loss,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _on_cuda_and_cpu(
    run: Callable[[str], tuple[torch.Tensor, ...]],
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``run("cuda")`` and ``run("cpu")`` with full fp32 matmul precision (no TF32)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return run("cuda"), run("cpu")
    finally:
        torch.set_float32_matmul_precision(prev)


def test_gpu_takes_triton_path() -> None:
    pytest.importorskip("triton")
    assert dispatch.use_triton(torch.zeros(1, device="cuda"))
    assert not dispatch.use_triton(torch.zeros(1, device="cuda", dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "d"), [(1, 1, 8), (1000, 37, 61), (20000, 1000, 512)])
def test_gpu_kmeans(n: int, k: int, d: int, dtype: torch.dtype) -> None:
    g = _gen(n + k)
    x = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    labels, dist = kmeans_assign(x.cuda(), c.cuda())
    exp_labels, exp_dist = kmeans_assign(x.double(), c.double())
    agree = (labels.cpu() == exp_labels).double().mean().item()
    assert agree >= 0.995
    rel = ((dist.double().cpu() - exp_dist).abs() / exp_dist.clamp_min(1.0)).max().item()
    assert rel < (1e-2 if dtype != torch.float32 else 2e-3)


@pytest.mark.parametrize(("b", "k", "q"), [(1, 3, 0), (64, 300, 0), (256, 3000, 512)])
def test_gpu_swav(b: int, k: int, q: int) -> None:
    g = _gen(b + k)

    def crops(n: int) -> list[torch.Tensor]:
        return [nnf.normalize(torch.randn(b, 128, generator=g), dim=1) for _ in range(n)]

    protos = nnf.normalize(torch.randn(k, 128, generator=g), dim=1)
    hi = [c @ protos.t() for c in crops(2)]
    lo = [c @ protos.t() for c in crops(2)]
    queue = None
    if q:
        queue = [nnf.normalize(torch.randn(q, 128, generator=g), dim=1) @ protos.t()] * 2

    def run(dev: str) -> tuple[torch.Tensor, ...]:
        leaves = [t.to(dev).requires_grad_() for t in hi + lo]
        qq = None if queue is None else [t.to(dev) for t in queue]
        loss = swav_loss(leaves[:2], leaves[2:], qq)
        return (loss.detach().cpu(), *(gr.cpu() for gr in torch.autograd.grad(loss, leaves)))

    got, expected = run("cuda"), run("cpu")
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("classes", [1, 7, 100, 1000])
def test_gpu_margin_ce(classes: int) -> None:
    g = _gen(classes)
    x0 = torch.randn(513, classes, generator=g)
    y = torch.randint(0, classes, (513,), generator=g)
    m = torch.rand(classes, generator=g)

    def run(dev: str) -> tuple[torch.Tensor, ...]:
        x = x0.to(dev).requires_grad_()
        terms = margin_ce_im(
            x, y.to(dev), margins=m.to(dev), scale=4.0, label_smoothing=0.1, entropy_eps=1e-5
        )
        return (
            *(t.detach().cpu() for t in terms),
            torch.autograd.grad(terms.loss(0.3), x)[0].cpu(),
        )

    for a, e in zip(run("cuda"), run("cpu"), strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("n", "d"), [(3, 4), (300, 65), (1024, 512)])
def test_gpu_mmd(n: int, d: int) -> None:
    g = _gen(n + d)
    s0, t0 = torch.randn(n, d, generator=g), torch.randn(n + 5, d, generator=g) + 0.3
    w = torch.rand(n, generator=g)

    def run(dev: str) -> tuple[torch.Tensor, ...]:
        s, t = s0.to(dev).requires_grad_(), t0.to(dev).requires_grad_()
        val = gaussian_mmd(s, t, source_weight=w.to(dev))
        return (val.detach().cpu(), *(gr.cpu() for gr in torch.autograd.grad(val, (s, t))))

    got, expected = _on_cuda_and_cpu(run)
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-3)


def test_gpu_compile_fullgraph_with_custom_ops() -> None:
    x = torch.randn(256, 7, device="cuda", requires_grad=True)
    y = torch.randint(0, 7, (256,), device="cuda")

    def step(x: torch.Tensor) -> torch.Tensor:
        return margin_ce_im(x, y, scale=2.0).loss(0.3)

    compiled = torch.compile(step, fullgraph=True)
    (gc,) = torch.autograd.grad(compiled(x), x)
    (ge,) = torch.autograd.grad(step(x), x)
    torch.testing.assert_close(gc, ge)


# -- issue 19: tile edges, bf16, gradients through k-means, offsets past 2**31 ------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().cpu(), b.double().cpu()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "d"), [(15, 16), (64, 127), (65, 128), (129, 129), (300, 1024)])
def test_gpu_mmd_tile_edges(n: int, d: int, dtype: torch.dtype) -> None:
    g = _gen(n * d)
    s0 = torch.randn(n, d, generator=g).to(dtype)
    t0 = (torch.randn(n + 1, d, generator=g) + 0.3).to(dtype)

    def run(dev: str) -> tuple[torch.Tensor, ...]:
        s, t = s0.to(dev).requires_grad_(), t0.to(dev).requires_grad_()
        val = gaussian_mmd(s, t)
        return (val.detach(), *torch.autograd.grad(val, (s, t)))

    got = run("cuda")
    expected = (t.float() for t in run("cpu")) if dtype == torch.bfloat16 else run("cpu")
    for a, e in zip(got, expected, strict=True):
        assert torch.isfinite(a).all()
        assert _rel(a, e) < (2e-2 if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "c"), [(1, 2), (31, 8), (257, 1023), (64, 4097), (16, 8192)])
def test_gpu_margin_ce_tile_edges(b: int, c: int, dtype: torch.dtype) -> None:
    g = _gen(b + c)
    x0 = torch.randn(b, c, generator=g).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)

    def run(dev: str) -> tuple[torch.Tensor, ...]:
        x = x0.to(dev).requires_grad_()
        terms = margin_ce_im(x, y.to(dev), scale=2.0, label_smoothing=0.1, entropy_eps=1e-5)
        return (*(t.detach() for t in terms), torch.autograd.grad(terms.loss(0.3), x)[0])

    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16 gradients: rounding flips
    for a, e in zip(run("cuda"), run("cpu"), strict=True):
        assert _rel(a, e) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "k"), [(1, 1), (17, 129), (255, 3001)])
def test_gpu_swav_tile_edges(b: int, k: int, dtype: torch.dtype) -> None:
    g = _gen(b * k)
    crops = [nnf.normalize(torch.randn(b, k, generator=g), dim=1).to(dtype) for _ in range(3)]

    def run(dev: str) -> tuple[torch.Tensor, ...]:
        leaves = [c.to(dev).requires_grad_() for c in crops]
        loss = swav_loss(leaves[:2], leaves[2:])
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    tol = 1e-3 if dtype == torch.float32 else 1e-2  # bf16 gradients: rounding flips
    for a, e in zip(run("cuda"), run("cpu"), strict=True):
        assert _rel(a, e) < tol


def test_gpu_kmeans_keeps_gradients_like_the_cpu() -> None:
    g = _gen(11)
    x0, c0 = torch.randn(200, 33, generator=g), torch.randn(7, 33, generator=g)

    def run(dev: str) -> tuple[torch.Tensor, ...]:
        x, c = x0.to(dev).requires_grad_(), c0.to(dev).requires_grad_()
        labels, dist = kmeans_assign(x, c)
        return (labels, dist.detach(), *torch.autograd.grad(dist.sum(), (x, c)))

    got, expected = _on_cuda_and_cpu(run)
    assert torch.equal(got[0].cpu(), expected[0])
    for a, e in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(a.cpu(), e, atol=1e-4, rtol=1e-4)


def _free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def test_gpu_kmeans_rows_past_2_31_elements() -> None:
    # 4.2M x 512 fp32 points: row * 512 passes 2**31 in the last ~2k rows.
    n, d = (2**31) // 512 + 4096, 512
    if _free_gib() < 3 * n * d * 4 / 2**30:
        pytest.skip("needs about 26 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    c = torch.randn(16, d, device="cuda", generator=g)
    x = c[torch.arange(n, device="cuda") % 16] + 0.01 * torch.randn(
        n, d, device="cuda", generator=g
    )
    labels, _ = kmeans_assign(x, c)
    tail = slice(n - 8192, n)
    assert torch.equal(labels[tail], torch.arange(n, device="cuda")[tail] % 16)
    del x


def test_gpu_margin_ce_rows_past_2_31_elements() -> None:
    from sourcefree.kernels import reference as ref
    from sourcefree.kernels import triton_kernels as tk

    b, c = (2**31) // 1024 + 512, 1024
    if _free_gib() < 3 * b * c * 2 / 2**30:
        pytest.skip("needs about 13 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(b, c, device="cuda", generator=g, dtype=torch.bfloat16)
    y = torch.randint(0, c, (b,), device="cuda", generator=g)
    m = torch.zeros(c, device="cuda")
    ones = torch.ones(b, device="cuda", dtype=torch.bfloat16)
    dx = tk.margin_ce_bwd(x, y, m, 1.0, 0.0, 0.0, ones, ones, torch.zeros(c, device="cuda"))
    tail = slice(b - 1024, b)
    xt = x[tail].float().requires_grad_()
    ce, ent, _ = ref.margin_ce_rows(xt, y[tail], m, 1.0, 0.0, 0.0)
    (expected,) = torch.autograd.grad((ce + ent).sum(), xt)
    assert _rel(dx[tail].float(), expected) < 2e-2
