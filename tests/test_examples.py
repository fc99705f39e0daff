"""The examples run as shipped (vendor export, then application inference)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_vendor_then_application(tmp_path: Path) -> None:
    package = _load("vendor_export").main(tmp_path, n=300, epochs=1)
    image = tmp_path / "face.png"
    Image.new("RGB", (48, 48), (200, 160, 140)).save(image)
    labels = _load("app_inference").main(str(package), str(tmp_path / "vendor.pub"), [str(image)])
    assert len(labels) == 1
    assert labels[0] in {"surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"}


def test_vendor_ships_an_au_detector_and_adafer_uses_it(tmp_path: Path) -> None:
    from sourcefree.data.synthetic import AU_NAMES, write_domain
    from sourcefree.package.loader import load_package

    package = _load("vendor_export").main(tmp_path, n=300, epochs=1)
    pkg = load_package(package, public_key=tmp_path / "vendor.pub")
    assert pkg.au_detector is not None and pkg.au_detector.au_names == AU_NAMES
    stats = pkg.manifest.source_stats
    assert stats is not None and stats.au_frequencies is not None
    assert len(stats.au_frequencies) == 7 and len(stats.au_frequencies[0]) == len(AU_NAMES)
    faces = write_domain(tmp_path / "faces", "wild-mild", 96, seed=3)
    (faces / "labels.csv").unlink()
    report = _load("customer_adapt").main(
        str(package),
        str(tmp_path / "vendor.pub"),
        str(faces),
        str(tmp_path / "adapted"),
        "adafer",
        ("epochs=1",),
    )
    assert report["method"] == "adafer" and report["target"]["images"] == 96


def test_vendor_then_customer_then_application(tmp_path: Path) -> None:
    from sourcefree.data.synthetic import write_domain

    package = _load("vendor_export").main(tmp_path, n=300, epochs=1)
    faces = write_domain(tmp_path / "faces", "wild-mild", 96, seed=3)
    (faces / "labels.csv").unlink()  # the customer has no labels
    report = _load("customer_adapt").main(
        str(package), str(tmp_path / "vendor.pub"), str(faces), str(tmp_path / "adapted"), "adabn"
    )
    assert report["method"] == "adabn" and report["target"]["images"] == 96
    adapted = tmp_path / "adapted" / "package"
    image = next(faces.glob("*.png"))
    labels = _load("app_inference").main(
        str(adapted), str(tmp_path / "adapted" / "site.pub"), [str(image)]
    )
    assert len(labels) == 1


def test_timm_vendor_then_application(tmp_path: Path) -> None:
    from sourcefree.package.loader import load_package

    options = {"img_size": 32, "patch_size": 4, "depth": 2}
    package = _load("vendor_timm").main(tmp_path, "deit_tiny_patch16_224", **options)
    pkg = load_package(package, public_key=tmp_path / "vendor.pub")
    arch = pkg.manifest.architecture
    assert (arch.name, arch.options) == ("timm:deit_tiny_patch16_224", options)
    image = tmp_path / "face.png"
    Image.new("RGB", (48, 48), (200, 160, 140)).save(image)
    labels = _load("app_inference").main(str(package), str(tmp_path / "vendor.pub"), [str(image)])
    assert len(labels) == 1 and labels[0] in pkg.manifest.labels
