"""``adapt --eval-labels``: a bad labels CSV fails before any work, a good one is read once."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.data.dataset import ImageDataset
from sourcefree.data.readers import read_labels_csv as read_csv
from sourcefree.engine.trainer import Trainer
from sourcefree.errors import DatasetError
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.runtime import evaluation
from sourcefree.runtime.evaluation import evaluate, labelled_dataset

PKG_LABELS = ("surprise", "fear", "happiness")  # the test package's classes


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the target images are decoded or a model is trained."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("work started before the labels CSV was checked")

    monkeypatch.setattr(ImageDataset, "load", refuse)
    monkeypatch.setattr(Trainer, "run", refuse)


def _csv(tmp_path: Path, eval_csv: Path, *extra: str) -> Path:
    """The good labels plus ``extra`` rows, in a folder of its own."""
    folder = tmp_path / "labels"
    folder.mkdir()
    bad = folder / "bad.csv"
    bad.write_text(eval_csv.read_text() + "".join(f"{row}\n" for row in extra))
    return bad


def _cli(source_pkg: Path, target_dir: Path, out: Path, labels: Path) -> Any:
    args = [str(source_pkg), str(target_dir), "-m", "adabn", "-o", str(out), "--no-progress"]
    return CliRunner().invoke(
        adapt_command, [*args, "--device", "cpu", "--eval-labels", str(labels)]
    )


def _nothing_written(tmp_path: Path) -> None:
    assert sorted(os.listdir(tmp_path)) == ["labels"], "no OUT, lock, run directory or stage"


def test_unknown_label_fails_before_any_work(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path, no_work: None
) -> None:
    first = eval_csv.read_text().splitlines()[1].split(",")[0]
    bad = _csv(tmp_path, eval_csv, f"{first},contempt")
    lines = len(bad.read_text().splitlines())
    result = _cli(source_pkg, target_dir, tmp_path / "out", bad)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"line {lines} of the labels CSV has unknown label 'contempt'" in result.output
    assert "Traceback" not in result.output
    _nothing_written(tmp_path)


def test_long_label_is_escaped_and_truncated_on_one_line(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path, no_work: None
) -> None:
    first = eval_csv.read_text().splitlines()[1].split(",")[0]
    bad = _csv(tmp_path, eval_csv, f'{first},"evil\n{"x" * 5000}"')
    result = _cli(source_pkg, target_dir, tmp_path / "out", bad)
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0, "one line"
    assert "unknown label 'evil\\nxxx" in result.output and "x" * 100 not in result.output
    _nothing_written(tmp_path)


def test_missing_image_fails_before_any_work(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path, no_work: None
) -> None:
    rows = len(eval_csv.read_text().splitlines()) - 1
    bad = _csv(tmp_path, eval_csv, f"nope/missing.png,{PKG_LABELS[0]}")
    result = _cli(source_pkg, target_dir, tmp_path / "out", bad)
    assert result.exit_code == 2, result.output
    assert f"row {rows + 1} of the labels CSV" in result.output
    assert "'nope/missing.png'" in result.output and "not an image of the data folder" in (
        result.output
    )
    assert "Traceback" not in result.output
    _nothing_written(tmp_path)


def test_api_refuses_a_path_outside_the_data_before_any_work(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path, no_work: None
) -> None:
    bad = _csv(tmp_path, eval_csv, f"../{target_dir.name}/x.png,{PKG_LABELS[1]}")
    with pytest.raises(DatasetError, match=r"names '\.\./.*not an image of the data folder"):
        adapt(
            AdaptRequest(
                source_pkg, target_dir, method="adabn", out=tmp_path / "out", eval_labels=bad
            )
        )
    _nothing_written(tmp_path)


def test_one_image_with_two_labels_is_refused(
    target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    first, label = eval_csv.read_text().splitlines()[1].split(",")
    other = next(n for n in PKG_LABELS if n != label)
    bad = _csv(tmp_path, eval_csv, f"{first},{other}")
    with pytest.raises(DatasetError, match="again, with another label"):
        labelled_dataset(target_dir, bad, PKG_LABELS)


def test_non_ascii_digit_label_is_a_typed_error(target_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "digits.csv"
    name = next(p.name for p in sorted(target_dir.rglob("*.png")))
    bad.write_text(f"{name},\u00b2\n{name},{'9' * 5000}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="unknown label '\u00b2'"):
        labelled_dataset(target_dir, bad, PKG_LABELS)


def test_good_labels_are_read_once_and_not_decoded_again(
    source_pkg: Path,
    target_dir: Path,
    eval_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = evaluate(source_pkg, target_dir, eval_csv, device="cpu").to_dict()
    reads: list[object] = []
    loads: list[object] = []
    load = ImageDataset.load

    def counted_read(*args: Any, **kwargs: Any) -> ImageDataset:
        reads.append(args)
        return read_csv(*args, **kwargs)

    def counted_load(self: ImageDataset, *args: Any, **kwargs: Any) -> Any:
        loads.append(self.kind)
        return load(self, *args, **kwargs)

    monkeypatch.setattr(evaluation, "read_labels_csv", counted_read)  # what it calls
    monkeypatch.setattr(ImageDataset, "load", counted_load)
    result = adapt(
        AdaptRequest(
            source_pkg,
            target_dir,
            method="adabn",
            out=tmp_path / "out",
            device="cpu",
            eval_labels=eval_csv,
        )
    )
    assert len(reads) == 1, "the labels CSV is parsed once"
    assert loads == ["folder"], "only the target images are decoded"
    got = result.report.to_dict()["evaluation"]
    assert got["source"] == [expected], "same metrics as `sourcefree evaluate`"
    assert got["adapted"]["images"] == expected["images"] > 0


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[object]:
    """Count every call of ``name`` wherever a loaded sourcefree module binds it."""
    calls: list[object] = []
    modules = [m for k, m in sorted(sys.modules.items()) if k.startswith("sourcefree")]
    real = next(getattr(m, name) for m in modules if callable(getattr(m, name, None)))

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real(*args, **kwargs)

    for module in modules:
        if getattr(module, name, None) is real:
            monkeypatch.setattr(module, name, counted)
    return calls


def test_one_adapt_reads_the_csv_once_and_decodes_each_image_once(
    source_pkg: Path,
    target_dir: Path,
    eval_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = _count_calls(monkeypatch, "read_labels_csv")
    decodes = _count_calls(monkeypatch, "decode_image")
    request = AdaptRequest(
        source_pkg, target_dir, method="adabn", out=tmp_path / "out", eval_labels=eval_csv
    )
    result = adapt(dataclasses.replace(request, device="cpu"))
    images = sorted(p for p in target_dir.rglob("*.png"))
    assert reads == [eval_csv], "the labels CSV is read once"
    assert len(decodes) == len(images) == result.report.target_read["ok"] == 64
    assert len(set(map(str, decodes))) == 64, "each image once"
    labelled = sum(1 for _ in eval_csv.open()) - 1
    assert result.report.evaluation is not None
    assert result.report.evaluation.adapted["images"] == labelled
