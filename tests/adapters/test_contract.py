"""Contract every registered method must meet (parametrized over the registry)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.data.synthetic import generate
from sourcefree.engine import config as cfgmod
from sourcefree.engine.method import Batch, Method, MethodContext, SourceModel, TargetData
from sourcefree.engine.models import load_classifier
from sourcefree.engine.registry import get_method, list_methods
from sourcefree.engine.reproducibility import seed_everything
from sourcefree.engine.trainer import build_optimizer
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.runtime.predictor import Predictor

METHODS = list_methods()
SMALL = {"batch_size": 16}


@pytest.fixture
def contract_pkg(au_source_pkg: Path) -> Path:
    """The package every method is checked on. It ships every optional part (class counts,
    AU frequencies, an AU detector), so methods that need one (AdaFER) build from defaults."""
    return au_source_pkg


def _data(n: int = 48) -> TargetData:
    s = generate("wild-mild", n, 32, seed=1)
    return TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="x")


def _build(name: str, pkg_path: Path, data: TargetData) -> Method:
    cls = get_method(name)
    pkg = load_package(pkg_path)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    ctx = MethodContext((SourceModel(pkg, model),), data, torch.device("cpu"), 0)
    seed_everything(0)
    fields = {f for f, _, _ in cfgmod.describe(cls.config_class)}
    cfg = cfgmod.from_dict(cls.config_class, {k: v for k, v in SMALL.items() if k in fields})
    return cls(cfg, ctx)


def _batch(data: TargetData, n: int = 16) -> Batch:
    idx = torch.arange(n)
    return Batch(data.tensor(idx), idx, torch.Generator().manual_seed(0), 0, 0, 0.0)


def test_registry_has_the_baselines() -> None:
    assert {"adabn", "tent"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_builds_from_defaults_and_config_round_trips(name: str, tmp_path: Path) -> None:
    cls = get_method(name)
    assert cls.description and "\n" not in cls.description
    default = cls.config_class()
    as_dict = cfgmod.to_dict(default)
    assert cfgmod.from_dict(cls.config_class, as_dict) == default
    path = tmp_path / "c.yaml"
    path.write_text(cfgmod.to_yaml(default))
    assert cfgmod.load_config(cls.config_class, file=path) == default
    docs = cfgmod.field_docs(cls.config_class)
    assert all(docs.get(k) for k in as_dict), f"every field of {name} needs a docstring"


@pytest.mark.parametrize("name", METHODS)
def test_losses_gradients_and_descent(name: str, contract_pkg: Path) -> None:
    data = _data()
    method = _build(name, contract_pkg, data)
    batch = _batch(data)
    for phase in method.phases():
        opt = build_optimizer(phase)
        if phase.on_enter is not None:
            phase.on_enter()
        if opt is None:
            out = phase.step(batch)
            assert out.loss is None or bool(torch.isfinite(out.loss))
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:
            p.requires_grad_(True)
        losses = []
        for i in range(6):
            opt.zero_grad()
            out = phase.step(batch)
            assert out.loss is not None and bool(torch.isfinite(out.loss))
            out.loss.backward()  # type: ignore[no-untyped-call]
            if i == 0:
                missing = [j for j, p in enumerate(params) if p.grad is None or not p.grad.any()]
                assert not missing, f"{name}/{phase.name}: no gradient for params {missing}"
            losses.append(float(out.loss.detach()))
            opt.step()
        assert losses[-1] < losses[0], f"{name}/{phase.name}: loss did not fall: {losses}"
        for p in params:
            p.requires_grad_(False)


def _state(method: Method) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for mname, module in method.modules().items():
        out.update({f"{mname}.{k}": v.clone() for k, v in module.state_dict().items()})
    out.update({f"method.{k}": v.clone() for k, v in method.state_tensors().items()})
    return out


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trips(name: str, contract_pkg: Path) -> None:
    data = _data()
    a = _build(name, contract_pkg, data)
    for phase in a.phases():
        if phase.on_enter is not None:
            phase.on_enter()
        phase.step(_batch(data))
    b = _build(name, contract_pkg, data)
    for mname, module in a.modules().items():
        b.modules()[mname].load_state_dict(module.state_dict())
    b.load_state(a.state_tensors(), a.state_meta())
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(a.state_meta(), Mapping)


@pytest.mark.parametrize("name", METHODS)
def test_adapted_export_matches_onnxruntime(
    name: str, contract_pkg: Path, tmp_path: Path, target_small: Path
) -> None:
    sets = [f"{k}={v}" for k, v in SMALL.items()]
    result = adapt(
        AdaptRequest(
            contract_pkg,
            target_small,
            method=name,
            out=tmp_path / "out",
            overrides=sets,
            device="cpu",
        )
    )
    pkg = result.package
    assert pkg.manifest.kind == "adapted"
    assert pkg.manifest.provenance["method"] == name
    assert pkg.manifest.provenance["source_package_sha256"] == load_package(contract_pkg).sha256
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    x = _data(8).tensor()
    with torch.no_grad():
        want = model(x)[0].numpy()
    got = Predictor(pkg, device="cpu").predict_array(x.numpy()).probabilities
    np.testing.assert_allclose(got, torch.softmax(torch.from_numpy(want), 1).numpy(), atol=1e-4)
    assert not (tmp_path / ".out.work").exists(), "the run directory is removed after success"


@pytest.mark.parametrize("name", METHODS)
def test_adapt_help(name: str) -> None:
    result = CliRunner().invoke(adapt_command, ["--help"])
    assert result.exit_code == 0 and "--resume" in result.output
