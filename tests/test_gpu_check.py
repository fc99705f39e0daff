"""The GPU check (benchmarks/gpu_check.sh, issue 19): its dry run here, and its helpers.

The dry run is the same sequence of steps on the CPU at toy sizes (no install, no
GPU): every step that needs CUDA must say so in the summary instead of reporting
CPU numbers, and the output must fit what the device tool brings back (a few flat
files under $OUT).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["install", "pytest_gpu", "kernels", "e2e", "runtime"]


@pytest.fixture
def gc(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("gpu_check")


def test_dry_run_writes_one_summary_and_says_what_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    proc = subprocess.run(
        ["bash", script, "--dry-run", "--work", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "kernels.json", "summary.json", "summary.md"]
    assert all(p.is_file() and p.stat().st_size < 16 << 20 for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and list(summary["steps"]) == STEPS
    steps = summary["steps"]
    assert steps["install"]["status"].startswith("skipped: dry run")
    assert steps["pytest_gpu"]["status"] == "skipped: no CUDA"
    assert steps["runtime"]["status"] == "skipped: no CUDA"
    assert steps["kernels"]["status"] == "ok on the CPU (skipped: no CUDA)"
    assert steps["kernels"]["ceilings"]["copy_bytes_per_s"] > 0
    assert {r["device"] for r in steps["kernels"]["rows"]} == {"cpu"}
    runs = steps["e2e"]["runs"]
    assert [(r["method"], r["device"]) for r in runs] == [
        (m, d) for m in ("shot", "clup") for d in ("cuda", "cuda", "cpu")
    ]
    for r in runs:
        if r["device"] == "cuda":
            assert r["status"] == "skipped: no CUDA" and "phases" not in r
        else:
            assert r["status"] == "ok", r
            assert r["amp"] == "off" and r["memory_format"] == "channels_last"
            assert r["phases"] and all(p["images_per_s"] > 0 for p in r["phases"])
            assert 0.0 <= r["accuracy"] <= 1.0
    md = (out / "summary.md").read_text()
    assert "| runtime | skipped: no CUDA |" in md
    assert "cuda (not yet measured: no GPU lent" in md
    assert str(tmp_path / "work") not in md


def _run(method: str, device: str, amp: str, acc: float, rates: dict[str, float]) -> dict[str, Any]:
    phases = [{"name": k, "images_per_s": v} for k, v in rates.items()]
    return {
        "method": method,
        "device": device,
        "amp_requested": amp,
        "status": "ok",
        "accuracy": acc,
        "phases": phases,
    }


def test_compare_runs_checks_bf16_accuracy_and_speedups(gc: ModuleType) -> None:
    runs = [
        _run("shot", "cuda", "auto", 0.700, {"adapt": 4000.0}),
        _run("shot", "cuda", "off", 0.695, {"adapt": 3000.0}),
        _run("shot", "cpu", "auto", 0.701, {"adapt": 400.0}),
        _run("clup", "cuda", "auto", 0.600, {"fine-tune": 100.0}),
        _run("clup", "cuda", "off", 0.620, {"fine-tune": 100.0}),
        {**_run("clup", "cpu", "auto", 0.6, {}), "status": "skipped: time budget (5 s left)"},
    ]
    rows = {r["method"]: r for r in gc.compare_runs(runs)}
    assert rows["shot"]["accuracy_check"].startswith("pass")
    assert rows["shot"]["speedup_per_phase"] == {"adapt": 10.0}
    assert rows["clup"]["accuracy_check"].startswith("FAIL")  # 0.02 apart
    assert "speedup_per_phase" not in rows["clup"]  # the CPU run did not finish
    only_cpu = gc.compare_runs([_run("shot", "cpu", "auto", 0.5, {"adapt": 1.0})])
    assert only_cpu[0]["accuracy_check"] == "skipped: needs both CUDA runs"


def test_time_budget_skips_steps_instead_of_overrunning(gc: ModuleType, tmp_path: Path) -> None:
    check = gc.Check(tmp_path / "out", tmp_path / "work", True, budget_s=0.0)
    summary = gc.run_check(check)
    for name in STEPS[1:]:
        assert summary["steps"][name]["status"].startswith("skipped: time budget"), name
    assert (tmp_path / "out" / "summary.md").is_file()


def test_junit_counts(gc: ModuleType, tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="7" failures="1" errors="0" skipped="2">'
        "</testsuite></testsuites>"
    )
    assert gc._junit_counts(xml) == {"tests": 7, "failures": 1, "errors": 0, "skipped": 2}
    assert gc._junit_counts(tmp_path / "missing.xml") == {}
