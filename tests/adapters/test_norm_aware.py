"""Normalisation-aware methods (issue 22, point 3): every method on LayerNorm / GroupNorm models.

Each registered method either trains a short run on a LayerNorm-only model (a timm
ViT) and on a GroupNorm model (smallcnn with its BatchNorms swapped for GroupNorm),
and says in its diagnostics which BatchNorm steps it skipped, or refuses with a
typed error that names the reason. On BatchNorm models nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sourcefree.cli.app import main
from sourcefree.data.synthetic import AU_NAMES, generate
from sourcefree.engine import config as cfgmod
from sourcefree.engine.method import (
    BN_SKIPPED,
    Method,
    MethodContext,
    SourceModel,
    TargetData,
    batchnorm_layers,
    norm_layers,
)
from sourcefree.engine.models import Classifier, load_classifier
from sourcefree.engine.registry import get_method, list_methods
from sourcefree.engine.reproducibility import seed_everything
from sourcefree.engine.trainer import Trainer, build_optimizer
from sourcefree.errors import ConfigError, PackageError, SourcefreeError
from sourcefree.export import source_package
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from tests.conftest import LABELS, au_frequencies_for, make_au_detector

METHODS = list_methods()
VIT = "vit_tiny_patch16_224"
GN = "poolformer_s12"
VIT_OPTIONS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "depth": 2,
    "embed_dim": 48,
    "num_heads": 3,
}
#: One short run: a single epoch of small batches (clup: its nested schedules too).
SHORT: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 16,
    "label_batch_size": 16,
    "ssl.epochs": 1,
    "ssl.batch_size": 16,
    "ssl.freeze_prototypes_epochs": 0,
    "ssl.queue_start_epoch": 1,
    "finetune.epochs": 1,
    "kmeans_n_init": 1,
    "kmeans_max_iter": 20,
    "di_epochs": 0,
}
#: Typed refusals by (method, model): the error class and the reason it names.
REFUSALS: dict[tuple[str, str], tuple[type[SourcefreeError], str]] = {
    ("adabn", "layernorm"): (ConfigError, "the model has no BatchNorm layers"),
    ("adabn", "groupnorm"): (ConfigError, "the model has no BatchNorm layers"),
    ("la-cmfer", "layernorm"): (PackageError, "no feature-map split"),
    ("la-cmfer", "groupnorm"): (PackageError, "no feature-map split"),
    # The ViT takes a fixed input size: CluP's smaller SSL crops cannot pass (see below).
    ("clup", "layernorm"): (ConfigError, "local crops .* do not fit this model"),
}


def _export(out: Path, name: str, options: dict[str, Any]) -> Path:
    """A random-init timm package (32 px) with every optional part (class counts, AUs)."""
    from sourcefree.engine.models import import_timm

    torch.manual_seed(0)
    model = import_timm().create_model(name, pretrained=False, num_classes=len(LABELS), **options)
    source_package(
        model.eval(),
        architecture=f"timm:{name}",
        architecture_options=options or None,
        labels=list(LABELS),
        input_spec=InputSpec(size=(32, 32)),
        out=out,
        source_stats={
            "class_counts": [10, 20, 30],
            "au_frequencies": au_frequencies_for(list(LABELS)),
        },
        au_detector=make_au_detector(32),
        au_names=AU_NAMES,
    )
    return out


@pytest.fixture(scope="module")
def vit_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LayerNorm only: a timm ViT (2 blocks, 32 px)."""
    return _export(tmp_path_factory.mktemp("ln") / "vit", VIT, VIT_OPTIONS)


@pytest.fixture(scope="module")
def gn_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GroupNorm: timm's PoolFormer-S12 (24 GroupNorm1 layers and a LayerNorm2d, 32 px)."""
    return _export(tmp_path_factory.mktemp("gn") / "poolformer", GN, {})


def _without_batchnorm(model: Classifier) -> Classifier:
    """``model`` with every BatchNorm2d replaced by Identity: no normalisation at all."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.BatchNorm2d):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.Identity())
    return model


def _data(n: int = 32) -> TargetData:
    s = generate("wild-mild", n, 32, seed=1)
    return TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="x")


def _model(kind: str, pkg_path: Path) -> Classifier:
    """The package's model ("none": smallcnn without its BatchNorms)."""
    pkg = load_package(pkg_path)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    return _without_batchnorm(model) if kind == "none" else model


def _build(name: str, kind: str, pkg_path: Path, data: TargetData, **overrides: Any) -> Method:
    cls = get_method(name)
    pkg = load_package(pkg_path)
    ctx = MethodContext((SourceModel(pkg, _model(kind, pkg_path)),), data, torch.device("cpu"), 0)
    seed_everything(0)
    fields = {f for f, _, _ in cfgmod.describe(cls.config_class)}
    short: dict[str, Any] = {}
    for key, value in {**SHORT, **overrides}.items():
        if key in fields:
            cfgmod.set_dotted(short, key, value)
    return cls(cfgmod.from_dict(cls.config_class, short), ctx)


@pytest.fixture
def norm_pkg(request: pytest.FixtureRequest) -> Callable[[str], Path]:
    """``norm_pkg(kind)``: the LayerNorm or GroupNorm package (built once per module)."""
    return lambda kind: request.getfixturevalue("vit_pkg" if kind == "layernorm" else "gn_pkg")


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_or_refuses_on_norm_models(
    name: str, kind: str, norm_pkg: Callable[[str], Path]
) -> None:
    data = _data()
    pkg_path = norm_pkg(kind)
    if (name, kind) in REFUSALS:
        error, reason = REFUSALS[name, kind]
        with pytest.raises(error, match=reason) as err:
            _build(name, kind, pkg_path, data)
        assert err.value.fix, "a refusal says how to fix it"
        return
    method = _build(name, kind, pkg_path, data)
    model = method.export_model()
    assert norm_layers(model) and not batchnorm_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    phases = [p.name for p in method.phases()]
    assert not {"bn-stats", "target-bn"} & set(phases), phases
    result = Trainer(method, data, device=torch.device("cpu"), seed=0).run()
    assert all(log.done for log in result.phases)
    after = method.export_model().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "nothing was adapted"
    logits, _ = method.export_model()(data.tensor(slice(0, 4)))
    assert bool(torch.isfinite(logits).all())
    notes = method.diagnostics()
    # With its defaults every method has a BatchNorm step: skipped here, and said so.
    assert notes["bn_statistics"] == BN_SKIPPED
    assert notes["bn_statistics_skipped"], notes


def test_clup_runs_on_layernorm_without_local_crops(vit_pkg: Path) -> None:
    """CluP's refusal above names its fix (``ssl.local_crops=0``); with it, CluP runs."""
    data = _data()
    method = _build("clup", "layernorm", vit_pkg, data, **{"ssl.local_crops": 0})
    result = Trainer(method, data, device=torch.device("cpu"), seed=0).run()
    assert all(log.done for log in result.phases)
    assert method.diagnostics()["bn_statistics_skipped"] == ["labeler=adabn", "bn-stats"]


@pytest.mark.parametrize("name", METHODS)
def test_bn_models_keep_their_bn_steps_and_report_keys(name: str, au_source_pkg: Path) -> None:
    """On a BatchNorm model no step is skipped and no note is added to the report."""
    method = _build(name, "batchnorm", au_source_pkg, _data())
    assert not method.notes
    assert method.diagnostics() == method.report()
    if name in ("adabn", "tent", "shot", "clup"):
        assert {"bn-stats", "target-bn"} & {p.name for p in method.phases()}


@pytest.mark.parametrize("kind", ["layernorm", "groupnorm"])
def test_tent_trains_exactly_the_norm_affine_parameters(
    kind: str, norm_pkg: Callable[[str], Path]
) -> None:
    """Tent's group is every LayerNorm / GroupNorm weight and bias; nothing else changes."""
    data = _data()
    method = _build("tent", kind, norm_pkg(kind), data)
    model = method.export_model()
    affine = {id(p) for m in norm_layers(model) for p in (m.weight, m.bias)}
    (phase,) = method.phases()  # the BatchNorm recalibration is skipped
    opt = build_optimizer(phase)
    assert opt is not None and len(opt.param_groups) == 1
    assert {id(p) for p in opt.param_groups[0]["params"]} == affine
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(method, data, device=torch.device("cpu"), seed=0).run()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= {names[i] for i in affine}
    assert method.diagnostics() == {
        "bn_statistics": BN_SKIPPED,
        "bn_statistics_skipped": ["bn-stats"],
    }


def test_tent_on_bn_models_trains_the_bn_parameters_in_module_order(au_source_pkg: Path) -> None:
    """Same group, same order as before LayerNorm support: the numbers cannot move."""
    method = _build("tent", "batchnorm", au_source_pkg, _data())
    want = [p for bn in batchnorm_layers(method.export_model()) for p in (bn.weight, bn.bias)]
    first = method.phases()[0]
    assert first.parameters is not None
    (group,) = first.parameters()
    assert [id(p) for p in group.params] == [id(p) for p in want]
    assert [p.name for p in method.phases()] == ["entropy", "bn-stats"]


@pytest.mark.parametrize("name", ["tent", "adabn"])
def test_a_model_without_normalisation_is_refused(name: str, au_source_pkg: Path) -> None:
    reason = {"tent": "no BatchNorm, LayerNorm or GroupNorm layer", "adabn": "no BatchNorm"}
    with pytest.raises(ConfigError, match=reason[name]) as err:
        _build(name, "none", au_source_pkg, _data())
    assert "nothing would train" in err.value.why or "equal the source" in err.value.why


def test_adapt_reports_the_skipped_step(vit_pkg: Path, target_small: Path, tmp_path: Path) -> None:
    """report.json's method_report says the BatchNorm step was skipped (never silent)."""
    result = adapt(
        AdaptRequest(
            vit_pkg,
            target_small,
            method="tent",
            out=tmp_path / "run",
            overrides=["batch_size=16"],
            device="cpu",
            gate=False,
        )
    )
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (
        result.report.method_report
        == on_disk["method_report"]
        == {
            "bn_statistics": BN_SKIPPED,
            "bn_statistics_skipped": ["bn-stats"],
        }
    )
    assert result.package.manifest.provenance["method"] == "tent"


def test_cli_adabn_on_a_layernorm_model_exits_2(
    vit_pkg: Path, target_small: Path, tmp_path: Path
) -> None:
    args = ["adapt", str(vit_pkg), str(target_small), "-m", "adabn", "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "adabn has nothing to adapt: the model has no BatchNorm layers" in result.output
    assert "use tent" in result.output and "Traceback" not in result.output
