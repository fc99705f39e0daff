"""LA-CMFER source-free: equations on hand-made tensors, branches, several sources, export."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sourcefree.adapters.la_cmfer import (
    LaCmfer,
    LaCmferConfig,
    LaCmferNet,
    LaCmferOptimConfig,
    alignment_losses,
    decode_architecture,
    encode_architecture,
    grid_cells,
    hardness,
    hardness_weights,
    multi_view_vote,
    multiview_consistency_loss,
)
from sourcefree.data.synthetic import CLASSES, generate
from sourcefree.engine import config as cfgmod
from sourcefree.engine.method import Batch, MethodContext, SourceModel, TargetData
from sourcefree.engine.models import build_classifier, load_classifier
from sourcefree.engine.reproducibility import seed_everything
from sourcefree.engine.trainer import build_optimizer
from sourcefree.errors import ConfigError, PackageError
from sourcefree.export import source_package
from sourcefree.kernels import gaussian_mmd
from sourcefree.kernels.reference import mmd_bandwidths
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.runtime.predictor import Predictor
from sourcefree.vendor.training import TrainConfig, class_feature_means, to_tensor, train_classifier

LABELS = ["surprise", "fear", "happiness"]


def _vendor(out: Path, seed: int, means: bool = True) -> Path:
    """A tiny smallcnn package with BN statistics and (optionally) class feature means."""
    torch.manual_seed(seed)
    model = build_classifier("smallcnn", len(LABELS))
    x = torch.randn(48, 3, 32, 32) * 2 + 0.3
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    y = np.arange(48) % len(LABELS)
    stats: dict[str, object] = {"class_counts": [10, 20, 30]}
    if means:
        stats["class_feature_means"] = class_feature_means(model, x, y, len(LABELS))
    return _export(model, out, stats)


def _export(model: torch.nn.Module, out: Path, stats: dict[str, object]) -> Path:
    source_package(
        model,
        architecture="smallcnn",
        labels=LABELS,
        input_spec=InputSpec(size=(32, 32)),
        out=out,
        source_stats=stats,
    )
    return out


@pytest.fixture(scope="module")
def vendors(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lacmfer")
    return _vendor(root / "vendor-a", 0), _vendor(root / "vendor-b", 1)


def _data(n: int = 32) -> TargetData:
    s = generate("wild-mild", n, 32, seed=1)
    return TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="x")


def _method(paths: list[Path], data: TargetData, **kw: object) -> LaCmfer:
    sources = []
    for p in paths:
        pkg = load_package(p)
        sources.append(
            SourceModel(pkg, load_classifier(pkg.manifest.architecture, pkg.weights_bytes))
        )
    seed_everything(0)
    cfg = cfgmod.from_dict(LaCmferConfig, {"batch_size": 16, **kw})
    return LaCmfer(cfg, MethodContext(tuple(sources), data, torch.device("cpu"), 0))


# --- config ------------------------------------------------------------------------------


def test_defaults_are_the_papers() -> None:
    cfg = LaCmferConfig()
    assert (cfg.alpha, cfg.lambda_cid, cfg.beta, cfg.gamma) == (0.1, 0.02, 0.5, 0.1)
    assert (cfg.tau, cfg.epsilon) == (0.9, 0.4)
    assert cfg.optim.lr == 0.01 and not cfg.train_global_head
    assert not cfg.augment.enabled and cfg.target_bn_init
    assert LaCmfer.min_sources == 1 and LaCmfer.max_sources >= 2


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"tau": 1.0}, "tau=1.0"),
        ({"epsilon": -0.1}, "epsilon=-0.1"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"alpha": 0.0, "beta": 0.0, "gamma": 0.0}, "nothing to minimise"),
        ({"kernel_num": 0}, "kernel_num=0"),
        ({"batch_size": 1}, "batch_size=1"),
    ],
)
def test_config_validation(kw: dict[str, float], text: str) -> None:
    with pytest.raises(ConfigError, match=text):
        LaCmferConfig(**kw)  # type: ignore[arg-type]


def test_optim_validation() -> None:
    with pytest.raises(ConfigError, match="lr=0"):
        LaCmferOptimConfig(lr=0)


# --- equations on hand-made tensors --------------------------------------------------------


def test_eq3_hardness_target_and_source() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.4, 0.4, 0.2]])
    # targets: drop every entry equal to the maximum, L2 norm of the rest
    want = torch.tensor([math.sqrt(0.09 + 0.04), 0.0, 0.2])
    assert torch.allclose(hardness(p), want)
    # sources: the real class entry is zeroed instead
    real = torch.tensor([1, 0, 2])
    want_src = torch.tensor([math.sqrt(0.25 + 0.04), 0.0, math.sqrt(0.32)])
    assert torch.allclose(hardness(p, real), want_src)


def test_eq4_weights_normalise_over_the_batch() -> None:
    w = hardness_weights(torch.tensor([1.0, 3.0, 0.0]))
    assert torch.allclose(w, torch.tensor([0.25, 0.75, 0.0]), atol=1e-7)
    assert float(w.sum()) == pytest.approx(1.0)
    flat = hardness_weights(torch.zeros(4))  # one-hot batch: uniform, not 0/0
    assert torch.allclose(flat, torch.full((4,), 0.25))


def test_eq12_multi_view_vote() -> None:
    pg = torch.tensor([[0.95, 0.03, 0.02], [0.6, 0.3, 0.1], [0.92, 0.05, 0.03], [0.2, 0.7, 0.1]])
    pl = torch.tensor([[0.5, 0.3, 0.2], [0.95, 0.04, 0.01], [0.1, 0.85, 0.05], [0.3, 0.6, 0.1]])
    labels, selected = multi_view_vote(pg, pl, 0.9)
    # 0: agree, global > tau; 1: agree, local > tau; 2: disagree; 3: agree, both <= tau
    assert selected.tolist() == [True, True, False, False]
    assert labels.tolist() == [0, 0, -1, -1]


def test_eq10_11_consistency_loss() -> None:
    one_hot = torch.eye(3)[[0, 1, 2, 1]]
    assert float(multiview_consistency_loss(one_hot, one_hot)) == pytest.approx(0.0, abs=1e-7)
    # crossed views: every global class is another local class -> maximal (2)
    crossed = torch.eye(3)[[1, 2, 0, 2]]
    assert float(multiview_consistency_loss(one_hot, crossed)) == pytest.approx(2.0)
    # by hand: S(|rownorm(M) - I|) = 2 sum_j (1 - rownorm(M)_jj)
    pg = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    pl = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]])
    m = pg.t() @ pl
    rows = m / m.sum(1, keepdim=True)
    cols = m.t() / m.t().sum(1, keepdim=True)
    want = (2 * (1 - rows.diagonal()).sum() + 2 * (1 - cols.diagonal()).sum()) / 6
    assert float(multiview_consistency_loss(pg, pl)) == pytest.approx(float(want), rel=1e-6)


def test_alignment_uses_weighted_mmd_and_pulls_same_class() -> None:
    torch.manual_seed(0)
    means = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0]])
    feats = torch.cat([means[i] + 0.1 * torch.randn(4, 2) for i in range(3)]).requires_grad_()
    probs = torch.eye(3)[torch.arange(12) // 4] * 0.8 + 0.2 / 3
    mean_probs = torch.eye(3) * 0.8 + 0.2 / 3
    prior = torch.tensor([0.2, 0.3, 0.5])
    terms = alignment_losses(feats, probs, means, mean_probs, prior, epsilon=0.4)
    assert terms.classes == 3
    bw = mmd_bandwidths(torch.cat([means, feats.detach()]), 2.0, 5)
    w_src = prior * (hardness(mean_probs, torch.arange(3)) + 1e-8)
    w_tgt = hardness_weights(hardness(probs))
    want = gaussian_mmd(means, feats, source_weight=w_src, target_weight=w_tgt, bandwidths=bw)
    assert float(terms.sid.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    # features sit on their class means: the pull terms are small, the push terms large
    assert float(terms.cid.detach()) < 0
    (terms.sid + terms.cid).backward()  # type: ignore[no-untyped-call]
    assert feats.grad is not None and bool(torch.isfinite(feats.grad).all())


def test_alignment_skips_unreliable_samples() -> None:
    feats = torch.randn(5, 2)
    flat = torch.full((5, 3), 1 / 3)  # top probability 0.33 <= epsilon 0.4
    terms = alignment_losses(
        feats, flat, torch.randn(3, 2), torch.eye(3), torch.ones(3) / 3, epsilon=0.4
    )
    assert float(terms.sid) == 0.0 and float(terms.cid) == 0.0 and terms.classes == 0


def test_grid_cells_quadrants() -> None:
    fmap = torch.arange(16.0).view(1, 1, 4, 4)
    cells = grid_cells(fmap)[0, :, 0]
    assert cells.tolist() == [2.5, 4.5, 10.5, 12.5]  # tl, tr, bl, br
    assert torch.allclose(cells.mean(), fmap.mean())
    odd = grid_cells(torch.arange(9.0).view(1, 1, 3, 3))[0, :, 0]
    assert odd.tolist() == [2.0, 3.0, 5.0, 6.0]  # adaptive bounds: the middle row is shared


def test_architecture_names_round_trip() -> None:
    for archs in (["smallcnn"], ["smallcnn", "smallcnn"], ["resnet18", "smallcnn", "smallcnn"]):
        assert decode_architecture(encode_architecture(archs)) == archs
    assert encode_architecture(["smallcnn", "smallcnn"]) == "la-cmfer.smallcnn-x2"
    with pytest.raises(ConfigError, match="too long"):
        encode_architecture(["mobilenet_v3_large", "efficientnet_b0"] * 3)
    with pytest.raises(PackageError):
        decode_architecture("smallcnn")


# --- the method --------------------------------------------------------------------------


def test_branches_start_as_the_source_model(vendors: tuple[Path, Path]) -> None:
    data = _data(16)
    method = _method([vendors[0]], data)
    pkg = load_package(vendors[0])
    source = load_classifier(pkg.manifest.architecture, pkg.weights_bytes).eval()
    x = data.tensor()
    with torch.no_grad():
        z_g, z_l, feats = method.net.eval().branch_logits(x)
        want, want_f = source(x)
    assert torch.allclose(z_g, want, atol=1e-5) and torch.allclose(z_l, want, atol=1e-5)
    assert torch.allclose(feats, want_f, atol=1e-6)


@pytest.fixture(scope="module")
def trained_vendor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vendor briefly trained on studio faces of LABELS: its predictions on target
    images differ between images, which the cluster-level term (eq. 7) needs (an
    untrained model gives every image the same class)."""
    s = generate("studio", 700, 32, seed=5)
    ids = [CLASSES.index(c) for c in LABELS]
    keep = np.isin(s.labels, ids)
    y = np.searchsorted(ids, s.labels[keep])
    model = train_classifier(
        s.images[keep], y, len(LABELS), InputSpec(size=(32, 32)), TrainConfig(epochs=2, seed=0)
    )
    x = to_tensor(s.images[keep][:48], InputSpec(size=(32, 32)))
    means = class_feature_means(model, x, y[:48], len(LABELS))
    return _export(
        model, tmp_path_factory.mktemp("lacmfer-trained") / "vendor", {"class_feature_means": means}
    )


def test_losses_finite_and_gradients_reach_trainable_params(trained_vendor: Path) -> None:
    data = _data()
    # epsilon 0 and tau low so that every term is active
    method = _method([trained_vendor], data, epsilon=0.0, tau=0.34)
    phase = method.phases()[-1]
    assert phase.name == "adapt" and phase.on_enter is not None
    phase.on_enter()
    opt = build_optimizer(phase)
    assert opt is not None
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    loss, parts = method.losses(data.tensor(torch.arange(16)))
    assert bool(torch.isfinite(loss))
    for key in ("sid", "cid", "mcc", "mvv"):
        assert bool(torch.isfinite(parts[key])) and float(parts[key]) != 0.0, key
    loss.backward()  # type: ignore[no-untyped-call]
    missing = [i for i, p in enumerate(params) if p.grad is None or not p.grad.any()]
    assert not missing
    trained = {id(p) for p in params}
    frozen = [p for h in method.global_heads for p in h.parameters()]
    assert not any(id(p) in trained for p in frozen), "the source heads C_G stay frozen"


def test_missing_means_warn_and_skip_alignment(tmp_path: Path) -> None:
    bare = _vendor(tmp_path / "bare", 2, means=False)
    with pytest.warns(UserWarning, match="class_feature_means"):
        method = _method([bare], _data(16), epsilon=0.0)
    _, parts = method.losses(_data(16).tensor())
    assert float(parts["sid"]) == 0.0 and float(parts["cid"]) == 0.0


def test_means_of_another_width_are_refused(tmp_path: Path, vendors: tuple[Path, Path]) -> None:
    pkg = load_package(vendors[0])
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    source_package(
        model,
        architecture="smallcnn",
        labels=LABELS,
        input_spec=InputSpec(size=(32, 32)),
        out=tmp_path / "bad",
        source_stats={"class_feature_means": [[0.0, 1.0]] * 3},
    )
    with pytest.raises(PackageError, match="class_feature_means rows have 2 values"):
        _method([tmp_path / "bad"], _data(8))


def test_two_sources_train_and_couple_through_the_vote(vendors: tuple[Path, Path]) -> None:
    data = _data()
    method = _method(list(vendors), data, tau=0.34, epsilon=0.0)
    assert len(method.net.members) == 2
    assert method.export_architecture() == "la-cmfer.smallcnn-x2"
    phase = method.phases()[-1]
    assert phase.on_enter is not None
    phase.on_enter()
    opt = build_optimizer(phase)
    assert opt is not None
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.requires_grad_(True)
    x = data.tensor(torch.arange(16))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss, _ = method.losses(x)
        loss.backward()  # type: ignore[no-untyped-call]
        losses.append(float(loss.detach()))
        opt.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for member in method.net.members:
        assert member.local_head.weight.grad is not None
    # the exported head is the mean of the sources' global logits
    net = method.export_model()
    assert isinstance(net, LaCmferNet)
    with torch.no_grad():
        z_g, _, feats = net.branch_logits(x)
        halves = (feats[:, :128], feats[:, 128:])
        per_source = [h(f) for h, f in zip(method.global_heads, halves, strict=True)]
    assert torch.allclose(z_g, torch.stack(per_source).mean(0), atol=1e-5)


def test_adapt_two_packages_exports_the_more_confident_branch(
    vendors: tuple[Path, Path], tmp_path: Path
) -> None:
    from sourcefree.data.synthetic import write_domain

    target = write_domain(tmp_path / "target", "wild-mild", 32, 32, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both vendors ship class means: no warning
        result = adapt(
            AdaptRequest(
                list(vendors),
                target,
                method="la-cmfer",
                out=tmp_path / "out",
                overrides=["batch_size=16", "epochs=1"],
                device="cpu",
            )
        )
    pkg = result.package
    manifest = pkg.manifest
    assert manifest.kind == "adapted" and manifest.architecture.name == "la-cmfer.smallcnn-x2"
    assert manifest.architecture.feature_dim == 256
    assert manifest.provenance["source_packages"] == [load_package(v).sha256 for v in vendors]
    model = load_classifier(manifest.architecture, pkg.weights_bytes)
    assert isinstance(model, LaCmferNet)
    x = _data(8).tensor()
    with torch.no_grad():
        logits, _ = model(x)
        z_g, z_l, _ = model.branch_logits(x)
    conf_g = torch.softmax(z_g, 1).amax(1)
    conf_l = torch.softmax(z_l, 1).amax(1)
    want = torch.where((conf_l > conf_g).unsqueeze(1), z_l, z_g)
    assert torch.equal(logits, want)
    got = Predictor(pkg, device="cpu").predict_array(x.numpy()).probabilities
    np.testing.assert_allclose(got, torch.softmax(logits, 1).numpy(), atol=1e-4)
    report = result.report.method_report
    assert report["sources"] == 2 and report["aligned_sources"] == [True, True]


def test_vendor_means_take_the_local_branch_through_a_l(
    trained_vendor: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20.3: the local branch's class means (features, hardness, reliability) go
    through A_L and C_L as target cells do, not through C_L alone."""
    from sourcefree.adapters import la_cmfer as mod

    data = _data(16)
    method = _method([trained_vendor], data, epsilon=0.0)
    member = method.net.members[0]
    with torch.no_grad():  # move A_L away from the identity
        torch.manual_seed(3)
        member.local_proj.weight.add_(0.2 * torch.randn_like(member.local_proj.weight))
        member.local_proj.bias.add_(0.5)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = mod.alignment_losses

    def spy(*args: torch.Tensor, **kw: Any) -> mod.AlignmentTerms:
        calls.append((args[0].detach(), args[1].detach(), args[2].detach(), args[3].detach()))
        return real(*args, **kw)

    monkeypatch.setattr(mod, "alignment_losses", spy)
    x = data.tensor()
    method.losses(x)
    assert len(calls) == 2  # global, then local
    feats, probs, means, mean_probs = calls[1]
    mu = method._means[0]
    assert mu is not None
    with torch.no_grad():
        _, projected = member.views(x)
        a_l = member.project(mu)
        want = torch.softmax(member.local_head(a_l.repeat(1, 4)), 1)
        skipped = torch.softmax(member.local_head(mu.repeat(1, 4)), 1)
    # target side: A_L cells, their average as the feature
    assert torch.allclose(feats, projected.mean(1), atol=1e-5)
    assert torch.allclose(probs, torch.softmax(member.local_logits(projected), 1), atol=1e-5)
    # the means: the same A_L + C_L path (the old code skipped A_L)
    assert torch.allclose(means, a_l, atol=1e-5)
    assert torch.allclose(mean_probs, want, atol=1e-5)
    assert not torch.allclose(want, skipped, atol=1e-3)
    # the global branch keeps the vendor's means and the source head
    g_means, g_mean_probs = calls[0][2], calls[0][3]
    assert torch.equal(g_means, mu)
    head = method.global_heads[0]
    assert torch.allclose(g_mean_probs, torch.softmax(head(mu), 1).detach(), atol=1e-6)


def test_local_init_random_starts_a_new_branch(vendors: tuple[Path, Path]) -> None:
    data = _data(16)
    x = data.tensor()
    with pytest.raises(ConfigError, match="local_init='scratch'"):
        LaCmferConfig(local_init="scratch")  # type: ignore[arg-type]
    runs = [_method([vendors[0]], data, local_init="random") for _ in range(2)]
    source = _method([vendors[0]], data)
    with torch.no_grad():
        z = [m.net.eval().branch_logits(x) for m in (*runs, source)]
    # the global branch is the vendor's model either way; the local one is new and seeded
    assert torch.allclose(z[0][0], z[2][0], atol=1e-6)
    assert torch.equal(z[0][1], z[1][1])
    assert not torch.allclose(z[0][1], z[2][1], atol=1e-2)
    assert not torch.equal(runs[0].net.members[0].local_proj.weight, torch.eye(128))


def test_report_counts_agreement_and_votes(vendors: tuple[Path, Path]) -> None:
    data = _data(16)
    method = _method([vendors[0]], data, tau=0.34)
    enter = method.phases()[-1].on_enter
    assert enter is not None
    enter()
    method._step(Batch(data.tensor(), torch.arange(16), torch.Generator(), 0, 0, 0.0))
    report = method.report()
    # source init: both branches are the source model, so they agree on every image
    assert report["agreed_share_in_training"] == 1.0
    assert report["local_init"] == "source"
    assert method.state_meta()["agreed"] == 16
