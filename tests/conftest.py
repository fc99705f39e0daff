"""Suite-wide settings: offline, CPU by default, Triton in interpreter mode without a GPU."""

from __future__ import annotations

import os
import shutil

# The Triton interpreter must be chosen before any @triton.jit decorator runs.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

LABELS = ["surprise", "fear", "happiness"]


def make_au_detector(size: int = 32, num_aus: int = 14, seed: int = 1) -> Any:
    """A random smallcnn AU detector with saturated outputs (codes repeat across images)."""
    import torch

    from sourcefree.engine.models import build_classifier
    from sourcefree.vendor.training import AUDetectorNet

    torch.manual_seed(seed)
    net = build_classifier("smallcnn", num_aus)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, size, size) * 2 + 0.3)
        net.head.weight.mul_(20.0)
    return AUDetectorNet(net).eval()


def au_frequencies_for(labels: list[str]) -> list[list[float]]:
    """Per-class AU frequencies of the synthetic ground truth for ``labels`` (aggregates)."""
    from sourcefree.data.synthetic import CLASSES, generate
    from sourcefree.vendor.training import au_frequencies

    s = generate("studio", 140, 32, seed=0)
    freqs = au_frequencies(s.aus, s.labels, len(CLASSES))
    return [freqs[CLASSES.index(name)] for name in labels]


def make_source_package(
    out: Path,
    arch: str = "smallcnn",
    size: int = 32,
    *,
    au_detector: bool = False,
    labels: Sequence[str] = tuple(LABELS),
) -> Path:
    """Export a randomly initialised model with non-trivial BatchNorm statistics.

    ``au_detector``: also ship a (random) action-unit detector and the per-class AU
    frequencies of the synthetic ground truth, as AdaFER needs.
    """
    import torch

    from sourcefree.data.synthetic import AU_NAMES
    from sourcefree.engine.models import build_classifier
    from sourcefree.export import source_package
    from sourcefree.package.manifest import InputSpec

    torch.manual_seed(0)
    model = build_classifier(arch, len(labels))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, size, size) * 2 + 0.3)
    stats: dict[str, Any] = {"class_counts": [10 * (i + 1) for i in range(len(labels))]}
    extra: dict[str, Any] = {}
    if au_detector:
        stats["au_frequencies"] = au_frequencies_for(list(labels))
        extra = {"au_detector": make_au_detector(size), "au_names": AU_NAMES}
    source_package(
        model.eval(),
        architecture=arch,
        labels=list(labels),
        input_spec=InputSpec(size=(size, size)),
        out=out,
        source_stats=stats,
        **extra,
    )
    return out


@pytest.fixture(scope="session")
def source_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified smallcnn source package, exported once per session. Do not modify."""
    return make_source_package(tmp_path_factory.mktemp("pkg") / "fer-small")


@pytest.fixture(scope="session")
def au_source_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source package that also ships an AU detector and AU frequencies. Do not modify."""
    return make_source_package(tmp_path_factory.mktemp("pkg") / "fer-au", au_detector=True)


@pytest.fixture
def au_detector_factory() -> Callable[..., Any]:
    """``make_au_detector``: the (random, seeded) detector that ``au_source_pkg`` ships."""
    return make_au_detector


@pytest.fixture(scope="session")
def source_package_factory() -> Callable[..., Path]:
    """``make_source_package``: export a fresh package (other labels, sizes, extras)."""
    return make_source_package


@pytest.fixture
def pkg_copy(source_pkg: Path, tmp_path: Path) -> Path:
    """A private copy of the source package that a test may damage."""
    dst = tmp_path / "pkg"
    shutil.copytree(source_pkg, dst)
    return dst


def rehash(pkg: Path, name: str, data: bytes) -> None:
    """Replace a package file and update its manifest entry: a consistent forgery."""
    (pkg / name).write_bytes(data)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (pkg / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


@pytest.fixture
def forge() -> Callable[[Path, str, bytes], None]:
    """``forge(pkg, name, data)``: replace a file and re-hash it in the manifest."""
    return rehash


def _load_benchmark(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_benchmark() -> Callable[[str], ModuleType]:
    """``load_benchmark("accuracy")``: import a script of benchmarks/ as a module."""
    return _load_benchmark
