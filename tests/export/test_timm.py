"""timm architectures (issue 22): export, rebuild, adapt and serve; every refusal typed."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save, save_file
from torch import nn

from sourcefree import load_package
from sourcefree.cli.app import main
from sourcefree.engine.models import (
    Classifier,
    TimmBackbone,
    import_timm,
    load_classifier,
    resolve_architecture,
)
from sourcefree.errors import ConfigError, PackageError
from sourcefree.export import source_package
from sourcefree.package import strictjson
from sourcefree.package.loader import Package
from sourcefree.package.manifest import (
    MANIFEST_NAME,
    MAX_TIMM_OPTIONS,
    TIMM_OPTIONS,
    ArchitectureSpec,
    InputSpec,
    Manifest,
)
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.runtime import Predictor

LABELS = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
#: The acceptance models of issue 22: a ResNet-D, a MobileNetV3 and a ViT at 32 px.
MODELS: dict[str, dict[str, Any]] = {
    "resnet26d": {},
    "mobilenetv3_small_050": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
}
SPEC = InputSpec(size=(32, 32))


def _vendor(name: str, seed: int = 0, **options: Any) -> nn.Module:
    """The vendor's own timm module (random init, BatchNorm statistics moved off 0/1)."""
    timm = import_timm()
    torch.manual_seed(seed)
    model: nn.Module = timm.create_model(name, pretrained=False, num_classes=7, **options)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 2 + 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[nn.Module, Path]]:
    """``exported(name)`` -> (vendor module, source package dir), exported once per module."""
    cache: dict[str, tuple[nn.Module, Path]] = {}

    def get(name: str) -> tuple[nn.Module, Path]:
        if name not in cache:
            options = MODELS[name]
            vendor = _vendor(name, **options)
            out = tmp_path_factory.mktemp("timm") / name
            source_package(
                vendor,
                architecture=f"timm:{name}",
                architecture_options=options or None,
                labels=LABELS,
                input_spec=SPEC,
                out=out,
            )
            cache[name] = (vendor, out)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sourcefree.data.synthetic import write_domain

    return write_domain(tmp_path_factory.mktemp("target") / "wild", "wild-mild", 64, 32, seed=5)


def _probe(n: int = 6) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).normal(size=(n, 3, 32, 32)).astype("f4"))


@pytest.mark.parametrize("name", list(MODELS))
def test_export_verifies_and_rebuilds_bitwise(
    name: str, exported: Callable[[str], tuple[nn.Module, Path]]
) -> None:
    vendor, out = exported(name)
    pkg = load_package(out)
    arch = pkg.manifest.architecture
    timm = import_timm()
    assert (arch.name, arch.timm_version) == (f"timm:{name}", timm.__version__)
    assert arch.options == (MODELS[name] or None)
    raw = json.loads((out / MANIFEST_NAME).read_bytes())["architecture"]
    assert ("options" in raw) == bool(MODELS[name]) and raw["timm_version"] == timm.__version__
    model = load_classifier(arch, pkg.weights_bytes)
    assert isinstance(model.backbone, TimmBackbone)
    x = _probe()
    with torch.no_grad():
        want = vendor(x)
        logits, features = model(x)
    assert torch.equal(logits, want)
    assert features.shape == (6, arch.feature_dim)
    pred = Predictor(pkg, device="cpu").predict_array(x.numpy(), features=True)
    assert np.abs(pred.probabilities - torch.softmax(want, 1).numpy()).max() < 1e-4


def _serve_matches_torch(pkg: Package) -> None:
    """Same top-1 as torch; features within the export check's bound (1e-4 + 1e-3 max|f|)."""
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    x = _probe(16)
    pred = Predictor(pkg, device="cpu").predict_array(x.numpy(), features=True)
    with torch.no_grad():
        logits, features = (t.numpy() for t in model(x))
    assert np.array_equal(pred.indices, logits.argmax(1))
    assert pred.features is not None
    bound = 1e-4 + 1e-3 * np.abs(features).max()
    assert np.abs(pred.features - features).max() <= bound


@pytest.mark.parametrize("method", ["tent", "shot"])
@pytest.mark.parametrize("name", list(MODELS))
def test_adapt_and_serve(
    name: str,
    method: str,
    exported: Callable[[str], tuple[nn.Module, Path]],
    target: Path,
    tmp_path: Path,
) -> None:
    _, source = exported(name)
    request = AdaptRequest(
        source,
        target,
        method=method,
        out=tmp_path / "run",
        overrides=["epochs=1", "batch_size=32"],
        gate=False,
    )
    result = adapt(request)
    manifest = result.package.manifest
    assert manifest.kind == "adapted" and manifest.provenance["method"] == method
    if name.startswith("vit"):
        # LayerNorm only: tent trains the LayerNorm scale and shift, and the BatchNorm
        # steps (tent's recalibrate, shot's target-bn) are skipped and reported.
        assert result.report.method_report["bn_statistics"] == "no BatchNorm layers: skipped"
    assert manifest.architecture == load_package(source).manifest.architecture
    _serve_matches_torch(result.package)


def test_source_package_manifest_bytes_unchanged(source_pkg: Path) -> None:
    """A registry architecture writes the same four fields, in the same bytes, as before."""
    data = (source_pkg / MANIFEST_NAME).read_bytes()
    manifest = json.loads(data)
    assert sorted(manifest["architecture"]) == [
        "feature_dim",
        "in_channels",
        "name",
        "num_classes",
    ]
    assert strictjson.dumps(Manifest.from_dict(manifest).to_dict()) == data
    spec = ArchitectureSpec(name="resnet18", num_classes=7, feature_dim=512)
    assert strictjson.dumps(spec.to_dict()) == (
        b'{\n  "feature_dim": 512,\n  "in_channels": 3,\n  "name": "resnet18",\n'
        b'  "num_classes": 7\n}\n'
    )


def _spec(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "timm:vit_tiny_patch16_224",
        "num_classes": 7,
        "feature_dim": 192,
        "in_channels": 3,
        "timm_version": "1.0.31",
        "options": {"img_size": 32, "patch_size": 4},
    }
    return {**base, **fields}


def test_unknown_timm_model_is_refused_with_a_close_match() -> None:
    with pytest.raises(PackageError, match="unknown timm model 'resnet26dx'") as err:
        resolve_architecture("timm:resnet26dx")
    assert "did you mean 'timm:resnet26d'" in err.value.fix
    spec = ArchitectureSpec.from_dict(_spec(name="timm:not_a_model", options=None))
    with pytest.raises(PackageError, match="unknown timm model"):
        load_classifier(spec, b"")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"pretrained": True}, "(?i)option pretrained is not allowed"),
        ({"checkpoint_path": "/tmp/w.pth"}, "(?i)option checkpoint_path is not allowed"),
        ({"pretrained_cfg_overlay": "x"}, "not allowed"),
        ({"in_chans": 1}, "(?i)option in_chans is not allowed"),
        ({"x\u202enone": 1}, r"(?i)option 'x\\u202enone' is not allowed"),
        ({"img_size": 5000}, r"5000 is outside \[0, 4096\]"),
        ({"img_size": 32.5}, "(?i)expected an integer"),
        ({"drop_rate": -0.1}, r"outside \[0, 1000\]"),
        ({"mlp_ratio": float("nan")}, "(?i)expected a finite number"),
        ({"qkv_bias": 1}, "(?i)expected true or false"),
        ({"depth": True}, "got a boolean"),
        ({"global_pool": "../../etc"}, "short name"),
        ({"global_pool": ["avg"]}, "short name"),
        (dict.fromkeys(list(TIMM_OPTIONS)[:17], 1), "at most 16 are allowed"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], match: str) -> None:
    assert len(TIMM_OPTIONS) > MAX_TIMM_OPTIONS
    with pytest.raises(PackageError, match=match) as err:
        ArchitectureSpec.from_dict(_spec(options=options))
    assert "architecture.options" in str(err.value) and err.value.fix


def test_timm_fields_only_with_a_timm_name_and_a_version() -> None:
    with pytest.raises(PackageError, match="(?i)only timm architectures"):
        ArchitectureSpec.from_dict(_spec(name="resnet18", feature_dim=512))
    with pytest.raises(PackageError, match="(?i)records the timm version"):
        ArchitectureSpec.from_dict({k: v for k, v in _spec().items() if k != "timm_version"})
    for name in ("timm:ResNet", "timm:a/b", "timm:" + "a" * 101, "timm:"):
        with pytest.raises(PackageError, match="architecture.name"):
            ArchitectureSpec.from_dict(_spec(name=name))
    with pytest.raises(PackageError, match="(?i)only timm:NAME architectures take options"):
        resolve_architecture("resnet18", {"drop_rate": 0.1})


def test_forbidden_option_is_refused_before_export(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="(?i)option checkpoint_path is not allowed"):
        source_package(
            nn.Linear(1, 1),
            architecture="timm:resnet26d",
            architecture_options={"checkpoint_path": "w.pth"},
            labels=LABELS,
            input_spec=SPEC,
            out=tmp_path / "pkg",
        )
    assert not (tmp_path / "pkg").exists()


def _timm_weights(name: str, **options: Any) -> bytes:
    arch = resolve_architecture(f"timm:{name}", options)
    backbone, head = arch.split_module(_vendor(name, **options))
    return save(dict(Classifier(backbone, head).state_dict()))


def test_weights_of_another_model_are_refused(
    exported: Callable[[str], tuple[nn.Module, Path]],
) -> None:
    spec = load_package(exported("resnet26d")[1]).manifest.architecture
    with pytest.raises(PackageError, match="does not match the architecture") as err:
        load_classifier(spec, _timm_weights("mobilenetv3_small_050"))
    assert err.value.fix
    vit = load_package(exported("vit_tiny_patch16_224")[1]).manifest.architecture
    wrong = _timm_weights("vit_tiny_patch16_224", img_size=32, patch_size=8)
    with pytest.raises(PackageError, match="has shape"):
        load_classifier(vit, wrong)


def test_non_linear_classifier_is_refused() -> None:
    arch = resolve_architecture("timm:dla34")  # its classifier is a 1x1 convolution
    with pytest.raises(PackageError, match="'dla34' has a Conv2d classifier"):
        arch.split_module(arch.build(7, 3))


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(main, args)


def test_cli_exports_a_timm_model_and_refuses_bad_input(tmp_path: Path) -> None:
    vendor = _vendor("mobilenetv3_small_050")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in vendor.state_dict().items()}, str(weights))
    base = ["export", "--weights", str(weights), "--labels", ",".join(LABELS)]
    base += ["--input-size", "32"]
    wrong = _cli([*base, "--arch", "timm:resnet26d", "--out", str(tmp_path / "a")])
    assert wrong.exit_code == 2 and "Traceback" not in wrong.output
    assert "do not hold 'conv1.0.weight'" in wrong.output
    banned = ["--arch", "timm:mobilenetv3_small_050", "--arch-option", "pretrained=true"]
    bad = _cli([*base, *banned, "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "Option pretrained is not allowed" in bad.output
    twice = ["--arch-option", "drop_rate=0.1", "--arch-option", "drop_rate=0.2"]
    dup = _cli([*base, "--arch", "timm:mobilenetv3_small_050", *twice, "--out", "c"])
    assert dup.exit_code == 2 and "given twice" in dup.output
    opts = ["--arch-option", "drop_rate=0.1", "--arch-option", "global_pool=avg"]
    good = _cli(
        [*base, "--arch", "timm:mobilenetv3_small_050", *opts, "--out", str(tmp_path / "d")]
    )
    assert good.exit_code == 0, good.output
    arch = load_package(tmp_path / "d").manifest.architecture
    assert arch.options == {"drop_rate": 0.1, "global_pool": "avg"}


def test_clup_rebuilds_the_timm_model_with_its_options(
    exported: Callable[[str], tuple[nn.Module, Path]], target: Path, tmp_path: Path
) -> None:
    """CluP builds its own copy of the backbone from the manifest's record, options included
    (a ViT exported with img_size=32 cannot be rebuilt at timm's default 224)."""
    name = next(n for n in MODELS if n.startswith("vit"))
    _, source = exported(name)
    request = AdaptRequest(
        source,
        target,
        method="clup",
        out=tmp_path / "run",
        overrides=["ssl.epochs=1", "finetune.epochs=1", "batch_size=32", "ssl.batch_size=32"],
        gate=False,
    )
    with pytest.raises(ConfigError, match="local crops"):
        adapt(request)  # 16 px local crops: the ViT was built for 32 px only
    no_local = dataclasses.replace(
        request, overrides=(*request.overrides, "ssl.local_crops=0"), out=tmp_path / "run2"
    )
    result = adapt(no_local)
    assert result.package.manifest.architecture == load_package(source).manifest.architecture
    _serve_matches_torch(result.package)
