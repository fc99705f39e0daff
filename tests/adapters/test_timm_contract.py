"""Every method over timm families (issue 22, point 5): export -> verify -> each method's
contract or its typed refusal -> adapted package -> runtime parity.

Small random-init models at 32 px: a ResNet-D, a MobileNetV3, a RegNet (BatchNorm), a
ConvNeXt and a DeiT (LayerNorm). :data:`EXPECTED` is the support table of
docs/package-format.md ("timm architectures"): what runs and what refuses, and why.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sourcefree.data.synthetic import AU_NAMES, CLASSES, write_domain
from sourcefree.engine.models import load_classifier
from sourcefree.engine.registry import list_methods
from sourcefree.errors import SourcefreeError
from sourcefree.export import source_package
from sourcefree.package.loader import load_package
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from tests.adapters import test_contract as contract
from tests.conftest import au_frequencies_for, make_au_detector
from tests.export.test_timm import SPEC, _probe, _serve_matches_torch, _vendor

#: timm name -> allowlisted options (32 px; the DeiT cut to 2 blocks to stay fast).
FAMILIES: dict[str, dict[str, Any]] = {
    "resnet10t": {},  # ResNet-D, BatchNorm
    "mobilenetv3_small_050": {},  # MobileNetV3, BatchNorm
    "regnetx_002": {},  # RegNet, BatchNorm
    "convnext_atto": {},  # ConvNeXt, LayerNorm
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 4, "depth": 2},  # ViT, LayerNorm
}
METHODS = list_methods()
#: The families the default suite runs every method on (one BatchNorm, one LayerNorm);
#: the others run with ``-m slow`` (the file stays under 2 minutes on 2 cores).
FAST = ("resnet10t", "deit_tiny_patch16_224")
#: Typed refusals, (family, method) -> the reason's pattern; every other pair runs.
NO_FEATURE_MAP = "no feature-map split for architecture 'timm:"
EXPECTED: dict[tuple[str, str], str] = {
    **{(name, "la-cmfer"): NO_FEATURE_MAP for name in FAMILIES},
    ("convnext_atto", "clup"): r"local crops \(16x16 px\) do not fit this model",
    ("deit_tiny_patch16_224", "clup"): r"local crops \(16x16 px\) do not fit this model",
}
#: Normalisation-aware methods (issue 22, point 3): on a LayerNorm model they run
#: (LayerNorm affine parameters) or refuse naming the missing BatchNorm layers.
NORM_AWARE = {"adabn": "no BatchNorm layers", "tent": "BatchNorm"}
LAYER_NORM = ("convnext_atto", "deit_tiny_patch16_224")


def _as_if_trained(model: nn.Module) -> nn.Module:
    """timm zero-initialises some weights (the last BatchNorm scale of a residual block, some
    heads), which blocks gradients upstream; training moves them off zero, so does this."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def family_pkg(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], tuple[nn.Module, Path]]:
    """``family_pkg(name)`` -> (vendor module, source package): the package ships every
    optional part (class counts, AU frequencies, an AU detector); exported once per module."""
    cache: dict[str, tuple[nn.Module, Path]] = {}

    def get(name: str) -> tuple[nn.Module, Path]:
        if name not in cache:
            options = FAMILIES[name]
            out = tmp_path_factory.mktemp("timm") / name
            stats = {
                "class_counts": [10 * (i + 1) for i in range(len(CLASSES))],
                "au_frequencies": au_frequencies_for(list(CLASSES)),
            }
            vendor = _as_if_trained(_vendor(name, **options))
            source_package(
                vendor,
                architecture=f"timm:{name}",
                architecture_options=options or None,
                labels=list(CLASSES),
                input_spec=SPEC,
                out=out,
                source_stats=stats,
                au_detector=make_au_detector(),
                au_names=AU_NAMES,
            )
            cache[name] = (vendor, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_exports_verifies_and_serves(
    name: str, family_pkg: Callable[[str], tuple[nn.Module, Path]]
) -> None:
    vendor, path = family_pkg(name)
    pkg = load_package(path)
    arch = pkg.manifest.architecture
    assert (arch.name, arch.options) == (f"timm:{name}", FAMILIES[name] or None)
    x = _probe()
    with torch.no_grad():
        assert torch.equal(load_classifier(arch, pkg.weights_bytes)(x)[0], vendor(x))
    _serve_matches_torch(pkg)


def _outcome(run: Callable[[], object]) -> str:
    """``"runs"``, or the typed refusal's message (what, and why or a fix, non-empty)."""
    refusal: SourcefreeError | None = None
    try:
        run()
    except SourcefreeError as err:
        refusal = err
    if refusal is None:
        return "runs"
    assert refusal.what and (refusal.why or refusal.fix), f"no reason given: {refusal!r}"
    return str(refusal)


def _check(name: str, method: str, got: str) -> None:
    """``got`` is what :data:`EXPECTED` (or :data:`NORM_AWARE`) says for the pair."""
    if method in NORM_AWARE and name in LAYER_NORM and got != "runs":
        assert re.search(NORM_AWARE[method], got), got
    elif (name, method) in EXPECTED:
        assert re.search(EXPECTED[name, method], got), got
    else:
        assert got == "runs", f"{method} on timm:{name} should run: {got}"


def _pairs(names: list[str], methods: list[str]) -> list[Any]:
    """(family, method) params; families outside :data:`FAST` are marked slow."""
    return [
        pytest.param(n, m, marks=() if n in FAST else pytest.mark.slow)
        for n in names
        for m in methods
    ]


@pytest.mark.parametrize(("name", "method"), _pairs(list(FAMILIES), METHODS))
def test_method_contract_or_typed_refusal(
    name: str, method: str, family_pkg: Callable[[str], tuple[nn.Module, Path]]
) -> None:
    """tests/adapters/test_contract.py's contract (finite losses, gradients on every
    trained parameter, descent, state round trip) on the family, or a typed refusal."""
    pkg = family_pkg(name)[1]

    def run() -> None:
        contract.test_losses_gradients_and_descent(method, pkg)
        contract.test_state_round_trips(method, pkg)

    _check(name, method, _outcome(run))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_domain(tmp_path_factory.mktemp("target") / "wild", "wild-mild", 64, 32, seed=5)


@pytest.mark.parametrize(("name", "method"), _pairs(list(FAMILIES), ["tent", "shot"]))
def test_adapted_package_serves_like_torch(
    name: str,
    method: str,
    family_pkg: Callable[[str], tuple[nn.Module, Path]],
    target: Path,
    tmp_path: Path,
) -> None:
    source = family_pkg(name)[1]
    request = AdaptRequest(
        source,
        target,
        method=method,
        out=tmp_path / "run",
        overrides=["epochs=1", "batch_size=32"],
        gate=False,
    )
    results = []
    got = _outcome(lambda: results.append(adapt(request)))
    _check(name, method, got)
    if got != "runs":
        return
    pkg = results[0].package
    assert pkg.manifest.kind == "adapted" and pkg.manifest.provenance["method"] == method
    assert pkg.manifest.architecture == load_package(source).manifest.architecture
    _serve_matches_torch(pkg)
