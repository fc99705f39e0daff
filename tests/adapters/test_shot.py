"""SHOT / SHOT-IM: loss pieces by hand, frozen head, per-epoch pseudo-labels, optimiser plan."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sourcefree.adapters.shot import (
    Shot,
    ShotConfig,
    ShotIM,
    ShotIMConfig,
)
from sourcefree.data.synthetic import generate
from sourcefree.engine.method import Batch, EpochInfo, MethodContext, SourceModel, TargetData
from sourcefree.engine.models import load_classifier
from sourcefree.engine.registry import get_method
from sourcefree.engine.trainer import build_optimizer
from sourcefree.errors import ConfigError
from sourcefree.ops.augment import FlipShiftConfig
from sourcefree.ops.optim import SgdInvConfig
from sourcefree.ops.pseudo_labels import centroid_pseudo_labels
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec


def _data(n: int = 40) -> TargetData:
    s = generate("wild-mild", n, 32, seed=5)
    return TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="x")


def _ctx(pkg_path: Path, data: TargetData) -> MethodContext:
    pkg = load_package(pkg_path)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    return MethodContext((SourceModel(pkg, model),), data, torch.device("cpu"), 0)


def _batch(data: TargetData, n: int = 16) -> Batch:
    idx = torch.arange(n)
    return Batch(data.tensor(idx), idx, torch.Generator().manual_seed(0), 0, 0, 0.0)


def _hand_loss(logits: torch.Tensor, target: torch.Tensor | None, beta: float) -> float:
    """SHOT's objective written out with python floats (eps 1e-5 inside the logs)."""
    rows = [[float(v) for v in r] for r in logits]
    probs = []
    for r in rows:
        m = max(r)
        e = [math.exp(v - m) for v in r]
        probs.append([v / sum(e) for v in e])
    n, c = len(rows), len(rows[0])
    ent = sum(-sum(p * math.log(p + 1e-5) for p in row) for row in probs) / n
    mean = [sum(probs[i][k] for i in range(n)) / n for k in range(c)]
    div = -sum(p * math.log(p + 1e-5) for p in mean)
    ce = 0.0
    if target is not None:
        ce = sum(-math.log(probs[i][int(target[i])]) for i in range(n)) / n
    return beta * ce + ent - div


def test_registered_names_and_defaults() -> None:
    assert get_method("shot") is Shot and get_method("shot-im") is ShotIM
    assert ShotConfig().beta == 0.3 and ShotIMConfig().beta == 0.0
    opt = SgdInvConfig()
    assert (opt.lr, opt.momentum, opt.weight_decay, opt.gamma, opt.power) == (
        1e-2,
        0.9,
        1e-3,
        10.0,
        0.75,
    )
    with pytest.raises(ConfigError):
        ShotConfig(beta=-1.0)
    with pytest.raises(ConfigError):
        ShotConfig(beta=0.0, im_weight=0.0)
    with pytest.raises(ConfigError):
        SgdInvConfig(lr=0.0)


def test_phase_plan_is_sgd_nesterov_inv(source_pkg: Path) -> None:
    method = Shot(ShotConfig(), _ctx(source_pkg, _data()))
    phase = method.phases()[-1]
    assert phase.optimizer.name == "sgd" and phase.optimizer.nesterov
    assert phase.optimizer.weight_decay == 1e-3 and phase.optimizer.momentum == 0.9
    assert phase.schedule.name == "inv"
    # lr_t = lr0 (1 + 10 t/T)^-0.75
    assert phase.schedule.factor(50, 100) == pytest.approx((1 + 10 * 0.5) ** -0.75)
    opt = build_optimizer(phase)
    assert opt is not None
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    head = {id(p) for p in method.model.head.parameters()}
    assert not trained & head, "the source head must not be in the optimiser"
    assert trained == {id(p) for p in method.model.backbone.parameters()}


def test_target_batchnorm_is_estimated_before_the_first_labelling(source_pkg: Path) -> None:
    method = Shot(ShotConfig(), _ctx(source_pkg, _data()))
    names = [p.name for p in method.phases()]
    assert names == ["target-bn", "adapt"]
    first = method.phases()[0]
    assert first.parameters is None and not first.shuffle
    off = Shot(ShotConfig(target_bn_init=False), _ctx(source_pkg, _data()))
    assert [p.name for p in off.phases()] == ["adapt"]


@pytest.mark.parametrize("beta", [0.3, 0.0])
def test_loss_matches_hand_computation(source_pkg: Path, beta: float) -> None:
    data = _data()
    cfg = ShotConfig(beta=beta, augment=FlipShiftConfig(enabled=False))
    method = Shot(cfg, _ctx(source_pkg, data))
    phase = method.phases()[-1]
    assert phase.on_enter is not None and phase.on_epoch_start is not None
    phase.on_enter()
    phase.on_epoch_start(EpochInfo("adapt", 0, data, torch.device("cpu")))
    assert (method.pseudo_labels is None) == (beta == 0)
    batch = _batch(data)
    out = phase.step(batch)
    assert out.loss is not None
    with torch.no_grad():
        logits, _ = method.model(batch.x)
    target = None if method.pseudo_labels is None else method.pseudo_labels[batch.index]
    # Train-mode BatchNorm: the same batch gives the same logits.
    want = _hand_loss(logits, target, beta)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_pseudo_labels_come_from_eval_mode_centroids(source_pkg: Path) -> None:
    data = _data()
    method = Shot(ShotConfig(), _ctx(source_pkg, data))
    phase = method.phases()[-1]
    assert phase.on_enter is not None and phase.on_epoch_start is not None
    phase.on_enter()
    phase.on_epoch_start(EpochInfo("adapt", 0, data, torch.device("cpu")))
    assert method.model.backbone.training and not method.model.head.training
    model = method.model
    model.eval()
    with torch.no_grad():
        logits, feats = model(data.tensor())
    want = centroid_pseudo_labels(feats, torch.softmax(logits, 1)).labels
    assert method.pseudo_labels is not None
    assert torch.equal(method.pseudo_labels, want)
    state = method.state_tensors()
    assert torch.equal(state["pseudo_labels"], want)


def test_head_stays_frozen_and_labels_recomputed_each_epoch(source_pkg: Path) -> None:
    data = _data(48)
    method = Shot(ShotConfig(batch_size=16, epochs=2), _ctx(source_pkg, data))
    phase = method.phases()[-1]
    head_before = {k: v.clone() for k, v in method.model.head.state_dict().items()}
    backbone_before = [p.detach().clone() for p in method.model.backbone.parameters()]
    calls: list[int] = []
    original = method._relabel

    def spy(epoch: int) -> None:
        calls.append(epoch)
        original(epoch)

    method._relabel = spy  # type: ignore[method-assign]
    opt = build_optimizer(phase)
    assert opt is not None and phase.on_enter is not None and phase.on_epoch_start is not None
    for p in method.model.backbone.parameters():
        p.requires_grad_(True)
    phase.on_enter()
    for epoch in range(2):
        phase.on_epoch_start(EpochInfo("adapt", epoch, data, torch.device("cpu")))
        for step in range(3):
            idx = torch.arange(step * 16, step * 16 + 16)
            batch = Batch(
                data.tensor(idx), idx, torch.Generator().manual_seed(step), epoch, step, 0
            )
            opt.zero_grad()
            out = phase.step(batch)
            assert out.loss is not None
            out.loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    assert calls == [0, 1]
    for k, v in method.model.head.state_dict().items():
        assert torch.equal(v, head_before[k]), f"head {k} changed"
    moved = [
        not torch.equal(a, b)
        for a, b in zip(backbone_before, method.model.backbone.parameters(), strict=True)
    ]
    assert any(moved)


def test_state_round_trip_restores_pseudo_labels(source_pkg: Path) -> None:
    data = _data()
    a = Shot(ShotConfig(), _ctx(source_pkg, data))
    a._relabel(0)
    b = Shot(ShotConfig(), _ctx(source_pkg, data))
    b.load_state(a.state_tensors(), a.state_meta())
    assert a.pseudo_labels is not None and b.pseudo_labels is not None
    assert torch.equal(a.pseudo_labels, b.pseudo_labels)
    assert ShotIM(ShotIMConfig(), _ctx(source_pkg, data)).state_tensors() == {}
