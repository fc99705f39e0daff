"""benchmarks/scale.py in its smoke mode: rows, ratios from the rows, memory, the plot."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_scale_quick_writes_rows_ratios_and_plot(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    pytest.importorskip("cv2")
    bench = load_benchmark("scale")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept text\n")
    results, plot = tmp_path / "scale.json", tmp_path / "scale.svg"
    argv = ["--quick", "--methods", "adabn", "--real-photos", "2", "--adapt-workers", "2"]
    argv += ["--workdir", str(tmp_path / "w"), "--results", str(results), "--svg", str(plot)]
    assert bench.main([*argv, "--docs", str(docs), "--no-docs"]) == 0
    payload = json.loads(results.read_text())
    assert str(tmp_path) not in results.read_text()  # no local paths in the JSON
    assert payload["argv"].count("PATH") == 4 and payload["machine"]["cores"] >= 1
    rows = payload["rows"]
    assert [(r["method"], r["images"], r["size"]) for r in rows] == [
        ("adabn", 200, 32),
        ("adabn", 400, 32),
    ]
    for r in rows:
        assert r["ok"] and r["exit_status"] in (0, 4)
        assert all(v >= 0 for v in r["ms_per_image"].values()) and r["ms_per_image"]["total"] > 0
        assert r["peak_rss_anon_mb"] > 0 and r["memory_samples"] > 0
        assert r["peak_children_rss_anon_mb"] > 0  # the two decode workers were sampled
    lo, hi = rows
    ratio = payload["ratios"]["adabn"]
    assert ratio["time_per_image"] == round(
        hi["ms_per_image"]["total"] / lo["ms_per_image"]["total"], 3
    )
    assert ratio["peak_rss_anon"] == round(hi["peak_rss_anon_mb"] / lo["peak_rss_anon_mb"], 3)
    throughput = payload["decode_throughput"]
    assert throughput[0]["workers"] == 1 and all(r["images"] == 200 for r in throughput)
    photos = payload["photos"]
    assert photos["images"] == 20 and photos["full"]["ms_per_image"] > 0
    assert photos["speedup"] > 0
    faces = payload["faces"]["rows"]
    modes = {(r["photos"], r["mode"]) for r in faces}
    assert modes == {(s, m) for s in ("synthetic", "real") for m in ("none", "detect", "align")}
    for r in faces:
        assert r["ms_per_image"] > 0 and 0 <= r["no_face"] <= r["images"]
        assert ("extra_ms_per_image" in r) == (r["mode"] != "none")
    over = payload["overhead"]
    assert over["ok"] and over["images"] == 200 and over["plain"]["steps"] == 200 // 64
    assert over["ratio"] == round(over["engine"]["train_s"] / over["plain"]["total_s"], 3)
    root = ET.fromstring(plot.read_text())
    assert root.tag.endswith("svg") and len(root.findall("{*}polyline")) == 2  # ms and MiB
    assert docs.read_text() == "# Benchmarks\n\nkept text\n"  # --no-docs
    block = bench.markdown(payload, "scale.svg")
    assert "| adabn | 200 | " in block and "| synthetic | detect | 1 | 20 |" in block
    assert block.endswith("(scale.svg)") and "ratio" in block


def test_scale_hides_paths_and_computes_ratios_per_method(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    bench = load_benchmark("scale")
    assert bench.public_argv(["--n", "5", "--workdir", "/x/y", "--svg=/a/b.svg"]) == (
        "python benchmarks/scale.py --n 5 --workdir PATH --svg=PATH"
    )
    rows = [
        {"method": "adabn", "images": n, "ok": True, "ms_per_image": {"total": t, "train": t},
         "peak_rss_anon_mb": m}
        for n, t, m in ((4000, 2.0, 500.0), (64000, 3.0, 600.0))
    ]  # fmt: skip
    ratio = bench.ratios([*rows, {"method": "shot", "images": 4000, "ok": True}])
    assert list(ratio) == ["adabn"]  # one size of shot: no ratio
    assert ratio["adabn"]["time_per_image"] == 1.5 and ratio["adabn"]["peak_rss_anon"] == 1.2


def test_parts_run_alone_and_merge_with_the_results_file(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    bench = load_benchmark("scale")
    results = tmp_path / "scale.json"
    base = ["--quick", "--workdir", str(tmp_path / "w"), "--results", str(results), "--no-docs"]
    assert bench.main([*base, "--parts", "decode"]) == 0
    first = json.loads(results.read_text())
    assert first["parts"]["decode"] == "measured" and first["parts"]["photos"] is None
    assert first["decode_throughput"] and first["rows"] is None and first["photos"] is None
    assert "not measured yet" in bench.markdown(first, None)  # rows, photos, faces, overhead
    first["date"] = "2026-01-02"  # as if the decode part had run on another day
    results.write_text(json.dumps(first))
    assert bench.main([*base, "--parts", "photos"]) == 0
    merged = json.loads(results.read_text())
    assert merged["decode_throughput"] == first["decode_throughput"]  # kept, not re-run
    assert merged["parts"]["decode"] == "2026-01-02" and merged["parts"]["photos"] == "measured"
    assert merged["photos"]["reduced"]["ms_per_image"] > 0 and merged["rows"] is None
    text = bench.markdown(merged, None)
    assert "decode: measured 2026-01-02" in text and "scale: not measured yet" in text
    # another image size: the earlier parts are not merged
    assert bench.main([*base, "--size", "16", "--parts", "photos"]) == 0
    assert json.loads(results.read_text())["decode_throughput"] is None


def test_add_rows_keeps_earlier_rows_of_pairs_not_run_now(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    bench = load_benchmark("scale")
    args = bench.parse(["--add-rows", "--n", "4000", "--methods", "clup"])
    path = tmp_path / "scale.json"
    old_rows = [
        {"method": m, "images": n, "ok": True} for n in (4000, 64000) for m in ("adabn", "clup")
    ]
    old = {"size": args.size, "quick": False, "date": "2026-12-01", "rows": old_rows}
    path.write_text(json.dumps({**old, "parts": {"scale": "measured"}}))
    new = [{"method": "clup", "images": 4000, "ok": True, "date": "2026-12-06"}]
    merged = bench.merged_rows(new, path, args)
    assert [(r["method"], r["images"], r["date"]) for r in merged] == [
        ("adabn", 4000, "2026-12-01"),
        ("clup", 4000, "2026-12-06"),  # this run's row replaces the earlier one
        ("adabn", 64000, "2026-12-01"),
        ("clup", 64000, "2026-12-01"),
    ]
    path.write_text(json.dumps({**old, "size": args.size + 1}))  # other settings: nothing kept
    assert bench.merged_rows(new, path, args) == new
