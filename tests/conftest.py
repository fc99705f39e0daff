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
import json
from collections.abc import Callable
from pathlib import Path

import pytest

LABELS = ["surprise", "fear", "happiness"]


def make_source_package(out: Path, arch: str = "smallcnn", size: int = 32) -> Path:
    """Export a randomly initialised model with non-trivial BatchNorm statistics."""
    import torch

    from sourcefree.export import source_package
    from sourcefree.manifest import InputSpec
    from sourcefree.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier(arch, len(LABELS))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, size, size) * 2 + 0.3)
    source_package(
        model.eval(),
        architecture=arch,
        labels=LABELS,
        input_spec=InputSpec(size=(size, size)),
        out=out,
        source_stats={"class_counts": [10, 20, 30]},
    )
    return out


@pytest.fixture(scope="session")
def source_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified smallcnn source package, exported once per session. Do not modify."""
    return make_source_package(tmp_path_factory.mktemp("pkg") / "fer-small")


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
