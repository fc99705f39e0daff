"""Source-free DIFC: eq. 3 margins, eq. 5 confusion scores, eq. 6 increments, the loss, state."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sourcefree.adapters.difc import (
    Difc,
    DifcConfig,
    confusion_margins,
    confusion_scores,
    cosine_logits,
    difc_terms,
    imbalance_margins,
)
from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.data.synthetic import generate
from sourcefree.engine.method import Batch, EpochInfo, MethodContext, SourceModel, TargetData
from sourcefree.engine.models import load_classifier
from sourcefree.engine.registry import get_method
from sourcefree.engine.trainer import build_optimizer
from sourcefree.errors import ConfigError
from sourcefree.ops.augment import FlipShiftConfig
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec


def _data(n: int = 40) -> TargetData:
    s = generate("wild-mild", n, 32, seed=6)
    return TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="x")


def _ctx(pkg_path: Path, data: TargetData) -> MethodContext:
    pkg = load_package(pkg_path)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    return MethodContext((SourceModel(pkg, model),), data, torch.device("cpu"), 0)


def test_registered_with_paper_defaults() -> None:
    assert get_method("difc") is Difc
    cfg = DifcConfig()
    assert (cfg.max_margin, cfg.eps) == (0.3, 0.02)
    with pytest.raises(ConfigError):
        DifcConfig(beta=0.0)
    with pytest.raises(ConfigError):
        DifcConfig(max_margin=0.0)
    assert (cfg.margin_logits, cfg.scale) == ("raw", 30.0)  # eq. 3 as written; LDAM's s = 30
    with pytest.raises(ConfigError, match="margin_logits='cosine'"):
        DifcConfig(margin_logits="cosine")  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="scale"):
            DifcConfig(scale=bad)


# A tiny feature / head pair: rows f, head W (rows w_k), bias b, pseudo-labels y, margins m.
F_TINY = torch.tensor([[3.0, 4.0], [1.0, 0.0], [2.0, 1.0]])
W_TINY = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
B_TINY = torch.tensor([0.5, -0.5])
Y_TINY = torch.tensor([0, 1, 1])
M_TINY = torch.tensor([0.3, 0.1])


def _two_class_ce(z_y: float, z_other: float) -> float:
    return math.log1p(math.exp(z_other - z_y))


def _tiny_im() -> tuple[float, float]:
    logits = F_TINY @ W_TINY.T + B_TINY  # [[3.5, 7.5], [1.5, -0.5], [2.5, 1.5]]
    p = torch.softmax(logits.double(), 1)
    ent = float(-(p * torch.log(p + 1e-5)).sum(1).mean())
    pm = p.mean(0)
    return ent, float(-(pm * torch.log(pm + 1e-5)).sum())


def test_raw_margin_loss_keeps_the_old_value() -> None:
    logits = F_TINY @ W_TINY.T + B_TINY
    got = difc_terms(logits, F_TINY, W_TINY, Y_TINY, M_TINY, margin_logits="raw")
    # eq. 3 on raw logits: z_y - Delta_y, scale 1
    hand = [_two_class_ce(3.5 - 0.3, 7.5), _two_class_ce(-0.5 - 0.1, 1.5)]
    hand.append(_two_class_ce(1.5 - 0.1, 2.5))
    assert float(got.ce) == pytest.approx(sum(hand) / 3, rel=1e-6)
    # the values the code gave before margin_logits existed (pinned)
    old = (2.638777494430542, 0.34585726261138916, 0.6893759965896606)
    assert [float(t) for t in got] == pytest.approx(old, rel=1e-6)
    ent, div = _tiny_im()
    assert (float(got.entropy), float(got.diversity)) == pytest.approx((ent, div), rel=1e-5)


@pytest.mark.parametrize("scale", [30.0, 2.0])
def test_normalised_margin_loss_by_hand(scale: float) -> None:
    cos = cosine_logits(F_TINY, W_TINY)  # unit rows of W: e_0, e_1
    want_cos = [[0.6, 0.8], [1.0, 0.0], [2 / math.sqrt(5), 1 / math.sqrt(5)]]
    assert cos.tolist() == [pytest.approx(r, abs=1e-7) for r in want_cos]
    logits = F_TINY @ W_TINY.T + B_TINY
    got = difc_terms(
        logits, F_TINY, W_TINY, Y_TINY, M_TINY, margin_logits="normalised", scale=scale
    )
    # CE(s * (cos - m_y e_y), y); the bias takes no part
    c3 = want_cos[2]
    hand = [
        _two_class_ce(scale * (0.6 - 0.3), scale * 0.8),
        _two_class_ce(scale * (0.0 - 0.1), scale * 1.0),
        _two_class_ce(scale * (c3[1] - 0.1), scale * c3[0]),
    ]
    assert float(got.ce) == pytest.approx(sum(hand) / 3, rel=1e-6)
    ent, div = _tiny_im()  # IM terms stay on the head's own logits
    assert (float(got.entropy), float(got.diversity)) == pytest.approx((ent, div), rel=1e-5)
    # no pseudo-labels: IM terms only, CE 0
    im_only = difc_terms(logits, F_TINY, W_TINY, None, M_TINY, margin_logits="normalised")
    assert float(im_only.ce) == 0.0 and float(im_only.entropy) == pytest.approx(ent, rel=1e-5)


def test_normalised_margin_gradient_reaches_features_not_head() -> None:
    f = F_TINY.clone().requires_grad_(True)
    w = W_TINY.clone().requires_grad_(True)
    logits = (f @ w.T + B_TINY).detach()  # isolate the margin CE
    terms = difc_terms(logits, f, w, Y_TINY, M_TINY, margin_logits="normalised")
    terms.ce.backward()  # type: ignore[no-untyped-call]
    assert f.grad is not None and bool(f.grad.abs().sum() > 0)
    assert w.grad is None  # the frozen head's weight is only read
    # scaling a feature row changes no cosine: the gradient is orthogonal to the row
    assert (f.grad * F_TINY).sum(1).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)


def test_eq3_margins_from_class_counts() -> None:
    counts = [10, 20, 30, 160]
    got = imbalance_margins(counts, 4, 0.3)
    want = [0.3 * (10 / n) ** 0.25 for n in counts]  # gamma / N^(1/4), largest = 0.3
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert float(got.max()) == pytest.approx(0.3)
    assert imbalance_margins([0, 1], 2, 0.3).tolist() == pytest.approx([0.3, 0.3])
    with pytest.raises(ConfigError):
        imbalance_margins([1, 2], 3)


def test_uniform_margins_and_warning_without_counts() -> None:
    with pytest.warns(UserWarning, match="class_counts"):
        got = imbalance_margins(None, 3, 0.3)
    assert got.tolist() == pytest.approx([0.3, 0.3, 0.3])


def test_eq5_confusion_scores_by_hand() -> None:
    p = torch.tensor(
        [
            [0.7, 0.2, 0.1],  # class 0, gap 0.5
            [0.5, 0.4, 0.1],  # class 0, gap 0.1
            [0.1, 0.8, 0.1],  # class 1, gap 0.7
        ]
    )
    got = confusion_scores(p)
    assert float(got[0]) == pytest.approx(1 / 0.3)
    assert float(got[1]) == pytest.approx(1 / 0.7)
    assert math.isnan(float(got[2]))  # nobody predicted as class 2


def test_eq6_increments_follow_confusion_order() -> None:
    base = torch.tensor([0.1, 0.2, 0.3, 0.25])
    scores = torch.tensor([2.0, 5.0, float("nan"), 3.0], dtype=torch.float64)
    got = confusion_margins(base, scores, 0.02)
    # order: class 1 (5), class 3 (3), class 0 (2), class 2 (no score) -> eps, eps/2, eps/4, eps/8
    want = [0.1 + 0.005, 0.2 + 0.02, 0.3 + 0.0025, 0.25 + 0.01]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert got.dtype == base.dtype


def _epoch(method: Difc, data: TargetData, epoch: int) -> None:
    phase = method.phases()[-1]
    assert phase.on_enter is not None and phase.on_epoch_start is not None
    phase.on_enter()
    phase.on_epoch_start(EpochInfo("adapt", epoch, data, torch.device("cpu")))


def test_margins_recomputed_per_epoch_after_di_stage(source_pkg: Path) -> None:
    data = _data()
    method = Difc(DifcConfig(di_epochs=1), _ctx(source_pkg, data))
    # conftest's package ships class_counts [10, 20, 30]
    base = imbalance_margins([10, 20, 30], 3, 0.3)
    torch.testing.assert_close(method.base_margins, base)
    _epoch(method, data, 0)
    torch.testing.assert_close(method.margins, base)  # DI stage: eq. 3 alone
    _epoch(method, data, 1)
    model = method.model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(data.tensor())[0], 1)
    want = confusion_margins(base, confusion_scores(probs), 0.02)
    torch.testing.assert_close(method.margins, want)
    assert sorted(method.confusion_order) == [0, 1, 2]
    state = method.state_tensors()
    assert set(state) == {"pseudo_labels", "margins"}
    other = Difc(DifcConfig(), _ctx(source_pkg, data))
    other.load_state(state, method.state_meta())
    torch.testing.assert_close(other.margins, method.margins)
    assert other.confusion_order == method.confusion_order


@pytest.mark.parametrize("margin_logits", ["raw", "normalised"])
def test_loss_is_margin_ce_on_pseudo_labels_plus_im(source_pkg: Path, margin_logits: str) -> None:
    data = _data()
    cfg = DifcConfig(
        di_epochs=0,
        augment=FlipShiftConfig(enabled=False),
        margin_logits=margin_logits,  # type: ignore[arg-type]
    )
    method = Difc(cfg, _ctx(source_pkg, data))
    _epoch(method, data, 0)
    phase = method.phases()[-1]
    idx = torch.arange(16)
    batch = Batch(data.tensor(idx), idx, torch.Generator().manual_seed(0), 0, 0, 0.0)
    out = phase.step(batch)
    assert out.loss is not None
    with torch.no_grad():
        logits, feats = method.model(batch.x)
    assert method.pseudo_labels is not None
    y = method.pseudo_labels[idx]
    m = method.margins
    onehot = torch.nn.functional.one_hot(y, 3) * m[y].unsqueeze(1)
    if margin_logits == "raw":
        shifted = logits - onehot  # eq. 3 on raw logits, the code before margin_logits
    else:
        w = method.model.head.weight.detach()
        cos = (feats / feats.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
        shifted = 30.0 * (cos - onehot)  # LDAM: s (cos - m_y e_y)
    ce = torch.nn.functional.cross_entropy(shifted, y)
    p = torch.softmax(logits, 1)
    ent = -(p * torch.log(p + 1e-5)).sum(1).mean()
    pm = p.mean(0)
    div = -(pm * torch.log(pm + 1e-5)).sum()
    want = 0.3 * ce + ent - div
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-4, abs=1e-5)


def test_head_frozen_only_backbone_trains(source_pkg: Path) -> None:
    method = Difc(DifcConfig(), _ctx(source_pkg, _data()))
    opt = build_optimizer(method.phases()[-1])
    assert opt is not None
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in method.model.head.parameters()}


def test_package_without_counts_warns(source_pkg: Path, tmp_path: Path) -> None:
    from sourcefree.export import source_package

    pkg = load_package(source_pkg)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    bare = source_package(
        model.eval(),
        architecture=pkg.manifest.architecture.name,
        labels=list(pkg.manifest.labels),
        input_spec=pkg.manifest.input,
        out=tmp_path / "bare",
    )
    data = _data(8)
    ctx = MethodContext((SourceModel(bare, model),), data, torch.device("cpu"), 0)
    with pytest.warns(UserWarning, match="uniform"):
        method = Difc(DifcConfig(), ctx)
    assert method.base_margins.tolist() == pytest.approx([0.3, 0.3, 0.3])


@pytest.mark.parametrize(
    ("setting", "message"),
    [("margin_logits=cosine", "margin_logits"), ("scale=0", "scale")],
)
def test_cli_refuses_bad_margin_settings_with_exit_2(
    source_pkg: Path, target_small: Path, tmp_path: Path, setting: str, message: str
) -> None:
    out = tmp_path / "out"
    args = [str(source_pkg), str(target_small), "-m", "difc", "-o", str(out), "--no-progress"]
    result = CliRunner().invoke(adapt_command, [*args, "--set", setting])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_report_names_where_the_margins_acted(source_pkg: Path) -> None:
    data = _data(8)
    cfg = DifcConfig(margin_logits="normalised")
    report = Difc(cfg, _ctx(source_pkg, data)).report()
    assert (report["margin_logits"], report["scale"]) == ("normalised", 30.0)
    want = imbalance_margins([10, 20, 30], 3).tolist()
    assert report["margins"] == pytest.approx(want, abs=1e-6)
    raw = Difc(DifcConfig(margin_logits="raw"), _ctx(source_pkg, data)).report()
    assert (raw["margin_logits"], raw["scale"]) == ("raw", None)
