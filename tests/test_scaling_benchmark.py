"""benchmarks/scaling.py: the table never estimates a GPU row, and the ratios are derived."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any


def _row(run: str, processes: int, images: int, train_s: float, acc: float) -> dict[str, Any]:
    return {
        "run": run,
        "device": "cpu",
        "processes": processes,
        "images": images,
        "train_s": train_s,
        "total_s": train_s + 10,
        "phase_s": {"warm-up": train_s / 2, "fine-tune": train_s / 4},
        "accuracy": acc,
    }


def test_table_and_ratios(load_benchmark: Callable[[str], ModuleType]) -> None:
    bench = load_benchmark("scaling")
    payload = {
        "date": "d",
        "machine": "m",
        "cpus": 2,
        "load_before": "1.0",
        "torch": "t",
        "argv": "a",
        "rows": [
            _row("weak-1", 1, 100, 10.0, 0.5),
            _row("weak-2", 2, 200, 12.5, 0.6),
            _row("same-job-1", 1, 200, 20.0, 0.61),
        ],
    }
    table = bench.markdown(payload)
    assert "| cuda | 2 | | | | | | no GPU was available |" in table
    assert "efficiency t(1 proc, 100) / t(2 procs, 200) = 0.80" in table
    assert "speed-up 1.60x" in table and "(difference 0.0100)" in table
    sets = bench.overrides(2, 4, 15)
    assert "ssl.batch_size=128" in sets and "batch_size=64" in sets
