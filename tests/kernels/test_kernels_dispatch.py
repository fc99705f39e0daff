"""The dispatchers: Triton path through the custom ops (interpreter), routing rules, compile."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.nn import functional as nnf

from sourcefree.kernels import (
    api,
    dispatch,
    gaussian_mmd,
    kmeans_assign,
    margin_ce_im,
    swav_loss,
)

D64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def force_triton(tk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Route CPU tensors to the custom ops (as CUDA tensors would be), or back."""

    def set_(on: bool) -> None:
        monkeypatch.setattr(api, "use_triton", lambda t: on)

    return set_


def _both(force: Callable[[bool], None], fn: Callable[[], Any]) -> tuple[Any, Any]:
    force(False)
    expected = fn()
    force(True)
    got = fn()
    force(False)
    return got, expected


def test_kmeans_dispatch_paths_agree(force_triton: Callable[[bool], None]) -> None:
    g = _gen(0)
    x, c = torch.randn(33, 10, generator=g), torch.randn(4, 10, generator=g)
    got, expected = _both(force_triton, lambda: kmeans_assign(x, c))
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)


def test_swav_dispatch_paths_agree(force_triton: Callable[[bool], None]) -> None:
    g = _gen(1)
    crops = [nnf.normalize(torch.randn(6, 9, dtype=D64, generator=g), dim=1) for _ in range(3)]
    queue = [nnf.normalize(torch.randn(5, 9, dtype=D64, generator=g), dim=1) for _ in range(2)]

    def run() -> tuple[torch.Tensor, ...]:
        leaves = [c.clone().requires_grad_() for c in crops]
        loss = swav_loss(leaves[:2], leaves[2:], queue)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    got, expected = _both(force_triton, run)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_margin_ce_dispatch_paths_agree(force_triton: Callable[[bool], None]) -> None:
    g = _gen(2)
    x0 = torch.randn(10, 7, dtype=D64, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, -1, 2, 3])
    w0 = torch.rand(10, dtype=D64, generator=g)
    mask = torch.rand(10, generator=g) > 0.3
    m = torch.rand(7, dtype=D64, generator=g)

    def run() -> tuple[torch.Tensor, ...]:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        terms = margin_ce_im(
            x,
            y,
            margins=m,
            scale=4.0,
            label_smoothing=0.1,
            weight=w,
            mask=mask,
            entropy_eps=1e-5,
        )
        loss = terms.loss(0.3)
        return (*terms, *torch.autograd.grad(loss, (x, w)))

    got, expected = _both(force_triton, run)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_mmd_dispatch_paths_agree(force_triton: Callable[[bool], None]) -> None:
    g = _gen(3)
    s0, t0 = torch.randn(9, 6, dtype=D64, generator=g), torch.randn(8, 6, dtype=D64, generator=g)
    w = torch.rand(9, dtype=D64, generator=g)

    def run() -> tuple[torch.Tensor, ...]:
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        val = gaussian_mmd(s, t, source_weight=w)
        return (val.detach(), *torch.autograd.grad(val, (s, t)))

    got, expected = _both(force_triton, run)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_custom_op_gradcheck_float64(tk: ModuleType) -> None:
    from sourcefree.kernels.custom_ops import margin_ce_op, mmd_rowsums_op

    g = _gen(4)
    x = torch.randn(3, 5, dtype=D64, generator=g).requires_grad_()
    y = torch.tensor([0, 4, 2])
    m = torch.rand(5, dtype=D64, generator=g)
    assert torch.autograd.gradcheck(lambda x: margin_ce_op(x, y, m, 2.0, 0.1, 1e-5), (x,))
    t = torch.randn(4, 3, dtype=D64, generator=g).requires_grad_()
    c = torch.randn(4, dtype=D64, generator=g)
    bw = torch.tensor([0.5, 2.0], dtype=D64)
    assert torch.autograd.gradcheck(lambda t: mmd_rowsums_op(t, c, bw), (t,))


def test_custom_ops_opcheck(tk: ModuleType) -> None:
    from sourcefree.kernels import custom_ops as ops

    g = _gen(5)
    x = torch.randn(4, 6, dtype=D64, generator=g, requires_grad=True)
    s = torch.randn(5, 6, dtype=D64, generator=g)
    f, gg = torch.zeros(6, dtype=D64), torch.zeros(5, dtype=D64)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(ops.kmeans_assign_op, (x.detach(), s), test_utils=tests)
    torch.library.opcheck(ops.sinkhorn_potentials_op, (s, 0.05, 2), test_utils=tests)
    torch.library.opcheck(ops.swapped_ce_op, (x, s, f, gg, 0.05, 0.1), test_utils=tests)
    y = torch.tensor([0, 5, 1, 2])
    torch.library.opcheck(
        ops.margin_ce_op, (x, y, torch.zeros(6, dtype=D64), 1.0, 0.0, 0.0), test_utils=tests
    )
    torch.library.opcheck(
        ops.mmd_rowsums_op,
        (x, torch.randn(4, dtype=D64), torch.ones(2, dtype=D64)),
        test_utils=tests,
    )


def test_use_triton_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(2, 2)
    assert not dispatch.use_triton(cpu)  # CPU: always the reference
    monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "1")
    assert dispatch._env_flag(dispatch.DISABLE_TRITON_ENV)
    monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "0")
    assert not dispatch._env_flag(dispatch.DISABLE_TRITON_ENV)
    assert not dispatch.exporting()


def test_compiled_reference_used_above_threshold_and_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def fake_compile(fn: Callable[..., Any]) -> Callable[..., Any]:
        def broken(*args: Any, **kwargs: Any) -> Any:
            calls.append("compiled")
            raise RuntimeError("no C++ compiler")

        return broken

    monkeypatch.delenv(dispatch.DISABLE_COMPILE_ENV)
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setitem(dispatch.COMPILE_MIN_NUMEL, "margin_ce", 8)
    dispatch.reset_compiled()
    try:
        x = torch.randn(4, 3)
        small = margin_ce_im(x[:2, :3])  # 6 elements: eager, compile never attempted
        assert calls == []
        with pytest.warns(RuntimeWarning, match="torch.compile of margin_ce failed"):
            terms = margin_ce_im(x)
        assert calls == ["compiled"]
        torch.testing.assert_close(terms.entropy, margin_ce_im(x).entropy)
        assert calls == ["compiled"]  # marked broken: eager from now on
        assert small.ce.item() == 0.0
        monkeypatch.setenv(dispatch.DISABLE_COMPILE_ENV, "1")
        dispatch.reset_compiled()
        margin_ce_im(x)
        assert calls == ["compiled"]
    finally:
        dispatch.reset_compiled()


@pytest.mark.slow
def test_compiled_reference_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.DISABLE_COMPILE_ENV)
    monkeypatch.setitem(dispatch.COMPILE_MIN_NUMEL, "margin_ce", 1)
    dispatch.reset_compiled()
    try:
        x = torch.randn(64, 7, requires_grad=True)
        y = torch.randint(0, 7, (64,))
        got = margin_ce_im(x, y, scale=2.0).loss(0.3)
        (gx,) = torch.autograd.grad(got, x)
        monkeypatch.setenv(dispatch.DISABLE_COMPILE_ENV, "1")
        expected = margin_ce_im(x, y, scale=2.0).loss(0.3)
        (ex,) = torch.autograd.grad(expected, x)
        assert "margin_ce" in dispatch._compiled
        assert "margin_ce" not in dispatch._broken
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(gx, ex)
    finally:
        dispatch.reset_compiled()


def test_package_imports_and_runs_without_triton() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import sourcefree.kernels as k
        from sourcefree.kernels import dispatch
        assert not dispatch.triton_available()
        x = torch.randn(5, 3)
        k.kmeans_assign(x, x[:2]); k.swav_loss([x, x]); k.margin_ce_im(x); k.gaussian_mmd(x, x)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("grad_of", ["x", "centroids"])
def test_kmeans_needing_gradients_skips_the_kernel(
    force_triton: Callable[[bool], None], grad_of: str
) -> None:
    # The Triton op has no autograd rule: on CUDA a call that needs gradients must take
    # the differentiable reference, as the CPU does, instead of failing in backward.
    g = _gen(6)
    x0, c0 = torch.randn(21, 5, generator=g), torch.randn(4, 5, generator=g)

    def run() -> tuple[torch.Tensor, ...]:
        x = x0.clone().requires_grad_(grad_of == "x")
        c = c0.clone().requires_grad_(grad_of == "centroids")
        labels, dist = kmeans_assign(x, c)
        leaf = x if grad_of == "x" else c
        return (labels, dist.detach(), *torch.autograd.grad(dist.sum(), leaf))

    got, expected = _both(force_triton, run)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_kmeans_without_gradients_still_takes_the_kernel(
    force_triton: Callable[[bool], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourcefree.kernels import custom_ops

    calls: list[int] = []
    real = custom_ops.kmeans_assign_op

    def counting(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(x.shape[0])
        out: tuple[torch.Tensor, torch.Tensor] = real(x, c)
        return out

    monkeypatch.setattr(custom_ops, "kmeans_assign_op", counting)
    force_triton(True)
    x = torch.randn(9, 3, generator=_gen(7), requires_grad=True)
    with torch.no_grad():
        kmeans_assign(x, x[:2].detach())
    kmeans_assign(x.detach(), x[:2].detach())
    kmeans_assign(x, x[:2].detach())  # needs gradients: the reference
    assert calls == [9, 9]
