"""benchmarks/gate_cost.py at a tiny N: training vs after-training timings, the gate's sample."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def test_gate_cost_writes_rows_and_its_docs_block(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    bench = load_benchmark("gate_cost")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept text\n")
    results = tmp_path / "gate_cost.json"
    argv = ["--n", "120", "--size", "32", "--gate-sample", "50", "--workdir", str(tmp_path / "w")]
    assert bench.main([*argv, "--results", str(results), "--docs", str(docs)]) == 0
    payload = json.loads(results.read_text())
    (row,) = payload["rows"]
    assert row["images"] == 120 and row["method"] == "adabn" and row["sample_size"] == 50
    assert row["train_s"] >= 0 and row["after_training_s"] >= 0
    text = docs.read_text()
    assert "kept text" in text and text.count(bench.START) == 1 and text.count(bench.END) == 1
    block = text.split(bench.START, 1)[1].split(bench.END, 1)[0]
    assert "| 120 | 32 | adabn | 50 | 50 |" in block
    assert (tmp_path / "w" / "vendor-32" / "manifest.json").exists()  # built once, reusable
