"""A failure after training keeps the trained weights and says how to export them again.

Also: packages with large logits (a head scaled by 1e4) adapt and re-export, since
the parity gate is ``ATOL + RTOL * max|torch|`` per output.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.data.synthetic import write_domain
from sourcefree.errors import ExportError
from sourcefree.export.onnx import FP32_ATOL, FP32_RTOL
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from tests.parity_helpers import HEAD_SCALE, fail_adapted_parity, make_large_logit_package


@pytest.fixture(scope="module")
def small_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 wild-mild images, 32 px."""
    return write_domain(tmp_path_factory.mktemp("target") / "wild", "wild-mild", 16, 32, seed=5)


def _resume_command(message: str) -> list[str]:
    """The ``sourcefree adapt ... --resume`` words that the error message gives."""
    start = message.index("sourcefree adapt ")
    end = message.index(" (Python:", start)
    words = shlex.split(message[start:end])
    assert words[:2] == ["sourcefree", "adapt"] and words[-1] == "--resume"
    return words[2:]


def test_adapted_parity_failure_keeps_the_weights_and_resume_exports_only(
    source_pkg: Path, small_target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fail_adapted_parity(monkeypatch, times=1)
    out = tmp_path / "runs" / "adapted dir"  # a space: the command must quote it
    args = [str(source_pkg), str(small_target), "-m", "tent", "-o", str(out)]
    args += ["--set", "epochs=1", "--device", "cpu", "--no-progress", "--no-gate"]
    failed = CliRunner().invoke(adapt_command, args)
    assert failed.exit_code == 2, failed.output
    message = failed.output[failed.output.index("error: ") :]  # after the run's plan
    print(message)
    assert message.startswith("error: onnxruntime disagrees with torch by ")
    assert "Traceback" not in message
    assert "limit -1.00e+00 = -1 + 0 x max|torch|" in message, "the measured limit, explained"
    assert "plausible causes:" in message and "float32 rounding" in message
    run_dir = tmp_path / "runs" / ".adapted dir.work"
    assert f"its weights are kept in the run directory {str(run_dir)!r}" in message
    assert "only the gate, the export and the report are redone" in message
    assert not out.exists(), "no partial output"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".adapted dir.work"]
    assert any((run_dir / "checkpoints").iterdir())

    resumed = CliRunner().invoke(adapt_command, _resume_command(message))
    assert resumed.exit_code == 0, resumed.output
    assert calls == [True, False], "the second export ran the real check"
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] is True
    assert report["checkpoints_written"] == 0, "no training step ran again"
    assert all(p["done"] for p in report["phases"])
    assert report["export"]["model"] == "adapted"
    assert not run_dir.exists(), "the run directory is removed after success"


def test_python_api_failure_after_training_names_the_resume_request(
    source_pkg: Path, small_target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_adapted_parity(monkeypatch, times=1)
    request = AdaptRequest(
        source_pkg,
        small_target,
        method="adabn",
        out=tmp_path / "o",
        device="cpu",
        workdir=tmp_path / "wd",
    )
    with pytest.raises(ExportError) as err:
        adapt(request)
    assert "--workdir " + str(tmp_path / "wd") in err.value.fix
    assert "Python: the same AdaptRequest with resume=True" in err.value.fix
    steps: list[object] = []
    again = AdaptRequest(
        source_pkg,
        small_target,
        method="adabn",
        out=tmp_path / "o",
        device="cpu",
        workdir=tmp_path / "wd",
        resume=True,
        on_step=steps.append,
    )
    done = adapt(again)
    assert steps == [] and done.report.resumed and done.report.checkpoints_written == 0


def test_a_failure_before_training_is_not_dressed_up(
    source_pkg: Path, small_target: Path, tmp_path: Path
) -> None:
    from sourcefree.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        adapt(
            AdaptRequest(
                source_pkg,
                small_target,
                method="tent",
                out=tmp_path / "o",
                overrides=["no_such_key=1"],
                device="cpu",
            )
        )
    assert "--resume" not in str(err.value) and "kept" not in str(err.value)


@pytest.mark.parametrize("method", ["tent", "shot"])
def test_large_logit_package_adapts_and_reexports(
    method: str, small_target: Path, tmp_path: Path
) -> None:
    pkg = make_large_logit_package(tmp_path / "big")
    result = adapt(
        AdaptRequest(
            pkg,
            small_target,
            method=method,
            out=tmp_path / "out",
            overrides=["epochs=1"],
            device="cpu",
            gate=False,  # the adapted model is exported (its parity is the point)
        )
    )
    assert result.package.manifest.kind == "adapted"
    assert result.report.export.model == "adapted"
    from sourcefree.engine.models import load_classifier
    from sourcefree.export.onnx import check_package_agreement

    model = load_classifier(result.package.manifest.architecture, result.package.weights_bytes)
    parity = check_package_agreement(result.package, model)
    import numpy as np
    import torch

    with torch.no_grad():
        logits = model.eval()(torch.randn(8, 3, 32, 32))[0]
    scale = float(np.abs(logits.numpy()).max())
    print(f"{method}: max |logit| {scale:.3g}, parity {result.report.export}")
    assert scale > HEAD_SCALE / 100, "the logits stay large after adaptation"
    assert result.report.export.parity_max_abs_logits <= FP32_ATOL + FP32_RTOL * scale * 2
    assert result.report.export.parity_top1_agreement == 1.0
    assert parity.top1_agreement == 1.0


def test_request_command_round_trips_through_the_cli_parser(tmp_path: Path) -> None:
    """Every CLI option of ``adapt`` that a request holds comes back from ``command()``."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lr: 0.001\n")
    labels = tmp_path / "l.csv"
    labels.write_text("path,label\n")
    request = AdaptRequest(
        (tmp_path / "p 1", tmp_path / "p2"),
        tmp_path / "data",
        method="shot",
        out=tmp_path / "o",
        config_file=cfg,
        overrides=["epochs=2", "ssl.init=scratch"],
        workdir=tmp_path / "w",
        keep_workdir=True,
        device="cpu",
        eval_labels=labels,
        seed=7,
        max_bad_fraction=0.2,
        strict=True,
        overwrite=True,
        progress=False,
        gate=False,
        force=True,
        amp="off",
        gate_sample="all",
    )
    words = shlex.split(request.command(resume=True))
    assert words[:2] == ["sourcefree", "adapt"]
    ctx = adapt_command.make_context("adapt", words[2:])
    params = ctx.params
    assert [str(p) for p in params.pop("paths")] == [
        str(tmp_path / "p 1"),
        str(tmp_path / "p2"),
        str(tmp_path / "data"),
    ]
    assert params.pop("resume") is True
    assert params.pop("no_progress") is True and params.pop("no_gate") is True
    assert params.pop("overrides") == ("epochs=2", "ssl.init=scratch")
    params.pop("as_json", None)  # output format only, not a request field
    for name, value in params.items():
        want = getattr(request, name)
        assert str(value) == str(want) if value is not None else want is None, name
