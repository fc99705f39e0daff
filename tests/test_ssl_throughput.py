"""benchmarks/ssl_throughput.py measures every stage of a real SwAV step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "ssl_throughput", ROOT / "benchmarks/ssl_throughput.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ssl_throughput"] = module
    spec.loader.exec_module(module)
    return module


def test_one_step_is_timed_stage_by_stage() -> None:
    bench = _load()
    torch.manual_seed(0)
    row = bench.measure(torch.device("cpu"), steps=2, warmup=0, batch_size=8)
    assert set(row["stage_share"]) == set(bench.STAGES)
    assert abs(sum(row["stage_share"].values()) - 1.0) < 0.01
    assert row["bottleneck"] in bench.STAGES
    assert row["images_per_s"] > 0 and row["device"] == "cpu"
    table = bench.markdown({"argv": "", "torch": "x", "threads": 1, "rows": [row]})
    assert "no GPU was available" in table and "| cpu | 8 |" in table
