"""CluP: phases end to end, SwAV loss vs lightly, prototype freezing, DeepClusterV2, edge cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from sourcefree.adapters.clup import (
    CluP,
    CluPConfig,
    FineTuneConfig,
    SSLConfig,
    multi_crop,
    nearest_prototypes,
)
from sourcefree.data.synthetic import generate
from sourcefree.engine.feature_bank import MemoryBudget
from sourcefree.engine.method import Batch, MethodContext, Phase, SourceModel, TargetData
from sourcefree.engine.models import load_classifier
from sourcefree.engine.reproducibility import seed_everything
from sourcefree.engine.trainer import Trainer, build_optimizer
from sourcefree.errors import ConfigError
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec

N = 40


def _data(n: int = N) -> TargetData:
    s = generate("wild-mild", n, 32, seed=5)
    return TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="t")


def _config(**ssl: Any) -> CluPConfig:
    ssl_cfg: dict[str, Any] = {
        "epochs": 2,
        "batch_size": 16,
        "prototypes": 8,
        "hidden_dim": 32,
        "output_dim": 16,
        "local_crops": 2,
        "queue_length": 32,
        "queue_start_epoch": 1,
    }
    ssl_cfg.update(ssl)
    return CluPConfig(
        kmeans_n_init=1,
        kmeans_max_iter=20,
        label_batch_size=32,
        batch_size=16,
        keep_fraction=0.3,
        ssl=SSLConfig(**ssl_cfg),
        finetune=FineTuneConfig(epochs=2),
    )


def _build(
    pkg_path: Path,
    cfg: CluPConfig,
    data: TargetData,
    seed: int = 0,
    memory: MemoryBudget | None = None,
) -> CluP:
    pkg = load_package(pkg_path)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    seed_everything(seed)
    ctx = MethodContext((SourceModel(pkg, model),), data, torch.device("cpu"), seed, memory)
    return CluP(cfg, ctx)


def _batch(data: TargetData, epoch: int = 0, n: int = 16) -> Batch:
    idx = torch.arange(n)
    return Batch(data.tensor(idx), idx, torch.Generator().manual_seed(epoch), epoch, 0, 0.0)


def _phase(method: CluP, name: str) -> Phase:
    return next(p for p in method.phases() if p.name == name)


def _weights(method: CluP) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.export_model().state_dict().items()}


def test_phases_run_end_to_end_and_report(source_pkg: Path) -> None:
    data = _data()
    method = _build(source_pkg, _config(), data)
    names = [p.name for p in method.phases()]
    assert names == ["pseudo-label", "warm-up-frozen", "warm-up", "fine-tune", "bn-stats"]
    result = Trainer(method, data, device=torch.device("cpu"), seed=0).run()
    assert all(log.done for log in result.phases)
    model = method.export_model()
    logits, _ = model(data.tensor(slice(0, 8)))
    assert torch.isfinite(logits).all() and logits.shape == (8, 3)
    report = method.report()
    pl = report["pseudo_labels"]
    assert pl["n_selected"] == sum(pl["selected_per_class"]) > 0
    assert sum(pl["histogram"]["sample_counts"]) == N
    assert "indices" not in str(report)  # aggregates only
    # The source model is never trained.
    pkg = load_package(source_pkg)
    fresh = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, method.source.state_dict()[k])


def test_swav_warm_up_loss_equals_lightly(
    source_pkg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightly.loss import SwaVLoss

    import sourcefree.kernels as kernels

    data = _data()
    method = _build(source_pkg, _config(), data)
    seen: list[tuple[Any, Any, Any, torch.Tensor]] = []
    real = kernels.swav_loss

    def spy(high: Any, low: Any = (), queue: Any = None, **kw: Any) -> torch.Tensor:
        out = real(high, low, queue, **kw)
        seen.append((high, low, queue, out))
        return out

    monkeypatch.setattr(kernels, "swav_loss", spy)
    # SwAV epoch 0 (frozen phase): no queue yet; epoch 1 (warm-up phase): queue_start_epoch=1.
    for name, with_queue in (("warm-up-frozen", False), ("warm-up", True)):
        phase = _phase(method, name)
        assert phase.on_enter is not None
        phase.on_enter()
        out = phase.step(_batch(data, 0))
        high, low, queue, got = seen[-1]
        assert (queue is not None) == with_queue
        assert len(high) == 2 and len(low) == 2
        want = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(
            [h.detach() for h in high],
            [v.detach() for v in low],
            None if queue is None else [q.detach() for q in queue],
        )
        assert out.loss is not None
        torch.testing.assert_close(out.loss.detach(), want.reshape(()), atol=1e-6, rtol=1e-6)
        assert torch.equal(got, out.loss)


def test_prototypes_frozen_in_first_epoch_then_trained(source_pkg: Path) -> None:
    data = _data()
    method = _build(source_pkg, _config(queue_length=0), data)
    protos = list(method.prototypes.parameters())
    for name, trains in (("warm-up-frozen", False), ("warm-up", True)):
        phase = _phase(method, name)
        opt = build_optimizer(phase)
        assert opt is not None
        declared = {id(p) for g in opt.param_groups for p in g["params"]}
        assert all((id(p) in declared) == trains for p in protos)
        for g in opt.param_groups:
            for p in g["params"]:
                p.requires_grad_(True)
        assert phase.on_enter is not None
        phase.on_enter()
        opt.zero_grad()
        out = phase.step(_batch(data, 0))
        assert out.loss is not None
        out.loss.backward()  # type: ignore[no-untyped-call]
        backbone = next(iter(method.model.backbone.parameters()))
        assert backbone.grad is not None and backbone.grad.abs().sum() > 0
        assert all((p.grad is not None) == trains for p in protos)
        assert all(p.requires_grad == trains for p in protos)
        for g in opt.param_groups:
            for p in g["params"]:
                p.requires_grad_(False)
                p.grad = None


def test_deepclusterv2_prototypes_are_frozen_centroids(source_pkg: Path) -> None:
    data = _data()
    method = _build(source_pkg, _config(method="deepclusterv2", heads=2), data)
    phase = _phase(method, "warm-up")
    opt = build_optimizer(phase)
    assert opt is not None
    declared = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in declared for p in method.prototypes.parameters())
    method._dc_cluster(0)
    assert method.dc_bank.shape == (2, N, 16)
    assert method.dc_assignments.shape == (2, N)
    for h in range(2):
        w = method.prototypes.get_submodule(str(h)).weight
        assert isinstance(w, torch.Tensor)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(8))
        bank = torch.nn.functional.normalize(method.dc_bank[h], dim=1)
        assert torch.equal((bank @ w.T).argmax(1), method.dc_assignments[h])
    before = method.dc_bank.clone()
    method._train_mode()
    out = phase.step(_batch(data))
    assert out.loss is not None and torch.isfinite(out.loss)
    assert not torch.equal(method.dc_bank[:, :16], before[:, :16])  # bank rows of the batch
    assert torch.equal(method.dc_bank[:, 16:], before[:, 16:])


def test_nearest_prototypes_do_not_depend_on_the_block_size() -> None:
    g = torch.Generator().manual_seed(4)
    n, p = 1003, 300
    protos = torch.nn.functional.normalize(torch.randn(p, 128, generator=g), dim=1)
    # Rows halfway between two prototypes: their two scores are equal up to rounding, so
    # a product that rounds otherwise (BLAS on a few rows) picks the other one.
    a = torch.randint(0, p, (n,), generator=g)
    b = (a + 1 + torch.randint(0, p - 1, (n,), generator=g)) % p
    z = torch.nn.functional.normalize(protos[a] + protos[b], dim=1)
    protos[7] = protos[3]  # exact ties: the first of the two wins, as in one argmax
    z[:20] = protos[3]
    whole = (z @ protos.T).argmax(dim=1)
    assert bool((whole[:20] == 3).all())
    for rows in (1, 2, 7, 16, 64, 1003, 4096):
        assert torch.equal(nearest_prototypes(z, protos, rows), whole), rows
    assert torch.equal(nearest_prototypes(z[:5], protos, 2), whole[:5])  # one block of 5
    assert nearest_prototypes(z[:0], protos, 8).shape == (0,)
    with pytest.raises(ConfigError):
        nearest_prototypes(z, protos, 0)


def test_deepclusterv2_assignments_in_blocks_match_one_piece(source_pkg: Path) -> None:
    data = _data()
    cfg = _config(method="deepclusterv2", heads=2)
    ample = _build(source_pkg, cfg, data, memory=MemoryBudget(1 << 40))
    tight = _build(source_pkg, cfg, data, memory=MemoryBudget(1))  # one row per block
    for method in (ample, tight):
        method._dc_cluster(0)
    assert ample.dc_assignments.shape == (2, N)
    assert torch.equal(ample.dc_assignments, tight.dc_assignments)
    assert torch.equal(ample.dc_bank, tight.dc_bank)
    for h in range(2):
        w = tight.prototypes.get_submodule(str(h)).weight
        assert isinstance(w, torch.Tensor)
        bank = torch.nn.functional.normalize(tight.dc_bank[h], dim=1)
        assert torch.equal((bank @ w.T).argmax(1), tight.dc_assignments[h])


def test_selection_edge_cases_through_pseudo_labels(source_pkg: Path) -> None:
    data = _data()
    cfg = _config()
    # A class that wins no cluster: nobody is predicted as class 2.
    method = _build(source_pkg, cfg, data)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(N, 8, generator=gen)
    probs = torch.full((N, 3), 0.05)
    probs[: N // 2, 0] = 0.9
    probs[N // 2 :, 1] = 0.9
    probs[:, 2] = 0.05
    probs = probs / probs.sum(1, keepdim=True)
    method._source_outputs = lambda: (feats, probs)  # type: ignore[method-assign]
    sel = method.compute_pseudo_labels()
    assert sel.empty_classes == (2,)
    assert method.report()["pseudo_labels"]["selected_per_class"][2] == 0
    ft = _phase(method, "fine-tune")
    assert ft.on_enter is not None
    ft.on_enter()
    out = ft.step(_batch(data))
    assert out.loss is not None and torch.isfinite(out.loss)
    # N < K is refused with a typed error; confidence mode clusters nothing.
    big = CluPConfig(n_clusters=N + 1)
    with pytest.raises(ConfigError):
        _build(source_pkg, big, data).compute_pseudo_labels()
    conf = _build(source_pkg, CluPConfig(score="confidence", keep_fraction=1.0), data)
    sel = conf.compute_pseudo_labels()
    assert sel.indices.numel() == N and sel.diagnostics.n_clusters == 0
    with pytest.raises(ConfigError):
        CluPConfig(keep_fraction=0.0)
    with pytest.raises(ConfigError):
        SSLConfig(method="simclr")  # type: ignore[arg-type]


def test_init_source_vs_scratch(source_pkg: Path) -> None:
    data = _data()
    src = _build(source_pkg, _config(init="source"), data)
    scratch = _build(source_pkg, _config(init="scratch"), data)
    ref = src.source.backbone.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in src.model.backbone.state_dict().items())
    differs = [
        not torch.equal(v, ref[k])
        for k, v in scratch.model.backbone.state_dict().items()
        if v.is_floating_point() and v.dim() > 1
    ]
    assert differs and all(differs)
    again = _build(source_pkg, _config(init="scratch"), data)
    for k, v in scratch.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])


def test_deterministic_by_seed(source_pkg: Path) -> None:
    data = _data(32)
    cfg = _config(epochs=1, freeze_prototypes_epochs=0)
    runs = []
    for seed in (0, 0, 1):
        method = _build(source_pkg, cfg, data, seed)
        Trainer(method, data, device=torch.device("cpu"), seed=seed).run()
        runs.append(_weights(method))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_multi_crop_sizes_and_normalisation() -> None:
    data = _data(8)
    x = data.tensor()
    mean = torch.tensor(data.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.spec.std).view(1, -1, 1, 1)
    high, low = multi_crop(x, torch.Generator().manual_seed(0), mean, std, SSLConfig())
    assert [t.shape[-1] for t in high] == [32, 32] and [t.shape[-1] for t in low] == [16] * 4
    unit = torch.cat([(t * std + mean).flatten() for t in high + low])
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5


def test_selection_rule_reaches_the_pseudo_labels(source_pkg: Path) -> None:
    data = _data()
    # Four point-clusters of 10 images: class 0 wins one pure and one 0.6-pure cluster,
    # class 1 the same. q = 0.3: tau = 0.6 + 0.7 * 0.4 = 0.88 per class, so "clusters"
    # keeps both pure clusters whole (20 images); "samples" keeps ceil(0.3 * 20) = 6 per
    # class, the lowest indices of each pure cluster (equal purity and confidence).
    feats = torch.cat([5.0 * torch.eye(4)[j].expand(10, 4) for j in range(4)])
    pred = [0] * 10 + [0] * 6 + [1] * 4 + [1] * 10 + [1] * 6 + [2] * 4
    probs = torch.full((N, 3), 0.1)
    probs[torch.arange(N), torch.tensor(pred)] = 0.8
    kept = {}
    for rule in ("samples", "clusters"):
        cfg = dataclasses.replace(_config(), n_clusters=4, selection=rule, keep_fraction=0.3)
        method = _build(source_pkg, cfg, data)
        method._source_outputs = lambda: (feats, probs)  # type: ignore[method-assign]
        kept[rule] = method.compute_pseudo_labels().indices.tolist()
        meta = method.report()["pseudo_labels"]
        assert meta["selection"] == rule
        assert meta["clusters_kept"] == (2 if rule == "clusters" else 0)
    assert kept["clusters"] == [*range(10), *range(20, 30)]
    assert kept["samples"] == [*range(6), *range(20, 26)]
    with pytest.raises(ConfigError, match="no clusters"):
        CluPConfig(score="confidence", selection="clusters")
