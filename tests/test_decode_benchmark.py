"""benchmarks/decode.py on a handful of images: worker throughput, reduced vs full decoding."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType


def test_decode_benchmark_writes_rows_and_its_docs_block(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    bench = load_benchmark("decode")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept text\n")
    results = tmp_path / "decode.json"
    argv = ["--n", "40", "--photos", "12", "--photo-side", "128", "--size", "32"]
    argv += ["--train", "64", "--epochs", "1", "--repeats", "1", "--workdir", str(tmp_path / "w")]
    assert bench.main([*argv, "--results", str(results), "--docs", str(docs)]) == 0
    payload = json.loads(results.read_text())
    rows, photos = payload["throughput"], payload["photos"]
    assert rows[0]["workers"] == 1 and all(r["images"] == 40 for r in rows)
    assert photos["images"] == 12 and photos["size"] == 32
    for name in ("full", "reduced"):
        assert photos[name]["images_per_s"] > 0 and 0.0 <= photos[name]["accuracy"] <= 1.0
    assert photos["mean_abs_pixel_difference"] > 0  # 128 px JPEGs to 32 px: 1/2 scale
    text = docs.read_text()
    assert "kept text" in text and text.count(bench.START) == 1 and text.count(bench.END) == 1
    block = text.split(bench.START, 1)[1].split(bench.END, 1)[0]
    assert "| 128 px JPEGs to 32 px, reduced | 12 | 1 |" in block
    assert (tmp_path / "w" / "vendor-32" / "manifest.json").exists()  # built once, reusable
