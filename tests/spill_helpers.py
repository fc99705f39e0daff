"""A tiny ``sourcefree adapt`` run whose features spill to disk (``--memory-budget 1K``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from sourcefree.cli.app import main
from sourcefree.data.synthetic import write_domain

#: 16 images of D = 128 in float16: 16 x (2 x 128 + 4) bytes, on disk.
SPILLED = {"storage": "disk", "bytes": 4160, "within_budget": True}


def adapt_spilled(
    source_pkg: Path, tmp_path: Path, method: str, sets: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """Adapt 16 wild-mild images with a 1 KiB budget; the report and the files left behind."""
    data = write_domain(tmp_path / "wild", "wild-mild", 16, 32, seed=3)
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["adapt", str(source_pkg), str(data), "-m", method, "-o", str(out)]
    args += [a for s in sets for a in ("--set", s)]
    args += ["--device", "cpu", "--no-gate", "--no-progress", "--no-plan-probe", "--workers", "1"]
    args += ["--workdir", str(work), "--keep-workdir", "--memory-budget", "1K"]
    result = CliRunner().invoke(main, args)
    if result.exit_code != 0:
        raise AssertionError(result.output)
    report = json.loads((out / "report.json").read_text())
    return report, sorted(p.name for p in work.rglob("*") if p.is_file())
