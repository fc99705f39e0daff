"""report.html answers first: the summary box, the glossary, one number format, progress bars."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from sourcefree.data import progress as progress_mod
from sourcefree.pipeline.report import GATE_Z
from sourcefree.pipeline.report_html import (
    CLASS_CHANGE_FLAG,
    GLOSSARY,
    class_changes,
    decision_text,
    fmt,
    render_report,
)

LABELS = ["surprise", "fear", "happiness"]


def _metrics(accuracy: float, recall: list[float], images: int = 40) -> dict[str, Any]:
    return {
        "accuracy": accuracy,
        "mean_class_recall": sum(recall) / len(recall),
        "per_class_recall": dict(zip(LABELS, recall, strict=True)),
        "confusion": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        "labels": LABELS,
        "images": images,
    }


def _report(decision: str, gain: float | None, se: float | None, **gate: Any) -> dict[str, Any]:
    """A report.json object as adapt writes it (only the keys the page reads)."""
    calibrated = gain is not None
    g: dict[str, Any] = {
        "enabled": True,
        "decision": decision,
        "verdict": decision,
        "forced": False,
        "criterion": "anchored" if calibrated else "uncalibrated",
        "estimated_gain": gain,
        "reason": "shot is estimated better: ...",
        "reference_source": 0,
        "calibrated": calibrated,
        "scores": {"source": {"im": 1.2, "kappa": 1.0}, "adapted": {"im": 1.3, "kappa": 0.8}},
        "sample_size": 8192,
        "target_images": 250000,
        "standard_errors": {"source": {}, "adapted": {}, "estimated_gain": se},
    }
    g.update(gate)
    return {
        "method": "shot",
        "sources": [{"name": "fer-vendor", "version": "1.2.0", "sha256": "ab" * 32}],
        "target": {"images": 250000, "read": {"total": 250003, "ok": 250000, "bad": 3}},
        "config": {},
        "phases": [],
        "method_report": {},
        "gate": g,
        "export": {"sha256": "cd" * 32, "model": decision, "parity_max_abs_logits": 3.8e-6},
    }


def _box(html: str) -> str:
    start = html.index('<section class="summary')
    return html[start : html.index("</section>", start)]


def _text(html: str) -> str:
    """Visible text: tags dropped, entities of the summary decoded."""
    return re.sub(r"<[^>]+>", " ", html).replace("&rarr;", "->").replace("&#x27;", "'")


def test_summary_box_comes_first_and_says_the_adapted_model_was_kept() -> None:
    html = render_report(_report("adapted", 0.1234, 0.0101), LABELS)
    assert html.index('<section class="summary adapted"') < html.index("<h2>Run</h2>")
    assert html.index("<h2>Summary</h2>") < html.index("Do-no-harm gate")
    box = _text(_box(html))
    # +0.123 +- two standard errors (2 x 0.0101 = 0.020), in plain words.
    assert "Adapted model kept: estimated accuracy +0.123 ± 0.020 (two standard errors)" in box
    assert "over the source" in box
    assert "shot" in box and "fer-vendor 1.2.0" in box and "250,000 target images" in box
    assert "3 unreadable images skipped" in box
    assert "on 8,192 of 250,000 target images" in box
    assert "Measured with your evaluation labels" not in box, "no labels, no accuracy"
    assert decision_text(_report("adapted", 0.1234, 0.0101))[0] == "adapted"


def test_summary_box_says_why_the_source_model_was_kept() -> None:
    kept = render_report(_report("source", -0.0123, 0.004, reason="x"), LABELS)
    box = _text(_box(kept))
    assert '<section class="summary source"' in kept
    assert "Source model kept because the adapted model is not estimated better" in box
    assert "estimated accuracy -0.012 ± 0.008 (two standard errors)" in box
    # Without a calibration: the gate's own reason, without its closing clause.
    reason = (
        "shot looks degenerate: its IM score 0.100 is below the source's 1.200; "
        "the source model is kept"
    )
    plain = _text(_box(render_report(_report("source", None, None, reason=reason), LABELS)))
    assert "Source model kept because shot looks degenerate: its IM score 0.100" in plain
    assert "is kept." not in plain
    assert "no vendor calibration" in plain
    # --force and --no-gate say so.
    forced = _report("adapted", -0.02, 0.005, verdict="source", forced=True)
    assert "Adapted model exported anyway (--force)" in decision_text(forced)[1]
    off = _report("adapted", None, None, enabled=False)
    assert "without the do-no-harm gate (--no-gate)" in decision_text(off)[1]


def test_summary_flags_per_class_changes_with_eval_labels() -> None:
    report = _report("adapted", 0.05, 0.01)
    report["evaluation"] = {
        "note": "labels ...",
        "source": [_metrics(0.60, [0.90, 0.50, 0.40])],
        "adapted": _metrics(0.65, [0.70, 0.55, 0.65]),
    }
    report["gate"]["accuracy"] = {"source": 0.6, "adapted": 0.66, "note": "subsample"}
    assert [name for name, _, _ in class_changes(report)] == ["happiness", "surprise"]
    html = render_report(report, LABELS)
    box = _box(html)
    text = _text(box)
    assert "accuracy 0.600 (source) -> 0.650 (exported model), +0.050" in text
    assert "the labels agree with the gate's decision" in text
    flagged = re.findall(r'<tr class="flag"><th>([^<]+)</th>(.*?)</tr>', box)
    assert [name for name, _ in flagged] == ["happiness", "surprise"]  # fear moved 0.05
    assert "+0.250" in flagged[0][1] and "better" in flagged[0][1]
    assert "-0.200" in flagged[1][1] and "worse" in flagged[1][1]
    # No class over the flag: said in words; labels that contradict the gate: said too.
    report["evaluation"]["adapted"] = _metrics(0.61, [0.85, 0.55, 0.40])
    report["gate"]["accuracy"] = {"source": 0.6, "adapted": 0.55, "note": "subsample"}
    text = _text(_box(render_report(report, LABELS)))
    assert f"No class's recall changed by more than {fmt(CLASS_CHANGE_FLAG)}" in text
    assert "the labels disagree with the gate's decision" in text


def test_glossary_names_every_score_of_the_gate() -> None:
    html = render_report(_report("adapted", 0.1, 0.01), LABELS)
    glossary = html[html.index("Glossary of the scores") : html.index("<h2>Run</h2>")]
    for term in ("im", "stability", "agreement", "snd", "kappa", "estimated gain"):
        assert f"<dt>{term}</dt>" in glossary, term
    assert all(len(text) < 240 for _, text in GLOSSARY), "one line each"
    terms = {t for t, _ in GLOSSARY}
    from sourcefree.pipeline.selection import GATE_Z as SELECTION_Z
    from sourcefree.pipeline.selection import Scores

    assert SELECTION_Z is GATE_Z  # one value, defined in pipeline.report
    assert set(Scores.__dataclass_fields__) - {"images"} <= terms


def test_one_number_format() -> None:
    assert [fmt(v) for v in (0.94321, 12345, 3.8147e-6, 1.0, 0.0, None, True)] == [
        "0.943",
        "12,345",
        "3.81e-06",
        "1.000",
        "0.000",
        "-",
        "yes",
    ]
    assert fmt(0.0123, signed=True) == "+0.012" and fmt(-0.5, signed=True) == "-0.500"
    assert fmt(float("nan")) == "nan" and fmt("<b>") == "&lt;b&gt;"
    html = render_report(_report("adapted", 0.1234, 0.0101), LABELS)
    assert "3.80e-06" in html, "the parity in the run table uses the same format"


def test_progress_bars_only_on_a_terminal_and_not_when_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_mod.progress_enabled(True), "stderr is not a terminal"
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert progress_mod.progress_enabled(True)
    assert not progress_mod.progress_enabled(False), "the run asked for no bars"
    monkeypatch.setenv("RANK", "1")
    assert not progress_mod.progress_enabled(True), "torchrun: rank 0 only"
    monkeypatch.delenv("RANK")
    logger = logging.getLogger(progress_mod.LOGGER)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    assert not progress_mod.progress_enabled(True), "--quiet"
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    items = list(progress_mod.progress_iter(range(5), 5, "decoding", enabled=True, unit="img"))
    assert items == [0, 1, 2, 3, 4] and "decoding" in tty.getvalue()
    with progress_mod.progress_bar(3, "x", enabled=False) as bar:
        bar.update(2)
        bar.set_postfix({"a": "b"})
        assert not bar.active


def test_decoding_and_scoring_draw_bars(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The long steps draw their bars through the one helper (stderr a terminal here)."""
    import torch

    from sourcefree.data.readers import read_image_folder
    from sourcefree.data.synthetic import write_domain
    from sourcefree.engine.models import build_classifier
    from sourcefree.pipeline.selection import model_outputs

    seen: list[tuple[str, int, bool]] = []
    real = progress_mod.progress_bar

    def spy(total: int, desc: str, *, enabled: bool, **kw: Any) -> progress_mod.Progress:
        seen.append((desc, total, enabled))
        return real(total, desc, enabled=False, **kw)

    monkeypatch.setattr(progress_mod, "progress_bar", spy)
    monkeypatch.setattr("sourcefree.data.dataset.progress_bar", spy)
    monkeypatch.setattr("sourcefree.pipeline.selection.progress_bar", spy)
    write_domain(tmp_path / "d", "wild-mild", 6, 16, seed=1)
    loaded = read_image_folder(tmp_path / "d").load(16, progress=True)
    x = torch.from_numpy(loaded.images).permute(0, 3, 1, 2).float() / 255
    model_outputs(build_classifier("smallcnn", 3), x, batch_size=6, progress=True, desc="s")
    assert seen == [("decoding", 6, True), ("s", 6, True)]


def test_adapt_draws_every_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source_pkg: Path
) -> None:
    """Decoding, training, gate scoring and export of one tiny run, on a fake terminal."""
    from sourcefree.data.synthetic import write_domain
    from sourcefree.engine.models import build_classifier
    from sourcefree.export.writer import write_package
    from sourcefree.package.loader import load_package
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    data = write_domain(tmp_path / "d", "wild-mild", 12, 32, seed=3)
    monkeypatch.delenv("RANK", raising=False)
    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    out, sets = tmp_path / "o", ("epochs=1", "batch_size=8")
    request = AdaptRequest(source_pkg, data, method="tent", out=out, overrides=sets, device="cpu")
    adapt(dataclasses.replace(request, progress=True))
    text = err.getvalue()
    for desc in ("decoding", "scoring source", "scoring adapted", "12/12"):
        assert desc in text, desc
    # A training phase's bar (its name), and the export's four steps when asked for.
    phases = [p["name"] for p in json.loads((out / "report.json").read_text())["phases"]]
    assert phases and all(name in text for name in phases), phases
    pkg = load_package(source_pkg)
    write_package(
        build_classifier("smallcnn", len(pkg.manifest.labels)),
        kind="source",
        name="x",
        version="1.0.0",
        labels=list(pkg.manifest.labels),
        input_spec=pkg.manifest.input,
        architecture=pkg.manifest.architecture,
        out=tmp_path / "p",
        progress=True,
    )
    assert "export" in err.getvalue() and "4/4" in err.getvalue()


def test_demo_passes_its_labels_to_adapt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo's adapt request carries the photos' labels (the run itself is the slow test)."""
    from sourcefree.cli import demo
    from sourcefree.pipeline import adaptation

    class SeenError(Exception):
        pass

    requests: list[Any] = []

    def fake_adapt(request: Any) -> Any:
        requests.append(request)
        raise SeenError

    monkeypatch.setattr(demo, "N_SOURCE", 64)
    monkeypatch.setattr(demo, "N_SOURCE_VAL", 32)
    monkeypatch.setattr(demo, "N_TARGET", 16)
    monkeypatch.setattr(adaptation, "adapt", fake_adapt)
    with pytest.raises(SeenError):
        demo.run_demo(tmp_path / "d", method="tent")
    (request,) = requests
    assert request.eval_labels is not None
    rows = Path(request.eval_labels).read_text().splitlines()
    assert len(rows) == 1 + 16 and rows[1].startswith("customer-photos/")


@pytest.mark.slow
def test_demo_report_shows_accuracy_and_its_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo passes its labels: its report.html has the accuracy (tiny sizes, tent)."""
    from sourcefree.cli import demo

    monkeypatch.setattr(demo, "N_SOURCE", 300)
    monkeypatch.setattr(demo, "N_SOURCE_VAL", 100)
    monkeypatch.setattr(demo, "N_TARGET", 64)
    demo.run_demo(tmp_path / "d", method="tent")
    out = capsys.readouterr().out
    html_path = tmp_path / "d" / "adapted" / "report.html"
    assert str(html_path) in out
    report = json.loads((tmp_path / "d" / "adapted" / "report.json").read_text())
    assert report["evaluation"]["adapted"]["images"] > 0
    assert "Measured with your evaluation labels" in html_path.read_text()
