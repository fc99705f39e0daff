"""benchmarks/face_detection.py on a handful of lfw_subset crops, and the astronaut's one face."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("skimage")


def test_run_measures_each_setting_and_finds_the_astronaut(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    bench = load_benchmark("face_detection")
    settings = [bench.Setting(1, "bilinear", 0.0), bench.Setting(2, "bilinear", 0.25)]
    payload = bench.run(settings, limit=8)
    raw, grown = payload["rows"]
    assert (raw["side_px"], grown["side_px"]) == (25, 74)
    for row in (raw, grown):
        assert row["faces"] == 8 and row["non_faces"] == 8
        for key in ("face_rate", "false_positive_rate"):
            assert 0.0 <= row[key] <= 1.0
        assert row["boxes_per_face"] >= row["face_rate"] and row["ms_per_image"] >= 0
    assert raw["face_rate"] == 0.0  # a 25 px crop leaves the 24 px window no room
    assert grown["face_rate"] >= 0.75 and grown["false_positive_rate"] == 0.0
    assert payload["detector"]["min_size"] == 24 and payload["opencv_threads"] >= 1
    astro = payload["astronaut"]
    assert astro["size"] == [512, 512]
    (box,) = astro["boxes"]
    left, top, right, bottom = box
    assert 0 <= left < right <= 512 and 0 <= top < bottom <= 512
    assert 60 <= right - left <= 200  # a face, not the whole frame


def test_prepare_pads_with_edges_then_upscales(load_benchmark: Callable[[str], ModuleType]) -> None:
    bench = load_benchmark("face_detection")
    image = np.arange(25 * 25, dtype=np.uint8).reshape(25, 25)
    out = bench.prepare(image, bench.Setting(4, "bicubic", 0.5))
    assert out.shape == (49 * 4, 49 * 4) and out.dtype == np.uint8
    assert np.array_equal(bench.prepare(image, bench.Setting(1, "bilinear", 0.0)), image)
    padded = bench.prepare(image, bench.Setting(1, "bilinear", 0.25))
    assert padded.shape == (37, 37) and padded[0, 0] == image[0, 0]
    faces, non_faces = bench.lfw()
    assert faces.shape == non_faces.shape == (100, 25, 25) and faces.dtype == np.uint8


def test_main_writes_results_and_only_its_docs_block(
    load_benchmark: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    bench = load_benchmark("face_detection")
    docs = tmp_path / "data.md"
    docs.write_text(f"# Target data\n\nkept text\n\n{bench.START}\nold\n{bench.END}\n\nafter\n")
    results = tmp_path / "face_detection.json"
    argv = ["--upscales", "2", "--resamples", "bicubic", "--pads", "0.25", "--limit", "3"]
    assert bench.main([*argv, "--results", str(results), "--docs", str(docs)]) == 0
    payload = json.loads(results.read_text())
    (row,) = payload["rows"]
    assert (row["upscale"], row["resample"], row["pad"]) == (2, "bicubic", 0.25)
    text = docs.read_text()
    assert "kept text" in text and text.endswith("after\n") and "\nold\n" not in text
    block = text.split(bench.START, 1)[1].split(bench.END, 1)[0]
    assert "| 0.25 | x2 | bicubic | 74 |" in block and "astronaut" in block
    with pytest.raises(SystemExit):
        bench.main(["--upscales", "0", "--no-docs", "--results", str(results)])
