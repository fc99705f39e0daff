"""adapt: the do-no-harm gate, --select auto and -m auto, end to end on tiny data."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from html import escape as html_escape
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load as load_safetensors
from torch import nn

from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.engine.method import Batch, Method, MethodContext, Phase, StepOutput
from sourcefree.engine.models import Classifier, build_classifier
from sourcefree.engine.registry import register_method, unregister_method
from sourcefree.engine.trainer import StepInfo
from sourcefree.errors import ConfigError, ResumeError, RunInterruptedError
from sourcefree.export import source_package
from sourcefree.package.audit import audit_package
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec
from sourcefree.pipeline import selection
from sourcefree.pipeline.adaptation import AdaptRequest, AdaptResult, adapt

LABELS = ["surprise", "fear", "happiness"]


@dataclass(frozen=True)
class ScrambleConfig:
    """Test method: roll the head's class rows and scale the logits."""

    shift: int = 0
    """Roll the class rows by this much (1: every prediction moves to another class)."""
    scale: float = 1.0
    """Multiply the logits (a temperature: predictions stay, confidence changes)."""


class Scramble(Method):
    """Makes the source model worse (or sharper) on purpose, without training."""

    description = "test: roll and scale the head"
    config_class = ScrambleConfig
    config: ScrambleConfig
    selection_grid = ({"scale": 0.5}, {"scale": 1.0}, {"scale": 2.0})
    relative_cost = 0.5

    def __init__(self, config: ScrambleConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.model = context.sources[0].model
        with torch.no_grad():
            head = self.model.head
            head.weight.copy_(torch.roll(head.weight, config.shift, 0) * config.scale)
            head.bias.copy_(torch.roll(head.bias, config.shift, 0) * config.scale)

    def phases(self) -> Sequence[Phase]:
        return [Phase("noop", 1, self._step, batch_size=16, shuffle=False)]

    def _step(self, batch: Batch) -> StepOutput:
        return StepOutput(loss=None)

    def modules(self) -> Mapping[str, nn.Module]:
        return {"model": self.model}

    def export_model(self) -> Classifier:
        return self.model.eval()


@dataclass(frozen=True)
class SharpenConfig(ScrambleConfig):
    """Test method: sharper logits by default."""

    scale: float = 2.0
    """Multiply the logits."""


class Sharpen(Scramble):
    description = "test: sharpen the head"
    config_class = SharpenConfig
    relative_cost = 0.1


@pytest.fixture(autouse=True, scope="module")
def _scramble() -> Iterator[None]:
    register_method("scramble-test")(Scramble)
    register_method("sharpen-test")(Sharpen)
    yield
    unregister_method("scramble-test")
    unregister_method("sharpen-test")


def _images(data: Path) -> torch.Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.glob("*.png"))]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def _package(out: Path, target_dir: Path, calibration: dict[str, Any] | None) -> Path:
    """A random smallcnn with BatchNorm statistics and a head centred on the target images.

    Its predictions spread over the classes (a plain random model predicts one class).
    """
    torch.manual_seed(0)
    model = build_classifier("smallcnn", len(LABELS))
    x = _images(target_dir)
    model.train()
    with torch.no_grad():
        model(x)
        model.eval()
        feats = model.backbone(x)
        weight = torch.randn(len(LABELS), feats.shape[1]) * 100 / feats.shape[1] ** 0.5
        model.head.weight.copy_(weight)
        model.head.bias.copy_(-weight @ feats.mean(0))
    stats: dict[str, Any] = {"class_counts": [10, 10, 10]}
    if calibration is not None:
        stats["calibration"] = calibration
    source_package(
        model.eval(),
        architecture="smallcnn",
        labels=LABELS,
        input_spec=InputSpec(size=(32, 32)),
        out=out,
        source_stats=stats,
    )
    return out


def _cal(threshold: float) -> dict[str, Any]:
    return {
        "validation_accuracy": 0.9,
        "validation_images": 100,
        "atc_max_softmax": threshold,
        "atc_neg_entropy": threshold,
    }


@pytest.fixture(scope="module")
def plain_pkg(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No vendor calibration."""
    return _package(tmp_path_factory.mktemp("sel") / "plain", target_dir, None)


@pytest.fixture(scope="module")
def confident_pkg(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibrated so that ATC counts every source prediction as right (threshold below all)."""
    return _package(tmp_path_factory.mktemp("sel") / "confident", target_dir, _cal(-100.0))


@pytest.fixture(scope="module")
def unsure_pkg(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibrated so that ATC counts every source prediction as wrong (threshold above all)."""
    return _package(tmp_path_factory.mktemp("sel") / "unsure", target_dir, _cal(2.0))


def _weights(pkg: Path) -> dict[str, torch.Tensor]:
    return load_safetensors((pkg / "model.safetensors").read_bytes())


def _scrambled(pkg: Path, data: Path, out: Path, **fields: Any) -> AdaptResult:
    """``scramble-test`` with ``shift=1`` (every prediction moves) on the CPU."""
    request = AdaptRequest(pkg, data, method="scramble-test", out=out, overrides=["shift=1"])
    return adapt(dataclasses.replace(request, device="cpu", **fields))


def test_source_predictions_are_spread(plain_pkg: Path, target_dir: Path) -> None:
    pkg = load_package(plain_pkg)
    from sourcefree.engine.models import load_classifier

    out = selection.model_outputs(
        load_classifier(pkg.manifest.architecture, pkg.weights_bytes), _images(target_dir)
    )
    assert len(set(out.predictions.tolist())) == 3  # so kappa can see a permutation


def test_gate_keeps_the_source_when_the_head_is_scrambled(
    confident_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    result = _scrambled(confident_pkg, target_dir, tmp_path / "run", eval_labels=eval_csv)
    gate = result.report.to_dict()["gate"]
    assert gate["decision"] == gate["verdict"] == "source" and not gate["forced"]
    assert gate["criterion"] == "anchored" and gate["calibrated"]
    assert gate["estimated_gain"] == pytest.approx(-1.0)
    assert gate["scores"]["adapted"]["agreement"] == 0.0
    assert gate["scores"]["source"]["atc"] == 1.0
    assert "source model is kept" in gate["reason"]
    assert set(gate["accuracy"]) == {"source", "adapted", "note"}
    assert result.report.export.model == "source"
    manifest = result.package.manifest
    assert manifest.kind == "adapted"
    assert manifest.provenance["method"] == "source"
    assert manifest.provenance["config"] == {}
    assert manifest.provenance["note"] == (
        "do-no-harm gate kept the source model: scramble-test estimated worse "
        "(anchored, estimated gain -1.000)"
    )
    assert audit_package(tmp_path / "run" / "package").clean  # the note is no free text
    assert manifest.name.endswith("-source")
    exported, original = _weights(tmp_path / "run" / "package"), _weights(confident_pkg)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # The report still names what was tried.
    assert result.report.method == "scramble-test"
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["gate"]["decision"] == "source"
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Do-no-harm gate: exported the source model" in html


def test_gate_lets_an_estimated_better_model_through(
    unsure_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    result = _scrambled(unsure_pkg, target_dir, tmp_path / "run")
    gate = result.report.to_dict()["gate"]
    assert gate["decision"] == gate["verdict"] == "adapted"
    assert gate["estimated_gain"] == pytest.approx(1.0)
    assert result.package.manifest.provenance["method"] == "scramble-test"
    assert "note" not in result.package.manifest.provenance
    assert result.report.export.model == "adapted"


def test_uncalibrated_gate_catches_permuted_classes(
    plain_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    result = _scrambled(plain_pkg, target_dir, tmp_path / "run")
    gate = result.report.to_dict()["gate"]
    assert gate["decision"] == "source" and gate["criterion"] == "uncalibrated"
    assert gate["scores"]["adapted"]["kappa"] < 0
    assert gate["scores"]["adapted"]["atc"] is None
    assert result.package.manifest.provenance["method"] == "source"


def test_force_and_no_gate_export_the_adapted_model(
    confident_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    res = runner.invoke(
        adapt_command,
        [
            str(confident_pkg),
            str(target_dir),
            "-m",
            "scramble-test",
            "-o",
            str(tmp_path / "forced"),
            "--set",
            "shift=1",
            "--device",
            "cpu",
            "--no-progress",
            "--force",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "gate: exported the adapted model" in res.output and "--force" in res.output
    report = json.loads((tmp_path / "forced" / "report.json").read_text())
    assert report["gate"]["decision"] == "adapted" and report["gate"]["verdict"] == "source"
    assert report["gate"]["forced"] is True
    forced = load_package(tmp_path / "forced" / "package")
    assert forced.manifest.provenance["method"] == "scramble-test"

    result = _scrambled(confident_pkg, target_dir, tmp_path / "nogate", gate=False)
    assert result.report.gate.enabled is False
    assert result.report.gate.decision == "adapted"
    assert result.report.gate.measure is None  # "scores": null
    assert result.package.manifest.provenance["method"] == "scramble-test"


def test_select_auto_keeps_the_best_label_free_score(
    plain_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    result = adapt(
        AdaptRequest(
            plain_pkg,
            target_dir,
            method="scramble-test",
            out=tmp_path / "run",
            select="auto",
            device="cpu",
            eval_labels=eval_csv,
        )
    )
    sel = result.report.to_dict()["selection"]
    assert sel["mode"] == "grid" and sel["criterion"] == "im"
    rows = sel["candidates"]
    assert [r["candidate"] for r in rows] == [
        "scramble-test:scale=0.5",
        "scramble-test:scale=1.0",
        "scramble-test:scale=2.0",
    ]
    assert all(r["status"] == "done" and r["scores"] is not None for r in rows)
    values = [r["value"] for r in rows]
    best = int(np.argmax(values))
    assert [r["chosen"] for r in rows] == [i == best for i in range(3)]
    assert all(r["value"] == r["scores"]["im"] for r in rows)
    assert sel["chosen"] == rows[best]["candidate"]
    assert result.report.config["scale"] == [0.5, 1.0, 2.0][best]
    # True accuracy of each candidate, computed after the choice (same predictions here).
    assert len({r["accuracy"] for r in rows}) == 1 and "after the decisions" in sel["note"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "scramble-test:scale=2.0" in html and "Candidates (ranked by im)" in html
    assert result.report.gate.enabled


def test_select_auto_export_failure_says_the_candidates_are_lost(
    plain_pkg: Path, target_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourcefree.errors import ExportError
    from tests.parity_helpers import fail_adapted_parity

    fail_adapted_parity(monkeypatch, times=1)
    request = AdaptRequest(
        plain_pkg, target_dir, method="scramble-test", out=tmp_path / "run", select="auto"
    )
    with pytest.raises(ExportError) as err:
        adapt(dataclasses.replace(request, device="cpu"))
    text = str(err.value)
    assert "held in memory only (--select auto writes no checkpoint" in text
    assert "so their training is lost" in text
    assert "train the chosen candidate scramble-test:scale=" in text
    assert "-m scramble-test and --set KEY=VALUE for each of its settings" in text
    assert "--resume:" not in text, "no resume is offered where there is none"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("pkg", "shift", "rule"),
    [("confident_pkg", 0, "agreement"), ("unsure_pkg", 1, "class_ami")],
)
def test_select_auto_with_a_calibration_ranks_by_the_gates_rule(
    pkg: str,
    shift: int,
    rule: str,
    request: pytest.FixtureRequest,
    target_dir: Path,
    tmp_path: Path,
) -> None:
    # confident: nothing changes a prediction ATC counts as right, no candidate passes
    # the gate -> agreement with the source; unsure: every candidate overrules
    # predictions ATC counts as wrong, all pass -> first, by ClassAMI.
    result = adapt(
        AdaptRequest(
            request.getfixturevalue(pkg),
            target_dir,
            method="scramble-test",
            out=tmp_path / "run",
            overrides=[f"shift={shift}"],
            select="auto",
            device="cpu",
        )
    )
    sel = result.report.to_dict()["selection"]
    assert sel["criterion"] == rule
    assert ("3 of 3 candidates pass" in sel["criterion_reason"]) == (rule == "class_ami")
    rows = sel["candidates"]
    values = [r["value"] for r in rows]
    assert values[0] == values[1] == values[2]  # same predictions and features everywhere
    passes = [r.get("passes_gate") for r in rows]
    assert passes == ([True] * 3 if rule == "class_ami" else [None] * 3)
    assert [r["chosen"] for r in rows] == [True, False, False]  # ties: the first
    html = (tmp_path / "run" / "report.html").read_text()
    assert html_escape(sel["criterion_reason"]) in html
    assert ("<td>yes</td><td class='n'>" in html) == (rule == "class_ami")  # passes gate


def test_select_auto_refuses_a_set_grid_key(
    plain_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="--select auto varies 'scale'"):
        adapt(
            AdaptRequest(
                plain_pkg,
                target_dir,
                method="scramble-test",
                out=tmp_path / "run",
                select="auto",
                overrides=["scale=2"],
                device="cpu",
            )
        )
    with pytest.raises(ResumeError, match="cannot resume"):
        adapt(
            AdaptRequest(
                plain_pkg, target_dir, method="shot", out=tmp_path / "r", select="auto", resume=True
            )
        )
    with pytest.raises(ConfigError, match="-m auto takes no config"):
        adapt(
            AdaptRequest(
                plain_pkg, target_dir, method="auto", out=tmp_path / "r", overrides=["lr=1"]
            )
        )
    assert not (tmp_path / "run").exists()


def test_auto_method_runs_candidates_cheapest_first(
    plain_pkg: Path,
    target_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(selection, "auto_methods", lambda n: ["sharpen-test", "scramble-test"])
    runner = CliRunner()
    res = runner.invoke(
        adapt_command,
        [
            *(str(plain_pkg), str(target_dir), "-m", "auto", "-o", str(tmp_path / "run")),
            *("--device", "cpu", "--no-progress", "--budget-s", "600"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "candidates (ranked by im" in res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    sel = report["selection"]
    assert sel["mode"] == "auto-method" and sel["budget_s"] == 600
    assert [r["candidate"] for r in sel["candidates"]] == ["sharpen-test", "scramble-test"]
    best = max(sel["candidates"], key=lambda r: r["value"])
    assert best["method"] == "sharpen-test"  # sharper logits: higher IM
    assert best["chosen"] and report["method"] == best["method"]
    assert report["config"]["scale"] == 2.0
    assert report["gate"]["enabled"]


def test_auto_method_with_a_tiny_budget_exports_the_source(
    plain_pkg: Path,
    target_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(selection, "auto_methods", lambda n: ["sharpen-test", "scramble-test"])

    def slow(info: StepInfo) -> None:
        time.sleep(0.3)

    result = adapt(
        AdaptRequest(
            plain_pkg,
            target_dir,
            method="auto",
            out=tmp_path / "run",
            device="cpu",
            budget_s=0.2,
            on_step=slow,
        )
    )
    rows = result.report.to_dict()["selection"]["candidates"]
    assert [r["status"] for r in rows] == ["stopped", "not started"]
    assert "budget" in rows[0]["detail"] and "budget" in rows[1]["detail"]
    gate = result.report.to_dict()["gate"]
    assert gate["decision"] == "source" and "no candidate finished" in gate["reason"]
    assert result.package.manifest.provenance["method"] == "source"
    assert result.report.method == "auto"
    assert result.report.selection is not None
    assert result.report.selection.criterion is None  # nothing was ranked
    html = (tmp_path / "run" / "report.html").read_text()
    assert "ranked by nothing: no candidate finished" in html


def test_auto_method_skips_a_method_the_package_cannot_serve(
    plain_pkg: Path,
    target_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # adafer needs the vendor's AU detector, which this package does not carry.
    monkeypatch.setattr(selection, "auto_methods", lambda n: ["adafer", "sharpen-test"])
    result = adapt(
        AdaptRequest(plain_pkg, target_dir, method="auto", out=tmp_path / "run", device="cpu")
    )
    rows = {r["candidate"]: r for r in result.report.to_dict()["selection"]["candidates"]}
    assert rows["adafer"]["status"] == "skipped"
    assert "carries no action-unit detector" in rows["adafer"]["detail"]
    assert rows["sharpen-test"]["chosen"] and result.report.method == "sharpen-test"


# --- issue 24: the gate's subsample --------------------------------------------------


def _record_model_outputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[nn.Module, Any]]:
    """Every call of selection.model_outputs in adapt: (model, indices)."""
    calls: list[tuple[nn.Module, Any]] = []
    real = selection.model_outputs

    def spy(model: nn.Module, data: Any, **kw: Any) -> selection.Outputs:
        calls.append((model, kw.get("indices")))
        return real(model, data, **kw)

    monkeypatch.setattr(selection, "model_outputs", spy)
    return calls


def test_select_auto_scores_one_seeded_subsample_and_the_source_once(
    unsure_pkg: Path,
    target_dir: Path,
    eval_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _record_model_outputs(monkeypatch)
    result = adapt(
        AdaptRequest(
            unsure_pkg,
            target_dir,
            method="scramble-test",
            out=tmp_path / "run",
            overrides=["shift=1"],  # every candidate differs from the source
            select="auto",
            device="cpu",
            seed=5,
            gate_sample=16,
            eval_labels=eval_csv,
        )
    )
    expected = selection.sample_indices(64, 16, seed=5)
    assert expected is not None and len(expected) == 16
    assert len(calls) == 4  # the source once, then each of the 3 candidates once
    assert all(np.array_equal(idx, expected) for _, idx in calls)
    source_head = _weights(unsure_pkg)["head.weight"]
    same = [torch.equal(cast(Any, m).head.weight, source_head) for m, _ in calls]
    assert same == [True, False, False, False]
    report = result.report.to_dict()
    gate, sel = report["gate"], report["selection"]
    assert gate["sample_size"] == sel["sample_size"] == 16
    assert gate["target_images"] == sel["target_images"] == 64
    assert gate["scores"]["source"]["images"] == gate["scores"]["adapted"]["images"] == 16
    assert all(r["scores"]["images"] == 16 for r in sel["candidates"])
    se = gate["standard_errors"]
    assert set(se) == {"source", "adapted", "estimated_gain"}
    assert se["adapted"]["anchored"] is not None and se["source"]["snd"] is None
    changed = 1.0 - gate["scores"]["adapted"]["agreement"]
    gain = gate["estimated_gain"]
    assert se["estimated_gain"] == pytest.approx(math.sqrt((changed - gain**2) / 16), abs=1e-5)
    assert "subsample of 16 images" in gate["accuracy"]["note"]  # judged on the same images
    assert "subsample of 16 images" in sel["note"]


def test_a_target_below_the_sample_size_is_scored_whole_as_before(
    confident_pkg: Path,
    target_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sourcefree.engine.models import load_classifier

    calls = _record_model_outputs(monkeypatch)
    runs = {}
    for name, value in (("default", None), ("all", "all"), ("exact", 64)):
        runs[name] = adapt(
            AdaptRequest(
                confident_pkg,
                target_dir,
                method="scramble-test",
                out=tmp_path / name,
                overrides=["scale=2.0"],
                device="cpu",
                force=True,  # the adapted model is exported: its weights are read back below
                gate_sample=value,
            )
        ).report.to_dict()["gate"]
    assert all(idx is None for _, idx in calls)  # every image, in order
    assert runs["default"] == runs["all"] == runs["exact"]
    gate = runs["default"]
    assert gate["sample_size"] == gate["target_images"] == 64
    # The same scores as full passes over every image (test_selection.py shows those are
    # bitwise the pre-subsample three-pass outputs).
    x = _images(target_dir)
    src_pkg, ada_pkg = load_package(confident_pkg), load_package(tmp_path / "all" / "package")
    src = selection.model_outputs(
        load_classifier(src_pkg.manifest.architecture, src_pkg.weights_bytes), x
    )
    ada = selection.model_outputs(
        load_classifier(ada_pkg.manifest.architecture, ada_pkg.weights_bytes), x
    )
    stats = src_pkg.manifest.source_stats
    cal = None if stats is None else stats.calibration
    assert gate["scores"]["source"] == selection.score_outputs(src, src, cal).to_dict()
    assert gate["scores"]["adapted"] == selection.score_outputs(ada, src, cal).to_dict()


@pytest.mark.parametrize("value", ["1", "-3", "lots", "1.5", "9" * 40])
def test_cli_refuses_a_bad_gate_sample(
    plain_pkg: Path, target_dir: Path, tmp_path: Path, value: str
) -> None:
    res = CliRunner().invoke(
        adapt_command,
        [
            *(str(plain_pkg), str(target_dir), "-m", "scramble-test", "-o", str(tmp_path / "run")),
            *("--device", "cpu", "--no-progress", "--gate-sample", value),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "error: --gate-sample" in res.output and "Traceback" not in res.output
    assert "9" * 30 not in res.output
    assert not (tmp_path / "run").exists() and not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="gate-sample"):
        adapt(
            AdaptRequest(
                plain_pkg, target_dir, method="scramble-test", out=tmp_path / "r", gate_sample=True
            )
        )


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_resume_scores_the_same_subsample_again(
    source_pkg: Path, target_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The source outputs are not stored in the run directory: a resumed run recomputes
    # them on the same subsample (a pure function of N, size and seed) and gets the same gate.
    sets = ["batch_size=16", "epochs=2"]
    common: dict[str, Any] = {"method": "tent", "overrides": sets, "device": "cpu"}
    ref = adapt(
        AdaptRequest(source_pkg, target_dir, out=tmp_path / "ref", gate_sample=20, **common)
    )

    def kill(info: StepInfo) -> None:
        if info.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    wd = tmp_path / "wd"
    with pytest.raises(RunInterruptedError):
        adapt(
            AdaptRequest(
                source_pkg,
                target_dir,
                out=tmp_path / "run",
                workdir=wd,
                on_step=kill,
                gate_sample=20,
                **common,
            )
        )
    calls = _record_model_outputs(monkeypatch)
    done = adapt(
        AdaptRequest(
            source_pkg,
            target_dir,
            out=tmp_path / "run",
            workdir=wd,
            resume=True,
            gate_sample=20,
            **common,
        )
    )
    assert done.report.resumed is True
    expected = selection.sample_indices(64, 20, seed=0)
    assert expected is not None
    assert len(calls) == 2 and all(np.array_equal(i, expected) for _, i in calls)
    assert done.report.gate == ref.report.gate
    assert done.report.gate.sample.sample_size == 20


def test_cli_gate_sample_is_reported(plain_pkg: Path, target_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        adapt_command,
        [
            *(str(plain_pkg), str(target_dir), "-m", "scramble-test", "-o", str(tmp_path / "run")),
            *("--device", "cpu", "--no-progress", "--gate-sample", "16"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "scored on a seeded subsample of 16 of 64 images" in res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["gate"]["sample_size"] == 16 and report["gate"]["target_images"] == 64
