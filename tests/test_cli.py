"""The command line: vendor export, keys, signing, verify, inspect, predict, doctor."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from sourcefree.cli.app import main
from sourcefree.engine.models import get_architecture
from sourcefree.package.manifest import ARCHITECTURE_NAMES


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def vendor_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = get_architecture("smallcnn").build(3, 3)
    path = tmp_path / "W.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_help_teaches_each_verb() -> None:
    code, out = _run("--help")
    assert code == 0
    for verb in ("export", "keygen", "sign", "verify", "inspect", "predict", "doctor", "demo"):
        assert verb in out
    code, out = _run("export", "--help")
    assert code == 0
    for name in ARCHITECTURE_NAMES:
        assert name in out


def test_export_keygen_sign_verify_inspect_predict(vendor_weights: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    code, out = _run(
        "export", "--arch", "smallcnn", "--weights", str(vendor_weights), "--labels",
        "a,b,c", "--input-size", "32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
        "--class-counts", "5,6,7", "--out", str(pkg),
    )  # fmt: skip
    assert code == 0, out
    assert "wrote" in out
    code, out = _run("keygen", str(tmp_path / "v"))
    assert code == 0 and "keep secret" in out
    code, out = _run("sign", str(pkg), "--key", str(tmp_path / "v.key"))
    assert code == 0 and "signed" in out
    code, out = _run("verify", str(pkg), "--key", str(tmp_path / "v.pub"))
    assert code == 0 and "signature valid" in out
    code, out = _run("verify", str(pkg))
    assert code == 0 and "NOT checked" in out
    code, out = _run("inspect", str(pkg))
    assert code == 0
    assert "labels: a, b, c" in out and "smallcnn" in out and "present" in out
    code, out = _run("inspect", str(pkg), "--json")
    assert json.loads(out)["architecture"]["classes"] == 3

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 40), (90, 60, 30)).save(photos / "one.png")
    Image.new("L", (20, 30), 128).save(photos / "sub" / "two.jpg")
    (photos / "broken.jpg").write_text("not an image")
    (photos / "readme.txt").write_text("ignored")
    csv_path = tmp_path / "preds.csv"
    code, out = _run("predict", str(pkg), str(photos), "-o", str(csv_path), "--device", "cpu")
    assert code == 0, out
    assert "2 predicted, 1 skipped" in out
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "path,label,probability" and len(rows) == 3


def test_export_refuses_existing_output(vendor_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "x").write_text("keep")
    code, text = _run(
        "export", "--arch", "smallcnn", "--weights", str(vendor_weights), "--labels", "a,b,c",
        "--input-size", "32", "--out", str(out),
    )  # fmt: skip
    assert code == 2
    assert "exists and is not empty" in text and "--overwrite" in text
    assert (out / "x").read_text() == "keep"


def test_export_refuses_pickled_weights(tmp_path: Path) -> None:
    weights = tmp_path / "W.safetensors"
    weights.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    code, text = _run(
        "export", "--arch", "smallcnn", "--weights", str(weights), "--labels", "a,b,c",
        "--input-size", "32", "--out", str(tmp_path / "pkg"),
    )  # fmt: skip
    assert code == 2 and "is a Python pickle" in text
    assert not (tmp_path / "pkg").exists()


def test_export_refuses_wrong_architecture(vendor_weights: Path, tmp_path: Path) -> None:
    code, text = _run(
        "export", "--arch", "resnet18", "--weights", str(vendor_weights), "--labels", "a,b,c",
        "--input-size", "32", "--out", str(tmp_path / "pkg"),
    )  # fmt: skip
    assert code == 2 and "does not match the architecture" in text
    code, text = _run(
        "export", "--arch", "resnet81", "--weights", str(vendor_weights), "--labels", "a,b,c",
        "--input-size", "32", "--out", str(tmp_path / "pkg"),
    )  # fmt: skip
    assert code == 2 and "did you mean 'resnet18'" in text


def test_verify_reports_tampering(pkg_copy: Path) -> None:
    data = bytearray((pkg_copy / "model.onnx").read_bytes())
    data[100] ^= 1
    (pkg_copy / "model.onnx").write_bytes(bytes(data))
    code, text = _run("verify", str(pkg_copy))
    assert code == 2
    assert text.startswith("error: package file 'model.onnx' does not match its sha256")


def test_doctor_reports_telemetry_and_providers() -> None:
    code, out = _run("doctor", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["telemetry_disabled"] is True
    assert "CPUExecutionProvider" in report["providers_usable"]
    assert report["conflict"] is None


def test_module_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sourcefree", "--version"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
        timeout=60,
    )
    assert result.returncode == 0 and "sourcefree" in result.stdout


def test_methods_lists_each_setting_with_its_help_in_one_column() -> None:
    from sourcefree.cli.app import main

    out = CliRunner().invoke(main, ["methods"]).output
    rows = [line for line in out.splitlines() if line.startswith("    --set ")]
    fitting = [r for r in rows if len(r[10:].split(" ", 1)[0]) <= 28]
    assert len(fitting) > 20
    # "    --set " + KEY=VALUE padded to 28 + two spaces: the help starts at column 40.
    assert all(r[38:40] == "  " and r[40] != " " for r in fitting), fitting[:3]
