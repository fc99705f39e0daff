"""adapt / evaluate / methods: resume to the same weights, refusals, bad inputs, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load as load_safetensors

from sourcefree.cli.commands_adapt import adapt_command, evaluate_command, methods_command
from sourcefree.errors import (
    EXIT_RESUMABLE,
    ConfigError,
    ResumeError,
    RunInterruptedError,
    WorkdirError,
)
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from tests.signal_helpers import sigterm_at

SETS = ["batch_size=16", "epochs=2"]


def _edit_manifest(pkg: Path, key: str, sub: str, value: object) -> None:
    """Change a manifest field consistently (manifest.json, ONNX copy, file hash)."""
    import hashlib

    import onnx

    manifest = json.loads((pkg / "manifest.json").read_text())
    target = manifest[key] if sub else manifest
    target[sub or key] = value
    model = onnx.load_from_string((pkg / "model.onnx").read_bytes())
    for prop in model.metadata_props:
        if prop.key == "sourcefree.manifest":
            embedded = json.loads(prop.value)
            (embedded[key] if sub else embedded)[sub or key] = value
            prop.value = json.dumps(embedded)
    data = model.SerializeToString()
    (pkg / "model.onnx").write_bytes(data)
    manifest["files"]["model.onnx"] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (pkg / "manifest.json").write_text(json.dumps(manifest))


def _weights(pkg_dir: Path) -> dict[str, torch.Tensor]:
    return load_safetensors((pkg_dir / "model.safetensors").read_bytes())


def _interrupt(source: Path, data: Path, tmp: Path, step: int = 3) -> Path:
    wd = tmp / "wd"
    with pytest.raises(RunInterruptedError) as err:
        adapt(
            AdaptRequest(
                source,
                data,
                method="tent",
                out=tmp / "run",
                overrides=SETS,
                workdir=wd,
                device="cpu",
                on_step=sigterm_at(step, "entropy"),
            )
        )
    assert err.value.exit_code == EXIT_RESUMABLE == 75
    assert "SIGTERM" in str(err.value) and "--resume" in str(err.value)
    assert not (tmp / "run").exists(), "nothing half-written at OUT"
    return wd


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_then_resume_gives_the_same_weights(
    source_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    ref = adapt(
        AdaptRequest(source_pkg, target_dir, method="tent", out=tmp_path / "ref", overrides=SETS)
    )
    wd = _interrupt(source_pkg, target_dir, tmp_path, step=3)  # mid-epoch of phase 1
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["ckpt-00000001"]
    assert os.stat(wd).st_mode & 0o777 == 0o700
    done = adapt(
        AdaptRequest(
            source_pkg,
            target_dir,
            method="tent",
            out=tmp_path / "run",
            overrides=SETS,
            workdir=wd,
            resume=True,
            device="cpu",
        )
    )
    assert done.report.resumed is True
    a, b = _weights(tmp_path / "ref" / "package"), _weights(tmp_path / "run" / "package")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume must be bitwise on CPU"
    assert ref.report.phases[0]["epoch_loss"] == done.report.phases[0]["epoch_loss"]
    assert not wd.exists(), "the run directory is removed after success"


def test_resume_refusals(source_pkg: Path, target_dir: Path, tmp_path: Path) -> None:
    wd = _interrupt(source_pkg, target_dir, tmp_path)
    request = AdaptRequest(source_pkg, target_dir, method="tent", out=tmp_path / "run")
    request = dataclasses.replace(request, overrides=SETS, workdir=wd, resume=True)
    with pytest.raises(ResumeError, match=r"(?i)the config changed \(lr: 0.001 -> 0.002\)"):
        adapt(dataclasses.replace(request, overrides=[*SETS, "lr=0.002"]))
    changed = tmp_path / "data2"
    shutil.copytree(target_dir, changed)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(changed / "extra.png")
    with pytest.raises(ResumeError, match=r"(?i)the target dataset changed \(64 -> 65 images"):
        adapt(dataclasses.replace(request, data=changed))
    other = tmp_path / "other-pkg"
    shutil.copytree(source_pkg, other)
    _edit_manifest(other, "version", "", "9.9.9")
    with pytest.raises(ResumeError, match="(?i)the source package changed"):
        adapt(dataclasses.replace(request, packages=other))
    with pytest.raises(WorkdirError, match="holds checkpoints of an earlier run"):
        adapt(dataclasses.replace(request, out=tmp_path / "x", resume=False))
    with pytest.raises(ResumeError, match="nothing to resume"):
        adapt(dataclasses.replace(request, workdir=tmp_path / "new"))


def test_cli_adapt_with_eval_labels_and_report(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [str(source_pkg), str(target_dir), "-m", "adabn", "-o", str(out), "--no-progress"]
    result = CliRunner().invoke(adapt_command, [*args, "--eval-labels", str(eval_csv)])
    assert result.exit_code == 0, result.output
    assert "adapted: accuracy" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "adabn" and report["config"] == {"batch_size": 64, "epochs": 1}
    assert report["phases"][0]["name"] == "bn-stats"
    assert set(report["evaluation"]["adapted"]) >= {"accuracy", "mean_class_recall"}
    assert str(tmp_path) not in (out / "report.json").read_text(), "no paths in the report"
    assert sorted(p.name for p in out.iterdir()) == ["package", "report.html", "report.json"]
    again = CliRunner().invoke(adapt_command, args)
    assert again.exit_code == 2 and "exists and is not empty" in again.output


def test_cli_methods() -> None:
    result = CliRunner().invoke(methods_command, [])
    assert result.exit_code == 0
    assert "tent" in result.output and "entropy minimisation" in result.output
    assert "--set lr=0.001" in result.output
    rows = json.loads(CliRunner().invoke(methods_command, ["--json"]).output)
    assert {r["name"] for r in rows} >= {"adabn", "tent"}


def test_cli_evaluate(source_pkg: Path, target_dir: Path, eval_csv: Path) -> None:
    result = CliRunner().invoke(
        evaluate_command, [str(source_pkg), str(target_dir), "--labels", str(eval_csv), "--json"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)  # the read summary is logged on stderr
    assert "read: " in result.stderr and "read: " not in result.stdout
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["mean_class_recall"] <= 1.0
    assert sum(map(sum, metrics["confusion"])) == metrics["images"] > 0
    text = CliRunner().invoke(
        evaluate_command, [str(source_pkg), str(target_dir), "--labels", str(eval_csv)]
    )
    assert "mean class recall" in text.output and "confusion" in text.output


def test_cli_evaluate_unknown_classes(source_pkg: Path, target_dir: Path) -> None:
    labels = target_dir / "labels.csv"  # 7 FER classes; the package knows 3
    result = CliRunner().invoke(
        evaluate_command, [str(source_pkg), str(target_dir), "--labels", str(labels)]
    )
    assert result.exit_code == 2
    assert (
        "unknown label" in result.output and "The package predicts only surprise" in result.output
    )


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(adapt_command, [*args, "--no-progress"])
    return result.exit_code, result.output


def test_bad_data_folders(source_pkg: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _run([str(source_pkg), str(empty), "-m", "adabn", "-o", str(tmp_path / "o")])
    assert code == 2 and "no images found" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    code, out = _run([str(source_pkg), str(bad), "-m", "adabn", "-o", str(tmp_path / "o")])
    assert code == 2 and "none of the 4 images could be read" in out
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()


def test_unknown_architecture_and_method(pkg_copy: Path, target_dir: Path, tmp_path: Path) -> None:
    _edit_manifest(pkg_copy, "architecture", "name", "resnet9000")
    code, out = _run([str(pkg_copy), str(target_dir), "-m", "adabn", "-o", str(tmp_path / "o")])
    assert code == 2 and "unknown architecture 'resnet9000'" in out, out
    code, out = _run([str(pkg_copy), str(target_dir), "-m", "tnet", "-o", str(tmp_path / "o")])
    assert code == 2 and "Unknown method 'tnet'. Did you mean 'tent'?" in out


def test_request_is_frozen_and_checked_when_built(tmp_path: Path) -> None:
    """Pure checks: nothing is read, so paths that do not exist are fine here."""
    missing, out = tmp_path / "no-such-pkg", tmp_path / "out"
    request = AdaptRequest([missing], missing, method="tent", out=out, overrides=["lr=1"])
    assert request.overrides == ("lr=1",) and request.packages == (missing,)
    assert (request.seed, request.select, request.gate) == (0, "none", True)
    assert request.sample_size == 2048  # selection.GATE_SAMPLE, documented in docs/cli.md
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.seed = 1  # type: ignore[misc]
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"overrides": "lr=1"}, ConfigError, "is one string"),
        ({"select": "best"}, ConfigError, "--select 'best' is not known"),
        ({"budget_s": 0.0}, ConfigError, "The budget must be positive"),
        ({"gate_sample": -1}, ConfigError, "--gate-sample -1"),
        ({"method": "auto", "overrides": ["lr=1"]}, ConfigError, "-m auto takes no config"),
        ({"select": "auto", "resume": True}, ResumeError, "--select auto cannot resume"),
    ]
    for fields, error, message in bad:
        with pytest.raises(error, match=re.escape(message)):
            AdaptRequest(missing, missing, **{"method": "tent", "out": out, **fields})
    assert not tmp_path.joinpath("out").exists()


def test_cli_builds_the_request_of_its_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourcefree.pipeline import adaptation

    seen: list[AdaptRequest] = []

    def fake(request: AdaptRequest) -> Any:
        seen.append(request)
        raise ConfigError("stop here")

    monkeypatch.setattr(adaptation, "adapt", fake)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.1\n")
    args = ["a", "b", "data", "-m", "tent", "-o", "out", "--config", str(cfg), "--set", "x=1"]
    args += ["--no-progress", "--no-gate", "--gate-sample", "all", "--seed", "3", "--force"]
    result = CliRunner().invoke(adapt_command, [*args, "--amp", "off", "--budget-s", "5"])
    assert result.exit_code == 2 and "stop here" in result.output
    (request,) = seen
    assert request.packages == (Path("a"), Path("b")) and request.data == Path("data")
    assert (request.method, request.out, request.config_file) == ("tent", Path("out"), cfg)
    assert request.overrides == ("x=1",) and request.sample_size == 0
    assert not request.progress and not request.gate and request.force
    assert (request.seed, request.amp, request.budget_s) == (3, "off", 5.0)
    defaults = AdaptRequest(Path("a"), Path("data"), method="tent", out=Path("out"))
    same = ("resume", "workdir", "keep_workdir", "device", "eval_labels", "max_bad_fraction")
    assert all(getattr(request, k) == getattr(defaults, k) for k in (*same, "strict", "select"))
