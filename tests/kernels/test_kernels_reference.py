"""The PyTorch references: float64 gradcheck, and agreement with the published formulations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as nnf

from sourcefree.errors import InputError
from sourcefree.kernels import (
    gaussian_mmd,
    kmeans_assign,
    ldam_margins,
    margin_ce_im,
    sinkhorn_codes,
    swav_loss,
)
from sourcefree.kernels import reference as ref

D64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cos_scores(rows: int, k: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return nnf.normalize(torch.randn(rows, k, dtype=dtype, generator=g), dim=1)


# ------------------------------------------------------------------------ K-means


def test_kmeans_reference_matches_brute_force() -> None:
    g = _gen()
    x = torch.randn(50, 9, dtype=D64, generator=g)
    c = torch.randn(6, 9, dtype=D64, generator=g)
    labels, dist = kmeans_assign(x, c, chunk_size=7)
    full = torch.cdist(x, c) ** 2
    assert torch.equal(labels, full.argmin(1))
    torch.testing.assert_close(dist, full.min(1).values)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_kmeans_nograd_path_is_bitwise_the_reference(dtype: torch.dtype, chunk: int) -> None:
    g = _gen(3)
    x = torch.randn(203, 17, dtype=dtype, generator=g)
    c = torch.cat([x[:5], torch.randn(6, 17, dtype=dtype, generator=g)])  # exact hits: dist 0
    got = ref.kmeans_assign_nograd(x, c, chunk_size=chunk)
    expected = ref.kmeans_assign(x, c, chunk_size=chunk)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    assert torch.equal(kmeans_assign(x, c, chunk_size=chunk)[0], expected[0])


def test_kmeans_dispatcher_keeps_gradients() -> None:
    g = _gen(4)
    x = torch.randn(30, 5, dtype=D64, generator=g)
    c = torch.randn(4, 5, dtype=D64, generator=g, requires_grad=True)
    _, dist = kmeans_assign(x, c, chunk_size=8)
    dist.sum().backward()  # type: ignore[no-untyped-call]
    assert c.grad is not None and bool(c.grad.abs().sum() > 0)
    with torch.no_grad():
        assert not kmeans_assign(x, c)[1].requires_grad


def test_kmeans_rejects_bad_inputs() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(InputError):
        kmeans_assign(x, torch.randn(2, 4))
    with pytest.raises(InputError):
        kmeans_assign(x, torch.randn(2, 3, dtype=D64))
    with pytest.raises(InputError):
        kmeans_assign(x.long(), torch.randn(2, 3).long())
    with pytest.raises(InputError):
        kmeans_assign(x, torch.randn(0, 3))


# ----------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_sinkhorn_equals_swav_exp_form(dtype: torch.dtype) -> None:
    swav = pytest.importorskip("lightly.loss.swav_loss")
    s = _cos_scores(96, 40, dtype, _gen(1))
    for iters in (1, 3, 5):
        expected = swav.sinkhorn(s, iterations=iters, epsilon=0.05)
        got = sinkhorn_codes(s, epsilon=0.05, iterations=iters)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_sinkhorn_finite_where_exp_form_overflows() -> None:
    swav = pytest.importorskip("lightly.loss.swav_loss")
    s = torch.randn(16, 24, generator=_gen(2)) * 2
    assert swav.sinkhorn(s, epsilon=0.02).isnan().any()
    q = sinkhorn_codes(s, epsilon=0.02)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(16))
    # Same math in float64 with a global shift, where exp(-400) is still representable.
    expected = swav.sinkhorn((s.double() - s.max()), epsilon=0.02)
    torch.testing.assert_close(sinkhorn_codes(s.double(), epsilon=0.02), expected)
    # fp32 rounds s / eps (|s / eps| ~ 300) to ~2e-5 absolute, hence the tolerance.
    torch.testing.assert_close(q, expected.float(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_swav_loss_equals_lightly(dtype: torch.dtype) -> None:
    swav = pytest.importorskip("lightly.loss.swav_loss")
    g = _gen(3)
    hi = [_cos_scores(12, 20, dtype, g).requires_grad_() for _ in range(2)]
    lo = [_cos_scores(12, 20, dtype, g).requires_grad_() for _ in range(3)]
    queue = [_cos_scores(30, 20, dtype, g) for _ in range(2)]
    for q in (None, queue):
        expected = swav.SwaVLoss()(hi, lo, q).sum()
        got = swav_loss(hi, lo, q)
        assert got.shape == ()
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        g_exp = torch.autograd.grad(expected, hi + lo)
        g_got = torch.autograd.grad(got, hi + lo)
        for a, b in zip(g_got, g_exp, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_swav_loss_casts_half_to_fp32() -> None:
    g = _gen(4)
    crops = [_cos_scores(8, 10, torch.float32, g) for _ in range(2)]
    out = swav_loss([c.bfloat16() for c in crops])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, swav_loss([c.bfloat16().float() for c in crops]))


def test_swav_loss_rejects_bad_crops() -> None:
    a = torch.randn(4, 5)
    with pytest.raises(InputError):
        swav_loss([a])
    with pytest.raises(InputError):
        swav_loss([a, torch.randn(3, 5)])
    with pytest.raises(InputError):
        swav_loss([a, a], queue=[torch.randn(6, 5)])
    with pytest.raises(InputError):
        swav_loss([a, a], epsilon=0.0)


def test_swapped_ce_gradcheck() -> None:
    g = _gen(5)
    s = _cos_scores(9, 6, D64, g)
    f, gg = ref.sinkhorn_potentials(s, 0.05, 3)
    z = _cos_scores(7, 6, D64, g).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: ref.swapped_ce_rows(z, s, f, gg, 0.05, 0.1), (z,))


# ---------------------------------------------------------------------- margin CE


@pytest.mark.parametrize("eps", [0.0, 1e-5])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_margin_ce_rows_gradcheck(eps: float, smoothing: float) -> None:
    g = _gen(6)
    x = torch.randn(5, 7, dtype=D64, generator=g).requires_grad_()
    y = torch.randint(0, 7, (5,), generator=g)
    m = torch.rand(7, dtype=D64, generator=g)
    assert torch.autograd.gradcheck(
        lambda x: ref.margin_ce_rows(x, y, m, 3.0, smoothing, eps), (x,)
    )


def test_margin_ce_plain_equals_cross_entropy() -> None:
    g = _gen(7)
    x = torch.randn(11, 5, dtype=D64, generator=g)
    y = torch.randint(0, 5, (11,), generator=g)
    terms = margin_ce_im(x, y, label_smoothing=0.1)
    torch.testing.assert_close(terms.ce, nnf.cross_entropy(x, y, label_smoothing=0.1))


def test_margin_ce_ldam_margins_and_scale() -> None:
    g = _gen(8)
    counts = [100, 20, 5]
    m = ldam_margins(counts, max_margin=0.5)
    expected_m = torch.tensor([c**-0.25 for c in counts])
    torch.testing.assert_close(m, expected_m * 0.5 / expected_m.max())
    x = torch.randn(6, 3, dtype=D64, generator=g)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    terms = margin_ce_im(x, y, margins=m, scale=30.0)
    shifted = x - nnf.one_hot(y, 3).to(D64) * m.to(D64)[y].unsqueeze(1)
    torch.testing.assert_close(terms.ce, nnf.cross_entropy(30.0 * shifted, y))
    with pytest.raises(InputError):
        ldam_margins([3, 0])


def test_margin_ce_shot_im_exact() -> None:
    g = _gen(9)
    x = torch.randn(16, 7, dtype=D64, generator=g)
    pseudo = torch.randint(0, 7, (16,), generator=g)
    terms = margin_ce_im(x, pseudo, entropy_eps=1e-5)
    # SHOT (Liang et al. 2020): Entropy(p) = -sum p log(p + 1e-5); IM = mean H - H(mean p).
    p = torch.softmax(x, dim=1)
    ent = (-(p * torch.log(p + 1e-5)).sum(1)).mean()
    mp = p.mean(0)
    div = -(mp * torch.log(mp + 1e-5)).sum()
    torch.testing.assert_close(terms.entropy, ent)
    torch.testing.assert_close(terms.diversity, div)
    torch.testing.assert_close(
        terms.loss(ce_weight=0.3), 0.3 * nnf.cross_entropy(x, pseudo) + ent - div
    )
    exact = margin_ce_im(x, pseudo)
    torch.testing.assert_close(exact.entropy, (-(p * p.log()).sum(1)).mean())


def test_margin_ce_weights_masks_and_missing_labels() -> None:
    g = _gen(10)
    x = torch.randn(8, 4, dtype=D64, generator=g)
    y = torch.tensor([0, 1, 2, 3, -100, 1, 2, 9])
    w = torch.rand(8, dtype=D64, generator=g)
    mask = torch.tensor([True, True, False, True, True, True, True, True])
    terms = margin_ce_im(x, y, weight=w, mask=mask)
    keep = torch.tensor([0, 1, 3, 5, 6])
    rows = nnf.cross_entropy(x[keep], y[keep], reduction="none")
    torch.testing.assert_close(terms.ce, (w[keep] * rows).sum() / 5)
    none = margin_ce_im(x)
    assert none.ce.item() == 0.0
    torch.testing.assert_close(none.entropy, terms.entropy)
    with pytest.raises(InputError):
        margin_ce_im(x, y[:3])
    with pytest.raises(InputError):
        margin_ce_im(x, y.double())
    with pytest.raises(InputError):
        margin_ce_im(x, y, label_smoothing=1.0)


# ---------------------------------------------------------------------------- MMD


def _dan_mmd(src: torch.Tensor, tgt: torch.Tensor, mul: float, num: int) -> torch.Tensor:
    """DAN's broadcast formulation (the published one), for comparison only."""
    total = torch.cat([src, tgt])
    l2 = ((total.unsqueeze(0) - total.unsqueeze(1)) ** 2).sum(2)
    n = total.shape[0]
    bw = l2.detach().sum() / (n * n - n) / mul ** (num // 2)
    kern = sum(torch.exp(-l2 / (bw * mul**i)) for i in range(num))
    assert isinstance(kern, torch.Tensor)
    b = src.shape[0]
    return kern[:b, :b].mean() + kern[b:, b:].mean() - kern[:b, b:].mean() - kern[b:, :b].mean()


def test_mmd_equals_dan_unweighted() -> None:
    g = _gen(11)
    src = torch.randn(12, 5, dtype=D64, generator=g).requires_grad_()
    tgt = (torch.randn(9, 5, dtype=D64, generator=g) + 0.5).requires_grad_()
    got = gaussian_mmd(src, tgt)
    expected = _dan_mmd(src, tgt, 2.0, 5)
    torch.testing.assert_close(got, expected)
    for a, b in zip(
        torch.autograd.grad(got, (src, tgt)), torch.autograd.grad(expected, (src, tgt)), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_mmd_weighted_definition() -> None:
    g = _gen(12)
    src = torch.randn(6, 4, dtype=D64, generator=g)
    tgt = torch.randn(5, 4, dtype=D64, generator=g)
    w = torch.rand(6, dtype=D64, generator=g)
    v = torch.rand(5, dtype=D64, generator=g)
    bw = torch.tensor([0.5, 2.0], dtype=D64)
    got = gaussian_mmd(src, tgt, source_weight=w, target_weight=v, bandwidths=bw)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(a, b) ** 2
        return torch.exp(-d / 0.5) + torch.exp(-d / 2.0)

    wn, vn = w / w.sum(), v / v.sum()
    expected = wn @ k(src, src) @ wn + vn @ k(tgt, tgt) @ vn - 2 * wn @ k(src, tgt) @ vn
    torch.testing.assert_close(got, expected)
    # Uniform weights are the default.
    torch.testing.assert_close(
        gaussian_mmd(src, tgt, bandwidths=bw),
        gaussian_mmd(
            src, tgt, source_weight=torch.ones(6), target_weight=torch.ones(5) * 3, bandwidths=bw
        ),
    )
    with pytest.raises(InputError):
        gaussian_mmd(src, tgt, source_weight=-w)
    with pytest.raises(InputError):
        gaussian_mmd(src, tgt[:, :3])


def test_mmd_bandwidth_closed_form() -> None:
    t = torch.randn(17, 6, dtype=D64, generator=_gen(13))
    pair = (torch.cdist(t, t) ** 2).sum() / (17 * 16)
    bw = ref.mmd_bandwidths(t, 2.0, 5)
    torch.testing.assert_close(bw, pair / 4 * torch.tensor([1.0, 2, 4, 8, 16], dtype=D64))
    assert math.isfinite(float(ref.mmd_bandwidths(torch.ones(3, 2), 2.0, 3)[0]))


def test_mmd_rowsums_gradcheck() -> None:
    g = _gen(14)
    t = torch.randn(7, 3, dtype=D64, generator=g).requires_grad_()
    c = torch.randn(7, dtype=D64, generator=g)
    bw = torch.tensor([0.7, 3.0], dtype=D64)
    assert torch.autograd.gradcheck(lambda t: ref.mmd_rowsums(t, c, bw), (t,))
