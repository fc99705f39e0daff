"""What ``adapt`` leaves in OUT: an adapted package that audits clean, and the reports."""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.data.imaging import is_image_name
from sourcefree.package import strictjson
from sourcefree.package.audit import audit_package
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.pipeline.report import AdaptReport
from sourcefree.pipeline.report_html import bar_chart, line_chart, render_report
from sourcefree.runtime.evaluation import pseudo_label_quality

#: A CluP run small enough for the CPU test suite (64 images, a few seconds per phase).
CLUP_SETS = [
    "ssl.epochs=2",
    "ssl.batch_size=16",
    "ssl.prototypes=8",
    "ssl.hidden_dim=32",
    "ssl.output_dim=16",
    "ssl.local_crops=2",
    "ssl.queue_length=32",
    "ssl.queue_start_epoch=1",
    "kmeans_n_init=1",
    "kmeans_max_iter=20",
    "label_batch_size=32",
    "batch_size=16",
    "finetune.epochs=2",
]


def _adapt_cli(pkg: Path, data: Path, out: Path, method: str, sets: list[str], *extra: str) -> str:
    args = [str(pkg), str(data), "-m", method, "-o", str(out), "--no-progress", "--device", "cpu"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(adapt_command, [*args, *extra])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def clup_run(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, dict[str, Any]]:
    """One small CluP run with evaluation labels: (OUT, CLI output, report.json)."""
    out = tmp_path_factory.mktemp("clup") / "out"
    text = _adapt_cli(
        source_pkg, target_dir, out, "clup", CLUP_SETS, "--eval-labels", str(eval_csv)
    )
    return out, text, json.loads((out / "report.json").read_text())


def test_adapted_package_audits_clean(
    source_pkg: Path, target_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/alice")
    result = adapt(
        AdaptRequest(source_pkg, target_dir, method="adabn", out=tmp_path / "out", device="cpu")
    )
    report = audit_package(result.out / "package")
    assert report.clean and report.verified, report.findings
    assert report.manifest["kind"] == "adapted"
    assert "method" in report.manifest["provenance_keys"]


def test_clup_package_audits_clean(
    clup_run: tuple[Path, str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/alice")
    report = audit_package(clup_run[0] / "package")
    assert report.clean and report.verified, report.findings


def test_pseudo_label_quality_counts() -> None:
    truth = np.array([0, 0, 1, -1, 2])
    out = pseudo_label_quality(np.array([0, 1, 2, 3]), np.array([0, 1, 1, 2]), truth, "abc")
    assert out["selected"] == 4 and out["images"] == 5 and out["coverage"] == 0.8
    assert out["labelled_selected"] == 3 and out["precision"] == pytest.approx(2 / 3)
    assert out["selected_per_class"] == {"a": 1, "b": 2, "c": 1}
    assert out["precision_per_class"] == {"a": 1.0, "b": 0.5, "c": None}
    empty = pseudo_label_quality(np.zeros(0, np.int64), np.zeros(0, np.int64), truth, "abc")
    assert empty["precision"] is None and empty["coverage"] == 0.0
    assert empty["selected_per_class"] == {"a": 0, "b": 0, "c": 0}


def test_clup_reports_pseudo_label_precision_and_coverage(
    clup_run: tuple[Path, str, dict[str, Any]],
) -> None:
    _, text, report = clup_run
    pl = report["evaluation"]["pseudo_labels"]
    selection = report["method_report"]["pseudo_labels"]
    assert pl["selected"] == selection["n_selected"] > 0
    assert pl["images"] == 64 and pl["coverage"] == pl["selected"] / 64
    assert sum(pl["selected_per_class"].values()) == pl["selected"]
    labels = report["evaluation"]["source"][0]["labels"]
    assert [pl["selected_per_class"][n] for n in labels] == selection["selected_per_class"]
    assert 0 < pl["labelled_selected"] <= pl["selected"]
    assert 0.0 <= pl["precision"] <= 1.0
    assert pl["source_accuracy"] == report["evaluation"]["source"][0]["accuracy"]
    assert "pseudo-labels: precision" in text and "coverage" in text
    assert "selected per class: surprise" in text


def test_shot_reports_pseudo_labels_over_all_images(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _adapt_cli(source_pkg, target_dir, out, "shot", ["epochs=1"], "--eval-labels", str(eval_csv))
    pl = json.loads((out / "report.json").read_text())["evaluation"]["pseudo_labels"]
    assert pl["selected"] == pl["images"] == 64 and pl["coverage"] == 1.0
    labelled = sum(1 for _ in eval_csv.open()) - 1
    assert pl["labelled_selected"] == labelled


def test_no_pseudo_labels_without_the_hook(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _adapt_cli(source_pkg, target_dir, out, "adabn", [], "--eval-labels", str(eval_csv))
    evaluation = json.loads((out / "report.json").read_text())["evaluation"]
    assert "pseudo_labels" not in evaluation and "adapted" in evaluation


_VOID = {"meta", "rect", "line", "circle", "polyline", "br", "hr", "img", "input", "link"}


class _Checker(HTMLParser):
    """Counts tags, checks that every element is closed in order, collects text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: dict[str, int] = {}
        self.errors: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs += attrs
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs += attrs

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()


def _check_html(text: str) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    return checker


def test_report_html_is_self_contained_with_plots(
    clup_run: tuple[Path, str, dict[str, Any]],
) -> None:
    out, _, _ = clup_run
    assert sorted(p.name for p in out.iterdir()) == ["package", "report.html", "report.json"]
    text = (out / "report.html").read_text(encoding="utf-8")
    checker = _check_html(text)
    assert checker.tags["svg"] >= 6, "loss curves, purity histogram, per class, accuracy"
    assert checker.tags.get("script", 0) == checker.tags.get("link", 0) == 0
    assert checker.tags.get("img", 0) == 0, "no images at all"
    assert not [a for a in checker.attrs if a[0] in ("src", "href")], "no external resources"
    for needle in (
        "loss of phase warm-up",
        "purity histogram",
        "selected samples per class",
        "per-class accuracy",
        "confusion matrix: adapted",
        "precision of the selected pseudo-labels",
    ):
        assert needle in text, needle


def test_report_html_names_no_target_file(
    clup_run: tuple[Path, str, dict[str, Any]], target_dir: Path, eval_csv: Path
) -> None:
    out, _, _ = clup_run
    text = (out / "report.html").read_text(encoding="utf-8")
    names = [p for p in target_dir.rglob("*") if is_image_name(p.name)]
    assert len(names) == 64
    for p in names:
        assert p.name not in text, p.name
    for folder in (target_dir, eval_csv.parent, out):
        assert str(folder) not in text
    assert target_dir.name not in text and eval_csv.name not in text


def test_report_html_escapes_text_and_survives_odd_values() -> None:
    report: dict[str, Any] = {
        "method": "<script>alert(1)</script>",
        "config": {"note": "a & b"},
        "phases": [
            {
                "name": "x<y",
                "epochs": 1,
                "steps_per_epoch": 2,
                "epoch_loss": [float("nan")],
                "loss_curve": [[1, 1.0], [2, float("inf")]],
            }
        ],
        "method_report": {"pseudo_labels": {"selected_per_class": [1, 2]}},
    }
    text = render_report(report, labels=["<a>", "b"])
    assert "<script>" not in text and "&lt;script&gt;" in text and "a &amp; b" in text
    _check_html(text)
    assert "no values" in line_chart("empty", [("s", [])], "x", "y")
    assert "<svg" in bar_chart("one", ["a"], [("g", [None], "#000")], "y")


REPORT_KEYS = [
    "format",
    "method",
    "preset",
    "config",
    "seed",
    "device",
    "amp",
    "memory_format",
    "sources",
    "target",
    "resumed",
    "world_size",
    "checkpoints_written",
    "phases",
    "method_report",
    "package",
    "gate",
]
GATE_KEYS = ["enabled", "decision", "verdict", "forced", "criterion", "estimated_gain", "reason"]
GATE_KEYS += ["note", "reference_source", "calibrated", "scores", "sample_size", "target_images"]
GATE_KEYS += ["stability_images", "standard_errors", "accuracy"]


def _plain(value: Any) -> Any:
    """As JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps(value))


def test_report_json_round_trips_through_the_typed_report(
    clup_run: tuple[Path, str, dict[str, Any]],
) -> None:
    report = clup_run[2]
    typed = AdaptReport.from_dict(report)
    again = typed.to_dict()
    assert _plain(again) == report
    assert list(again) == [*REPORT_KEYS, "export", "evaluation", "plan", "memory", "timings_s"]
    assert again["memory"]["features"]["storage"] == "float32"  # CluP's bank, within budget
    assert list(again["gate"]) == GATE_KEYS
    assert list(again["evaluation"]) == ["note", "source", "adapted", "pseudo_labels"]
    assert typed.gate.measure is not None and typed.gate.accuracy is not None
    assert typed.evaluation is not None and typed.evaluation.pseudo_labels is not None


def test_selection_report_keys_in_order_and_round_trip(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    """-m auto whose budget is spent before the first candidate: the source is exported."""
    request = AdaptRequest(source_pkg, target_dir, method="auto", out=tmp_path / "out")
    request = dataclasses.replace(request, device="cpu", budget_s=1e-9, eval_labels=eval_csv)
    typed = adapt(request).report
    assert isinstance(typed, AdaptReport) and typed.gate.decision == "source"
    report = typed.to_dict()
    assert list(report) == [*REPORT_KEYS, "selection", "export", "evaluation", "plan", "timings_s"]
    assert list(report["gate"]) == [
        *("enabled", "decision", "verdict", "forced", "reason", "note", "scores"),
        *("sample_size", "target_images", "stability_images"),
    ]
    sel = report["selection"]
    assert list(sel) == [
        *("mode", "select", "criterion", "criterion_reason", "budget_s", "sample_size"),
        *("target_images", "stability_images", "chosen", "candidates", "note"),
    ]
    rows = sel["candidates"]
    assert rows and {r["status"] for r in rows} == {"not started"}
    assert list(rows[0]) == [
        *("candidate", "method", "overrides", "status", "seconds", "scores", "value"),
        *("chosen", "detail", "accuracy"),
    ]
    assert rows[0]["accuracy"] is None and report["gate"]["decision"] == "source"
    raw = (tmp_path / "out" / "report.json").read_bytes()
    assert raw == strictjson.dumps(report), "report.json is the typed report's to_dict()"
    written = json.loads(raw)
    assert _plain(report) == written
    assert _plain(AdaptReport.from_dict(written).to_dict()) == written
