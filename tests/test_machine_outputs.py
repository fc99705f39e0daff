"""Outputs machines can read (issue 21, point 6): predict's CSV / JSON Lines, numpy frames,
stdout for data only, -q/-v through logging, progress counters, ``doctor --json``."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from sourcefree.cli import logs
from sourcefree.cli.app import main
from sourcefree.data.imaging import MAX_PIXELS, ImageDecodeError, image_from_array
from sourcefree.errors import InputError
from sourcefree.runtime.predictor import Predictor

HOSTILE_LABELS = ["=cmd|x", "+cmd|y", "@cmd|z"]


def _invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two readable images (one in a subfolder) and one broken file."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(folder / "sub/b.png")
    (folder / "broken.jpg").write_text("not an image")
    return folder


# -- predict: columns, formats, stdout ----------------------------------------------------


def test_top_k_and_probabilities_csv(source_pkg: Path, photos: Path) -> None:
    labels = ["surprise", "fear", "happiness"]
    result = _invoke(
        "predict", str(source_pkg), str(photos), "--device", "cpu", "--top-k", "3",
        "--probabilities",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    header = ["path", "label", "probability", "label_2", "probability_2", "label_3"]
    header += ["probability_3", *(f"prob_{name}" for name in labels)]
    assert rows[0] == header and len(rows) == 3
    predictor = Predictor(source_pkg, device="cpu")
    for row in rows[1:]:
        probs = predictor.predict(row[0]).probabilities[0]
        assert [float(v) for v in row[7:]] == [float(f"{p:.6f}") for p in probs]
        order = np.argsort(-probs, kind="stable")
        assert row[1:7:2] == [labels[i] for i in order]
        assert row[2:7:2] == [f"{probs[i]:.6f}" for i in order]


def test_default_columns_are_unchanged(source_pkg: Path, photos: Path) -> None:
    result = _invoke("predict", str(source_pkg), str(photos), "--device", "cpu")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "path,label,probability" and len(lines) == 3
    assert all(len(line.split(",")) == 3 for line in lines)


def test_jsonl_on_stdout_holds_data_only(source_pkg: Path, photos: Path) -> None:
    result = _invoke(
        "predict", str(source_pkg), str(photos), "--device", "cpu", "--format", "jsonl",
        "--top-k", "2", "--probabilities", "-o", "-",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in records] == ["a.png", "b.png"]
    for r in records:
        assert set(r) == {"path", "label", "probability", "top_k", "probabilities"}
        assert list(r["probabilities"]) == ["surprise", "fear", "happiness"]
        assert r["top_k"][0] == {"label": r["label"], "probability": r["probability"]}
        assert r["probabilities"][r["label"]] == max(r["probabilities"].values())
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # Status and the skipped file are on stderr, never mixed into the data.
    assert "running on cpu" in result.stderr and "skipped" in result.stderr
    assert "2 predicted, 1 skipped" in result.stderr


def test_jsonl_file_and_minimal_records(source_pkg: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.jsonl"
    result = _invoke(
        "predict", str(source_pkg), str(photos), "--device", "cpu", "--format", "jsonl",
        "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0 and result.stdout == ""
    records = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert [set(r) for r in records] == [{"path", "label", "probability"}] * 2


def test_hostile_labels_in_probability_columns(
    tmp_path: Path, photos: Path, source_package_factory: Callable[..., Path]
) -> None:
    pkg = source_package_factory(tmp_path / "hostile", labels=HOSTILE_LABELS)
    result = _invoke(
        "predict", str(pkg), str(photos / "a.png"), "--device", "cpu", "--probabilities"
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][3:] == ["prob_=cmd|x", "prob_+cmd|y", "prob_@cmd|z"]
    assert rows[1][1].startswith("'")  # the label cell is neutralised as before
    result = _invoke(
        "predict", str(pkg), str(photos / "a.png"), "--device", "cpu", "--format", "jsonl",
        "--probabilities",
    )  # fmt: skip
    record = json.loads(result.stdout)
    assert list(record["probabilities"]) == HOSTILE_LABELS  # JSON needs no neutralising


def test_top_k_beyond_the_labels_is_refused_before_work(
    source_pkg: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds.csv"
    result = _invoke(
        "predict", str(source_pkg), str(photos), "--device", "cpu", "--top-k", "4",
        "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith("error: --top-k 4 asks for more labels than the package")
    assert "Fix: pass --top-k 3 or less" in result.stderr
    assert not out.exists() and result.stdout == ""


# -- -q / -v through logging --------------------------------------------------------------


def test_quiet_keeps_warnings_and_data_only(source_pkg: Path, photos: Path) -> None:
    result = _invoke("-q", "predict", str(source_pkg), str(photos), "--device", "cpu")
    assert result.exit_code == 0
    assert result.stderr.splitlines() == [f"skipped {photos / 'broken.jpg'}: a file is not a "
                                          "supported image"]  # fmt: skip
    assert result.stdout.startswith("path,label,probability\n")


def test_verbose_shows_library_debug_lines(source_pkg: Path, photos: Path) -> None:
    result = _invoke("-v", "predict", str(source_pkg), str(photos / "a.png"), "--device", "cpu")
    assert result.exit_code == 0
    assert "sourcefree.runtime.predictor: serving fer-small on cpu" in result.stderr
    assert "running on cpu" in result.stderr  # the CLI's own lines carry no prefix
    # The next invocation without flags is back to status level.
    again = _invoke("predict", str(source_pkg), str(photos / "a.png"), "--device", "cpu")
    assert "serving" not in again.stderr and "running on cpu" in again.stderr


def test_quiet_and_verbose_together_are_refused() -> None:
    result = _invoke("-q", "-v", "doctor")
    assert result.exit_code == 2 and "contradict" in result.output


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_counter_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    logs.configure_logging(0)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    stream = _Tty()
    with logs.progress(20, "predict", stream) as advance:
        for _ in range(20):
            advance()
    assert stream.getvalue() == "\rpredict 16/20\rpredict 20/20\n"


def test_progress_is_off_when_not_a_tty_or_quiet() -> None:
    plain = io.StringIO()
    logs.configure_logging(0)
    with logs.progress(5, "predict", plain) as advance:
        advance()
    logs.configure_logging(-1)
    tty = _Tty()
    try:
        with logs.progress(5, "predict", tty) as advance:
            advance()
    finally:
        logs.configure_logging(0)
    assert plain.getvalue() == "" and tty.getvalue() == ""
    assert logging.getLogger("sourcefree").level == logging.INFO


def test_progress_with_tqdm_counts_every_file(source_pkg: Path, photos: Path) -> None:
    pytest.importorskip("tqdm")
    logs.configure_logging(0)
    stream = _Tty()
    predictor = Predictor(source_pkg, device="cpu")
    files = [photos / "a.png", photos / "broken.jpg", photos / "sub" / "b.png"]
    with logs.progress(len(files), "predict", stream) as advance:
        done, failed = predictor.predict_files(files, on_file=advance)
    assert len(done) == 2 and len(failed) == 1
    assert "3/3" in stream.getvalue()


# -- Predictor: numpy frames --------------------------------------------------------------


def test_frames_take_the_one_preprocessing_path(source_pkg: Path) -> None:
    predictor = Predictor(source_pkg, device="cpu")
    rgb = np.random.default_rng(7).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    from_pil = predictor.preprocess(Image.fromarray(rgb))
    assert np.array_equal(predictor.preprocess(rgb), from_pil)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    assert np.array_equal(predictor.preprocess(bgr, channel_order="bgr"), from_pil)
    assert not np.array_equal(predictor.preprocess(bgr), from_pil)  # the flag matters
    grey = rgb[..., 0]
    from_grey_pil = predictor.preprocess(Image.fromarray(grey))
    assert np.array_equal(predictor.preprocess(grey), from_grey_pil)
    assert np.array_equal(predictor.preprocess(grey[..., None]), from_grey_pil)
    a = predictor.predict([rgb, Image.fromarray(rgb)])
    assert np.array_equal(a.probabilities[0], a.probabilities[1])
    b = predictor.predict(bgr, channel_order="bgr")
    assert np.array_equal(b.probabilities[0], a.probabilities[0])


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "dtype float32 and shape (8, 8, 3) is not an image"),
        (np.zeros((2, 8, 8, 3), np.uint8), "shape (2, 8, 8, 3) is not an image"),
        (np.zeros((8, 8, 4), np.uint8), "shape (8, 8, 4) is not an image"),
        (np.zeros((0, 8, 3), np.uint8), "shape (0, 8, 3) is empty"),
        (np.zeros((8,), np.uint8), "shape (8,) is not an image"),
    ],
)
def test_bad_frames_are_refused(source_pkg: Path, frame: np.ndarray, message: str) -> None:
    predictor = Predictor(source_pkg, device="cpu")
    with pytest.raises(InputError, match=re.escape(message)):
        predictor.predict(frame)


def test_huge_frame_is_refused_before_any_copy() -> None:
    side = int(MAX_PIXELS**0.5) + 1
    view = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (side, side, 3))  # no memory
    with pytest.raises(ImageDecodeError, match="is too large"):
        image_from_array(view)


def test_unknown_channel_order_is_refused(source_pkg: Path) -> None:
    predictor = Predictor(source_pkg, device="cpu")
    with pytest.raises(InputError, match="unknown channel order 'rbg'"):
        predictor.preprocess(np.zeros((8, 8, 3), np.uint8), channel_order="rbg")


# -- doctor --json ------------------------------------------------------------------------


def test_doctor_json_has_snake_case_keys_and_the_table_stays() -> None:
    result = _invoke("doctor", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", key) for key in report), list(report)
    assert isinstance(report["providers_listed"], list)
    assert report["telemetry_disabled"] is True and report["conflict"] is None
    table = _invoke("doctor")
    assert table.exit_code == 0
    assert re.search(
        r"^onnxruntime providers \(usable\) +.*CPUExecutionProvider", table.stdout, re.M
    )
    assert re.search(r"^telemetry +off", table.stdout, re.M)


def test_a_path_that_does_not_exist_is_refused_before_any_work(
    source_pkg: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds.csv"
    result = _invoke("predict", str(source_pkg), str(tmp_path / "photos"), "-o", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "photos' does not exist" in result.stderr and "Fix: check the path" in result.stderr
    assert not out.exists()


def test_no_image_or_none_readable_leaves_no_output_file(source_pkg: Path, tmp_path: Path) -> None:
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (empty / "notes.txt").write_text("not an image")
    (broken / "x.png").write_bytes(b"not a png")
    out = tmp_path / "preds.csv"
    result = _invoke("predict", str(source_pkg), str(empty), "-o", str(out))
    assert result.exit_code == 2 and "no image to predict" in result.stderr
    result = _invoke("predict", str(source_pkg), str(broken), "-o", str(out), "--device", "cpu")
    assert result.exit_code == 2 and "0 predicted, 1 skipped; nothing written" in result.stderr
    assert not out.exists()
