"""``adapt --json`` and the exit code of a run whose gate kept the source (issue 21, point 6)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from sourcefree.cli.app import main
from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.cli.errors import EXIT_KEPT_SOURCE
from sourcefree.package.loader import load_package
from sourcefree.pipeline.adaptation import AdaptRequest, AdaptResult


@pytest.fixture(scope="module")
def json_run(
    source_pkg: Path, target_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Any]:
    """One small AdaBN run through the group with ``--json``: (OUT, click result)."""
    out = tmp_path_factory.mktemp("json") / "out"
    args = ["adapt", str(source_pkg), str(target_dir), "-m", "adabn", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--no-progress", "--json"])
    return out, result


def test_json_summary_is_the_only_stdout(json_run: tuple[Path, Any]) -> None:
    out, result = json_run
    summary = json.loads(result.stdout)  # one JSON object, nothing else
    report = json.loads((out / "report.json").read_text())
    assert result.exit_code == summary["exit_code"], result.output
    assert summary["decision"] == report["gate"]["decision"]
    assert summary["kept_source"] is (report["gate"]["decision"] == "source")
    assert summary["method"] == "adabn" and summary["chosen"] is None
    assert summary["gate"]["reason"] == report["gate"]["reason"]
    assert summary["accuracy"] is None  # no --eval-labels
    assert summary["package"] == str(out / "package")
    assert summary["package_sha256"] == load_package(out / "package").sha256
    assert summary["report_html"] == str(out / "report.html")
    assert summary["timings_s"] == report["timings_s"]
    # The human lines went to stderr.
    assert "adapted package:" in result.stderr and "gate: exported the" in result.stderr


def _replayed(monkeypatch: pytest.MonkeyPatch, out: Path, decision: str) -> list[AdaptRequest]:
    """Make ``adapt`` return the finished run of ``out`` with the gate's ``decision``."""
    from sourcefree.pipeline import adaptation

    report = json.loads((out / "report.json").read_text())
    report["gate"]["decision"] = decision
    seen: list[AdaptRequest] = []

    def replay(request: AdaptRequest) -> AdaptResult:
        seen.append(request)
        return AdaptResult(out, load_package(out / "package"), cast(Any, report))

    monkeypatch.setattr(adaptation, "adapt", replay)
    return seen


def test_kept_source_exits_4_with_the_summary(
    json_run: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = json_run
    _replayed(monkeypatch, out, "source")
    args = ["pkg", "data", "-m", "adabn", "-o", "out"]  # adapt is replayed: never read
    result = CliRunner().invoke(adapt_command, [*args, "--json"])
    assert result.exit_code == EXIT_KEPT_SOURCE == 4, result.output
    summary = json.loads(result.stdout)
    assert summary["kept_source"] is True and summary["exit_code"] == 4
    assert "the gate kept the source model" in result.stderr
    plain = CliRunner().invoke(adapt_command, args)  # without --json: the same code
    assert plain.exit_code == 4 and "gate: exported the source model" in plain.stdout


def test_adapted_exits_0_and_quiet_turns_bars_and_status_off(
    json_run: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = json_run
    seen = _replayed(monkeypatch, out, "adapted")
    args = ["adapt", "pkg", "data", "-m", "adabn", "-o", "out", "--json"]
    result = CliRunner().invoke(main, ["-q", *args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept_source"] is False
    assert result.stderr == ""  # -q: no status lines
    assert seen[-1].progress is False  # -q: no progress bars
    result = CliRunner().invoke(main, args)
    assert seen[-1].progress is True and "adapted package:" in result.stderr
