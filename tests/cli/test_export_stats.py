"""``sourcefree export --val-dir/--val-labels`` and ``--au-detector``: vendor statistics.

The statistics a CLI export ships must equal what the Python API path computes on the
same images (examples/vendor_export.py), adapt's do-no-harm gate must then estimate
accuracy, and AdaFER must run on the shipped detector. Every bad input exits 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from sourcefree.cli.app import main
from sourcefree.data.synthetic import CLASSES, generate, write_domain
from sourcefree.engine.models import build_classifier, from_vendor_state, get_architecture
from sourcefree.errors import ConfigError, PackageError
from sourcefree.package.manifest import InputSpec
from sourcefree.pipeline.selection import calibrate
from sourcefree.vendor.training import (
    AUDetectorNet,
    au_detector_from_state,
    au_frequencies,
    class_feature_means,
    detect_aus,
    to_tensor,
)

SIZE = 32
N_VAL = 60
VAL_SEED = 0
AUS = ("AU1", "AU2", "AU4", "AU6")
SPEC = InputSpec(size=(SIZE, SIZE))


def _run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _detector() -> AUDetectorNet:
    """A random smallcnn AU detector centred on the validation faces: each AU active on some."""
    torch.manual_seed(2)
    net = build_classifier("smallcnn", len(AUS)).eval()
    faces = generate("studio", N_VAL, SIZE, seed=VAL_SEED)
    with torch.no_grad():
        mean = net.backbone(to_tensor(faces.images, SPEC)).mean(0)
        net.head.weight.mul_(1000.0)  # far from the 0.5 threshold: no tie to break
        net.head.bias.copy_(-net.head.weight @ mean)
    return AUDetectorNet(net).eval()


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Vendor weights (smallcnn, 7 classes), an AU detector and labelled validation images."""
    root = tmp_path_factory.mktemp("vendor")
    torch.manual_seed(0)
    save_file(get_architecture("smallcnn").build(len(CLASSES), 3).state_dict(), root / "w.st")
    save_file(_detector().state_dict(), root / "au.st")
    write_domain(root / "val", "studio", N_VAL, SIZE, VAL_SEED)
    assert set(generate("studio", N_VAL, SIZE, seed=VAL_SEED).labels) == set(range(len(CLASSES)))
    return root


def _export(vendor: Path, out: Path, *extra: str | Path) -> tuple[int, str]:
    return _run(
        "export",
        "--arch",
        "smallcnn",
        "--weights",
        vendor / "w.st",
        "--labels",
        ",".join(CLASSES),
        "--input-size",
        str(SIZE),
        "--out",
        out,
        *extra,
    )


def _with_stats(vendor: Path) -> tuple[str | Path, ...]:
    val = vendor / "val"
    au = ("--au-detector", vendor / "au.st", "--au-names", ",".join(AUS))
    return ("--val-dir", val, "--val-labels", val / "labels.csv", *au)


@pytest.fixture(scope="module")
def package(vendor: Path) -> Path:
    out = vendor / "pkg"
    code, output = _export(vendor, out, *_with_stats(vendor))
    assert code == 0, output
    assert "calibration (60 validation images" in output
    return out


def _manifest(pkg: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((pkg / "manifest.json").read_text())
    return manifest


def test_cli_statistics_equal_the_python_api_on_the_same_images(
    vendor: Path, package: Path
) -> None:
    """What examples/vendor_export.py computes from in-memory arrays, the CLI ships from files."""
    from safetensors.torch import load_file

    faces = generate("studio", N_VAL, SIZE, seed=VAL_SEED)  # the images written to val/
    model = from_vendor_state("smallcnn", load_file(vendor / "w.st"), len(CLASSES)).eval()
    x = to_tensor(faces.images, SPEC)
    detector = au_detector_from_state("smallcnn", load_file(vendor / "au.st"), len(AUS))
    want = {
        "class_counts": np.bincount(faces.labels, minlength=len(CLASSES)).tolist(),
        "class_feature_means": class_feature_means(model, x, faces.labels, len(CLASSES)),
        "calibration": calibrate(model, faces.images, faces.labels, SPEC).to_dict(),
        "au_frequencies": au_frequencies(detect_aus(detector, x), faces.labels, len(CLASSES), 0.5),
    }
    got = _manifest(package)["source_stats"]
    assert got["class_counts"] == want["class_counts"]
    assert sum(got["class_counts"]) == N_VAL
    assert np.allclose(got["class_feature_means"], want["class_feature_means"], atol=1e-5)
    for key, value in want["calibration"].items():
        assert got["calibration"][key] == pytest.approx(value, abs=1e-6), key
    assert got["au_frequencies"] == want["au_frequencies"]
    assert len({tuple(row) for row in got["au_frequencies"]}) > 1, "the classes differ"


def test_only_aggregates_and_graphs_enter_the_package(vendor: Path, package: Path) -> None:
    files = sorted(p.name for p in package.iterdir())
    assert files == ["au_detector.onnx", "manifest.json", "model.onnx", "model.safetensors"]
    text = (package / "manifest.json").read_text()
    assert "000000.png" not in text and str(vendor) not in text
    manifest = _manifest(package)
    assert manifest["auxiliary"]["au_detector"]["au_names"] == list(AUS)
    assert manifest["auxiliary"]["au_detector"]["threshold"] == 0.5


def test_adafer_and_the_gate_use_what_the_cli_shipped(package: Path, tmp_path: Path) -> None:
    """AdaFER runs on the shipped detector; the gate estimates accuracy with the calibration."""
    target = write_domain(tmp_path / "target", "wild-mild", 32, SIZE, 1)
    out = tmp_path / "adapted"
    sets = ("--set", "epochs=1", "--set", "batch_size=16", "--no-progress")
    code, output = _run("adapt", package, target, "-m", "adafer", "-o", out, *sets)
    assert code in (0, 4), output  # 4: the gate decided to keep the source model
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "adafer"
    gate = report["gate"]
    assert gate["calibrated"] is True and gate["criterion"] == "anchored"
    assert 0.0 <= gate["scores"]["source"]["atc"] <= 1.0
    assert 0.0 <= gate["scores"]["adapted"]["atc"] <= 1.0


def test_class_counts_option_overrides_the_validation_counts(vendor: Path, tmp_path: Path) -> None:
    val = vendor / "val"
    counts = "100,90,80,70,60,50,40"
    code, output = _export(
        vendor,
        tmp_path / "pkg",
        *("--val-dir", val, "--val-labels", val / "labels.csv", "--class-counts", counts),
    )
    assert code == 0, output
    stats = _manifest(tmp_path / "pkg")["source_stats"]
    assert stats["class_counts"] == [100, 90, 80, 70, 60, 50, 40]
    assert set(stats) == {"class_counts", "class_feature_means", "calibration"}


def _csv_without(vendor: Path, name: str, drop: str) -> Path:
    src = (vendor / "val" / "labels.csv").read_text().splitlines()
    path = vendor / "val" / name
    path.write_text("\n".join(r for r in src if not r.endswith(f",{drop}")) + "\n")
    return path


def _csv_with_unknown(vendor: Path) -> Path:
    path = vendor / "val" / "unknown.csv"
    rows = (vendor / "val" / "labels.csv").read_text().splitlines()
    path.write_text("\n".join([*rows, "000000.png,contempt"]) + "\n")
    return path


def _val(v: Path, csv: Path | None = None) -> tuple[str | Path, ...]:
    return ("--val-dir", v / "val", "--val-labels", csv or v / "val" / "labels.csv")


#: Each bad input: the extra export arguments (from the vendor folder) and the message.
BAD: dict[str, tuple[Any, str]] = {
    "missing-dir": (
        lambda v: ("--val-dir", v / "nope", "--val-labels", v / "val" / "labels.csv"),
        "does not exist",
    ),
    "dir-without-labels": (
        lambda v: _val(v)[:2],
        "--val-dir was given without --val-labels",
    ),
    "labels-without-dir": (
        lambda v: _val(v)[2:],
        "--val-labels was given without --val-dir",
    ),
    "label-not-in-labels": (
        lambda v: _val(v, _csv_with_unknown(v)),
        "unknown label 'contempt'",
    ),
    "empty-class": (
        lambda v: _val(v, _csv_without(v, "nofear.csv", "fear")),
        "no image of class(es) 'fear'",
    ),
    "au-names-mismatch": (
        lambda v: (*_with_stats(v)[:6], "--au-names", "AU1,AU2,AU4"),
        "has 4 outputs but 3 AU names",
    ),
    "au-names-duplicate": (
        lambda v: (*_with_stats(v)[:6], "--au-names", "AU1,AU1,AU2,AU4"),
        "must be unique",
    ),
    "detector-without-names": (
        lambda v: _with_stats(v)[:6],
        "--au-detector was given without --au-names",
    ),
    "names-without-detector": (
        lambda v: ("--au-names", "AU1"),
        "--au-names was given without --au-detector",
    ),
    "detector-without-val": (
        lambda v: _with_stats(v)[4:],
        "needs the per-class frequencies",
    ),
    "detector-of-another-arch": (
        lambda v: (*_with_stats(v), "--au-arch", "resnet18"),
        "do not match resnet18",
    ),
    "class-counts-length": (
        lambda v: ("--class-counts", "1,2,3"),
        "expected 7 comma-separated",
    ),
    "class-counts-text": (
        lambda v: ("--class-counts", "1,2,3,4,5,6,x"),
        "whole numbers",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_exit_2_and_write_nothing(vendor: Path, tmp_path: Path, case: str) -> None:
    make, message = BAD[case]
    out = tmp_path / "pkg"
    code, output = _export(vendor, out, *make(vendor))
    assert code == 2, output
    assert message in " ".join(output.split()), output
    assert "Traceback" not in output
    assert not out.exists()


def test_au_detector_from_the_architectures_own_weights() -> None:
    """The own-state format: the module's logits through a sigmoid, as the package ships them."""
    torch.manual_seed(0)
    own = get_architecture("smallcnn").build(len(AUS), 3).eval()
    detector = au_detector_from_state("smallcnn", own.state_dict(), len(AUS))
    x = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(detector(x), torch.sigmoid(own(x)), atol=1e-6)
    wrapped = au_detector_from_state("smallcnn", detector.state_dict(), len(AUS))
    with torch.no_grad():
        assert torch.equal(wrapped(x), detector(x))


def test_au_detector_refuses_other_widths_and_channels() -> None:
    own = get_architecture("smallcnn").build(len(AUS), 1).state_dict()
    with pytest.raises(PackageError, match="1-channel input, the classifier 3"):
        au_detector_from_state("smallcnn", own, len(AUS), 3)
    with pytest.raises(ConfigError, match="has 4 outputs but 5 AU names"):
        au_detector_from_state("smallcnn", own, 5, 1)
    nan = {k: v.clone() for k, v in _detector().state_dict().items()}
    nan["net.head.bias"][0] = float("nan")
    with pytest.raises(PackageError, match="NaN or Inf"):
        au_detector_from_state("smallcnn", nan, len(AUS))


def test_help_states_the_parity_limit_and_the_new_options() -> None:
    code, output = _run("export", "--help")
    assert code == 0
    text = " ".join(output.split())
    assert "1e-4 + 1e-3 x max|torch|" in text
    assert "max abs error <= 1e-4" not in text
    for option in ("--val-dir", "--val-labels", "--au-detector", "--au-names", "--au-arch"):
        assert option in text
