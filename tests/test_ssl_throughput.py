"""benchmarks/ssl_throughput.py measures every stage of a real SwAV step."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch


def test_one_step_is_timed_stage_by_stage(load_benchmark: Callable[[str], ModuleType]) -> None:
    bench = load_benchmark("ssl_throughput")
    torch.manual_seed(0)
    row = bench.measure(torch.device("cpu"), steps=2, warmup=0, batch_size=8)
    assert set(row["stage_share"]) == set(bench.STAGES)
    assert abs(sum(row["stage_share"].values()) - 1.0) < 0.01
    assert row["bottleneck"] in bench.STAGES
    assert row["images_per_s"] > 0 and row["device"] == "cpu"
    table = bench.markdown({"argv": "", "torch": "x", "threads": 1, "rows": [row]})
    assert "no GPU was available" in table and "| cpu | 8 |" in table
