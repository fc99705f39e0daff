"""Source-free POCAN: eq. 13 weights, eq. 14 thresholds, InfoNCE, the alternating phases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sourcefree.adapters.pocan import (
    Pocan,
    PocanConfig,
    PocanOptimConfig,
    PocanViewConfig,
    adaptive_thresholds,
    class_weights,
    info_nce,
    lambda_schedule,
    trusted_mask,
)
from sourcefree.data.synthetic import generate
from sourcefree.engine.feature_bank import MemoryBudget
from sourcefree.engine.method import Batch, MethodContext, Phase, SourceModel, TargetData
from sourcefree.engine.models import load_classifier
from sourcefree.engine.registry import get_method
from sourcefree.engine.reproducibility import seed_everything
from sourcefree.engine.trainer import StepInfo, Trainer, build_optimizer
from sourcefree.engine.workdir import Workdir
from sourcefree.errors import ConfigError, InputError, RunInterruptedError
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec
from tests.spill_helpers import SPILLED, adapt_spilled


def _data(n: int = 40) -> TargetData:
    s = generate("wild-mild", n, 32, seed=8)
    return TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="x")


def _method(
    pkg_path: Path, data: TargetData, memory: MemoryBudget | None = None, **kw: object
) -> Pocan:
    pkg = load_package(pkg_path)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    ctx = MethodContext((SourceModel(pkg, model),), data, torch.device("cpu"), 0, memory)
    return Pocan(PocanConfig(batch_size=16, **kw), ctx)  # type: ignore[arg-type]


def _batch(data: TargetData, n: int = 16, progress: float = 0.0) -> Batch:
    idx = torch.arange(n)
    return Batch(data.tensor(idx), idx, torch.Generator().manual_seed(3), 0, 0, progress)


def _phase(method: Pocan, name: str) -> Phase:
    return next(p for p in method.phases() if p.name == name)


# --- config -------------------------------------------------------------------------------


def test_registered_with_paper_defaults() -> None:
    assert get_method("pocan") is Pocan
    cfg = PocanConfig()
    assert (cfg.tau, cfg.beta, cfg.lambda_gamma) == (0.7, 2.0, 10.0)
    assert (cfg.instance_weight, cfg.cross_weight, cfg.class_weighting) == (1.0, 1.0, True)
    assert cfg.weight_smoothing == 1.0
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 1e-5)
    assert cfg.optim.prototype_lr == pytest.approx(10 * cfg.optim.extractor_lr)
    assert cfg.drop_epoch() == cfg.epochs // 2
    assert PocanConfig(optim=PocanOptimConfig(prototype_lr_drop_epoch=3)).drop_epoch() == 3


@pytest.mark.parametrize(
    ("make", "pinned"),
    [
        (lambda: PocanConfig(beta=0.0), "beta=0.0 (must be > 0)"),
        (lambda: PocanConfig(tau=-1.0), "tau=-1.0"),
        (lambda: PocanConfig(epochs=0), "epochs=0 (must be an integer >= 1)"),
        (lambda: PocanConfig(batch_size=1), "batch_size=1"),
        (lambda: PocanConfig(cross_weight=-1.0), "cross_weight=-1.0 (must be >= 0)"),
        (lambda: PocanOptimConfig(prototype_lr_drop=2.0), "prototype_lr_drop=2.0"),
        (lambda: PocanOptimConfig(extractor_lr=0.0), "extractor_lr=0.0"),
        (lambda: PocanOptimConfig(prototype_lr_drop_epoch=-1), "prototype_lr_drop_epoch=-1"),
        (lambda: PocanViewConfig(crop_scale=(0.5, 0.2)), "crop_scale=(0.5, 0.2)"),
        (lambda: PocanViewConfig(grayscale_prob=1.5), "grayscale_prob=1.5"),
    ],
)
def test_invalid_values_are_refused(make: object, pinned: str) -> None:
    with pytest.raises(ConfigError, match=pinned.replace("(", r"\(").replace(")", r"\)")):
        make()  # type: ignore[operator]


# --- eq. 13, eq. 14, eq. 1, lambda_t ------------------------------------------------------


def test_eq13_class_weights_by_hand() -> None:
    got = class_weights(torch.tensor([2, 6, 0, 2]))
    # n / sum = 0.2, 0.6, 0, 0.2 -> 1 - f^2
    assert got.tolist() == pytest.approx([0.96, 0.64, 1.0, 0.96])
    assert got.dtype == torch.float32
    assert class_weights(torch.zeros(3, dtype=torch.int64)).tolist() == [1.0, 1.0, 1.0]
    # one class holds every label: eq. 13 silences it; add-one smoothing keeps it trainable
    assert class_weights(torch.tensor([0, 8, 0])).tolist() == [1.0, 0.0, 1.0]
    smooth = class_weights(torch.tensor([0, 8, 0]), smoothing=1.0)
    assert smooth.tolist() == pytest.approx(
        [1 - (1 / 11) ** 2, 1 - (9 / 11) ** 2, 1 - (1 / 11) ** 2]
    )
    with pytest.raises(InputError):
        class_weights(torch.tensor([1, -1]))


def test_eq14_thresholds_by_hand() -> None:
    conf = torch.tensor([0.5, 0.7, 0.9, 0.6, 0.8, 0.4])
    labels = torch.tensor([0, 0, 0, 1, 3, 3])
    thr = adaptive_thresholds(conf, labels, 4, beta=2.0)
    # class 0: avg 0.7, max 0.9 -> 0.7 + 0.2 (1 - 0.7^2) = 0.802
    # class 1: one sample, avg = max = 0.6 -> 0.6 (its only sample is trusted)
    # class 2: nobody -> +inf (nothing passes)
    # class 3: avg 0.6, max 0.8 -> 0.6 + 0.2 (1 - 0.36) = 0.728
    assert float(thr[0]) == pytest.approx(0.802)
    assert float(thr[1]) == pytest.approx(0.6)
    assert math.isinf(float(thr[2]))
    assert float(thr[3]) == pytest.approx(0.728)
    assert trusted_mask(conf, labels, thr).tolist() == [False, False, True, True, True, False]
    # a larger beta is stricter (Sec. 3.5); beta = 1 by hand: 0.7 + 0.2 * 0.3
    assert float(adaptive_thresholds(conf, labels, 4, beta=1.0)[0]) == pytest.approx(0.76)
    assert float(adaptive_thresholds(conf, labels, 4, beta=8.0)[0]) > float(thr[0])
    with pytest.raises(ConfigError):
        adaptive_thresholds(conf, labels, 4, beta=0.0)


def test_eq14_most_confident_sample_of_each_class_is_trusted() -> None:
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(500, generator=g, dtype=torch.float32) * 0.7 + 0.3
    labels = torch.randint(0, 5, (500,), generator=g)
    thr = adaptive_thresholds(conf, labels, 5, beta=0.01)  # threshold -> max
    keep = trusted_mask(conf, labels, thr)
    for c in range(5):
        assert bool(keep[labels == c].any())


def test_lambda_schedule() -> None:
    assert lambda_schedule(0.0) == 0.0
    assert lambda_schedule(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert lambda_schedule(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert lambda_schedule(2.0) == lambda_schedule(1.0)


def test_info_nce_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    t = 0.7
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(8):
        pos = (i + 4) % 8
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(8) if j != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / den)
    assert float(info_nce(z1, z2, t)) == pytest.approx(total / 8, rel=1e-5)
    with pytest.raises(InputError):
        info_nce(z1, z2[:3], t)


# --- the method ---------------------------------------------------------------------------


def test_phases_alternate_prototypes_and_extractor(source_pkg: Path) -> None:
    method = _method(source_pkg, _data(), epochs=3)
    names = [p.name for p in method.phases()]
    assert names == [
        "prototypes-1",
        "extractor-1",
        "prototypes-2",
        "extractor-2",
        "prototypes-3",
        "extractor-3",
        "bn-stats",
    ]
    lrs = []
    for name in ("prototypes-1", "prototypes-2"):  # drop epoch = 3 // 2 = 1
        opt = build_optimizer(_phase(method, name))
        assert opt is not None
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["weight_decay"] == 0.0
    assert lrs == pytest.approx([1e-3, 1e-4])


def test_prototypes_start_at_normalised_source_head(source_pkg: Path) -> None:
    method = _method(source_pkg, _data())
    w = torch.nn.functional.normalize(method.model.head.weight.detach(), dim=1)
    torch.testing.assert_close(method.prototypes.source, w)
    torch.testing.assert_close(method.prototypes.target.detach(), w)


def test_labelling_follows_target_prototypes_and_eq14(source_pkg: Path) -> None:
    data = _data()
    method = _method(source_pkg, data)
    assert method.pseudo_label_selection() is None  # nothing labelled yet
    method.label(0)
    model = method.model.eval()
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.backbone(data.tensor()), dim=1)
    mu = torch.nn.functional.normalize(method.prototypes.target.detach(), dim=1)
    probs = torch.softmax(z @ mu.T / 0.1, dim=1)
    conf, labels = probs.max(1)
    assert torch.equal(method.labels, labels)
    thr = adaptive_thresholds(conf, labels, 3, 2.0)
    assert torch.equal(method.trusted, trusted_mask(conf, labels, thr))
    counts = torch.bincount(labels, minlength=3)
    torch.testing.assert_close(method.weights, class_weights(counts, smoothing=1.0))
    assert method.bank is not None and method.bank.storage == "float32"
    torch.testing.assert_close(method.bank.tensor(), z)
    chosen = method.pseudo_label_selection()
    assert chosen is not None
    assert torch.equal(chosen[0], torch.nonzero(method.trusted).flatten())
    assert torch.equal(chosen[1], labels[method.trusted])
    meta = method.state_meta()["round"]
    assert isinstance(meta, dict) and sum(meta["pseudo_label_counts"]) == len(data)


def _grads(method: Pocan) -> dict[str, bool]:
    named = dict(method.model.named_parameters(prefix="model"))
    named.update(method.prototypes.named_parameters(prefix="prototypes"))
    named.update(method.projector.named_parameters(prefix="projector"))
    return {k: p.grad is not None and bool(p.grad.any()) for k, p in named.items()}


def _run(method: Pocan, phase: Phase, batch: Batch, steps: int = 1) -> list[float]:
    opt = build_optimizer(phase)
    assert opt is not None
    for g in opt.param_groups:
        for p in g["params"]:
            p.requires_grad_(True)
    if phase.on_enter is not None:
        phase.on_enter()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = phase.step(batch)
        assert out.loss is not None and bool(torch.isfinite(out.loss))
        out.loss.backward()  # type: ignore[no-untyped-call]
        losses.append(float(out.loss.detach()))
        opt.step()
    return losses


def test_prototype_phase_trains_only_the_target_prototypes(source_pkg: Path) -> None:
    data = _data()
    method = _method(source_pkg, data)
    method.label(0)
    before = method.prototypes.target.detach().clone()
    source = method.prototypes.source.clone()
    backbone = [p.detach().clone() for p in method.model.parameters()]
    losses = _run(method, _phase(method, "prototypes-1"), _batch(data), steps=5)
    grads = _grads(method)
    assert grads.pop("prototypes.target")
    assert not any(grads.values()), grads
    assert losses[-1] < losses[0]
    assert not torch.equal(method.prototypes.target.detach(), before)  # prototypes update
    assert torch.equal(method.prototypes.source, source)  # M_s stays the source head
    assert all(torch.equal(a, b) for a, b in zip(backbone, method.model.parameters(), strict=True))


def test_extractor_phase_trains_only_the_backbone(source_pkg: Path) -> None:
    data = _data()
    method = _method(source_pkg, data)
    method.label(0)
    protos = method.prototypes.target.detach().clone()
    _run(method, _phase(method, "extractor-1"), _batch(data))
    grads = _grads(method)
    assert not grads.pop("prototypes.target")
    assert not grads.pop("model.head.weight") and not grads.pop("model.head.bias")
    assert all(v for k, v in grads.items()), grads
    assert torch.equal(method.prototypes.target.detach(), protos)


def test_extractor_loss_is_eq5_plus_eq8(source_pkg: Path) -> None:
    data = _data()
    method = _method(source_pkg, data, epochs=2)
    method.label(0)
    method.model.train()
    batch = _batch(data, progress=0.5)  # round 0 of 2: p = 0.25
    out = _phase(method, "extractor-1").step(batch)
    assert out.loss is not None
    with torch.no_grad():
        f = method.model.backbone(method._views(batch))
        z = torch.nn.functional.normalize(f, dim=1)
        h = method.projector(f)  # the instance loss's own head (SimCLR g)
    y = method.labels[:16].repeat(2)
    keep = method.trusted[:16].repeat(2)
    w = method.weights[y]

    def ce(mu: torch.Tensor) -> torch.Tensor:
        logits = z @ torch.nn.functional.normalize(mu, dim=1).T / 0.1
        rows = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        return (w * rows)[keep].sum() / keep.sum().clamp_min(1)

    lam = 2 / (1 + math.exp(-10 * 0.25)) - 1
    want = (
        info_nce(h[:16], h[16:], 0.7)
        + lam * ce(method.prototypes.target.detach())
        + ce(method.prototypes.source)
    )
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-4)
    assert float(out.metrics["lambda_t"]) == pytest.approx(lam)


def test_views_are_a_function_of_the_batch(source_pkg: Path) -> None:
    data = _data()
    method = _method(source_pkg, data)
    batch = _batch(data)
    a, b = method._views(batch), method._views(batch)
    assert a.shape == (32, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a[:16], a[16:])


def test_export_is_the_target_prototype_classifier(source_pkg: Path) -> None:
    data = _data()
    method = _method(source_pkg, data)
    with torch.no_grad():
        method.prototypes.target.add_(0.3 * torch.randn_like(method.prototypes.target))
    model = method.export_model()
    assert float(method.feature_scale) > 0
    with torch.no_grad():
        logits, f = model(data.tensor())
    mu = torch.nn.functional.normalize(method.prototypes.target.detach(), dim=1)
    cos = torch.nn.functional.normalize(f, dim=1) @ mu.T
    assert torch.equal(logits.argmax(1), cos.argmax(1))
    assert model.head.bias is not None and not model.head.bias.any()
    state = method.state_tensors()
    other = _method(source_pkg, data)
    other.load_state(state, method.state_meta())
    assert torch.equal(other.feature_scale, method.feature_scale)


# --- the round's features under the memory budget ----------------------------------------


def _budgets(tmp_path: Path) -> dict[str, MemoryBudget]:
    spill = tmp_path / "spill"
    spill.mkdir(exist_ok=True)
    return {
        "float32": MemoryBudget(1 << 40),
        "float16": MemoryBudget(1),  # no run directory: float16 in memory, over the budget
        "disk": MemoryBudget(1, spill),
    }


def test_labels_over_the_budget_equal_float32_and_features_round_to_float16(
    source_pkg: Path, tmp_path: Path
) -> None:
    data = _data()
    batch = _batch(data)
    runs: dict[str, tuple[Pocan, torch.Tensor, float]] = {}
    for storage, memory in _budgets(tmp_path).items():
        method = _method(source_pkg, data, memory, label_batch_size=16)  # batches 16, 16, 8
        method.label(0)
        assert method.bank is not None and method.bank.storage == storage
        use = memory.report()
        assert use is not None and use["features"]["storage"] == storage
        assert use["features"]["within_budget"] == (storage != "float16")
        feats = method.bank.take(torch.arange(len(data)))
        step = _phase(method, "prototypes-1").step(batch).loss
        assert step is not None
        runs[storage] = (method, feats, float(step.detach()))
    ref, ref_feats, ref_loss = runs["float32"]
    for storage in ("float16", "disk"):
        method, feats, loss = runs[storage]
        # The labels come from each batch's float32 rows (the last batch, of 8, scored with
        # the 16 rows before it): the same labels, thresholds and weights as float32.
        assert torch.equal(method.labels, ref.labels) and torch.equal(method.trusted, ref.trusted)
        assert torch.equal(method.weights, ref.weights)
        assert torch.equal(method.thresholds, ref.thresholds)
        assert method.round_meta == ref.round_meta
        # float16 with a power-of-two row scale: within 2^-11 of each unit row's largest value
        assert float((feats - ref_feats).abs().max()) <= 2.0**-11
        assert not torch.equal(feats, ref_feats)
        assert loss == pytest.approx(ref_loss, abs=1e-3)
        assert method.state_tensors()["features"].numel() == 0  # left out of checkpoints
    assert torch.equal(ref.state_tensors()["features"], ref_feats)
    method = runs["disk"][0]
    method._close_bank()
    assert method.bank is None
    again = _method(source_pkg, data, MemoryBudget(1 << 40), label_batch_size=16)
    again.load_state(ref.state_tensors(), ref.state_meta())
    assert again.bank is not None and torch.equal(again.bank.tensor(), ref_feats)


def _train(
    pkg_path: Path, data: TargetData, memory: MemoryBudget, wd: Workdir, stop: bool = False
) -> tuple[Pocan, list[str]]:
    """A 2-round run; ``stop``: interrupted after the first step of ``prototypes-2``."""
    seed_everything(0)  # the projector's initial weights
    method = _method(pkg_path, data, memory, epochs=2, label_batch_size=16)
    seen: list[str] = []

    def hook(info: StepInfo) -> None:
        seen.append(info.phase)
        if stop and (info.phase, info.step) == ("prototypes-2", 1):
            info.request_stop()

    trainer = Trainer(method, data, device=torch.device("cpu"), seed=0, workdir=wd, on_step=hook)
    trainer.run(resume=not stop and wd.checkpoints.has_checkpoints())
    return method, seen


@pytest.mark.parametrize("storage", ["float32", "disk"])
def test_resume_inside_the_prototype_phase_is_bitwise_equal(
    source_pkg: Path, tmp_path: Path, storage: str
) -> None:
    data = _data()
    memory = _budgets(tmp_path)[storage]
    whole, _ = _train(source_pkg, data, memory, Workdir(tmp_path / "whole").open())
    wd = Workdir(tmp_path / "cut").open()
    with pytest.raises(RunInterruptedError):
        _train(source_pkg, data, memory, wd, stop=True)
    ckpt = wd.checkpoints.load_latest()
    assert ckpt is not None and ckpt.meta["position"]["step"] == 1
    kept = ckpt.tensors["method.features"]
    assert kept.shape == ((len(data), 128) if storage == "float32" else (0,))
    wd.close()
    resumed, seen = _train(source_pkg, data, _budgets(tmp_path)[storage], wd.open())
    assert seen[0] == "prototypes-2"  # it went on inside the phase (refilling the bank)
    for name, module in whole.modules().items():
        other = resumed.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}.{key}"
    assert whole.round_meta == resumed.round_meta
    assert whole.bank is None and resumed.bank is None  # closed at the phase's end


def test_adapt_pocan_spills_to_disk_and_reports_it(source_pkg: Path, tmp_path: Path) -> None:
    sets = ["epochs=1", "batch_size=8", "label_batch_size=8", "projection_dim=0"]
    report, kept = adapt_spilled(source_pkg, tmp_path, "pocan", sets)
    assert report["memory"] == {"budget_bytes": 1024, "features": SPILLED}
    assert kept and not any(name.endswith(".f16") for name in kept), kept
