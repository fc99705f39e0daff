"""CSV in and out: formula injection and undecodable names in ``predict -o``; BOM on input."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from sourcefree.cli.app import csv_cell, main
from sourcefree.data.readers import read_labels_csv
from sourcefree.runtime.evaluation import labelled_dataset

HOSTILE_LABELS = ["=cmd|x", "+cmd|y", "@cmd|z"]


def _predict(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["predict", *args, "--device", "cpu"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"), newline="")))


@pytest.fixture(scope="module")
def hostile_pkg(
    tmp_path_factory: pytest.TempPathFactory, source_package_factory: Callable[..., Path]
) -> Path:
    """A package whose every label starts with a formula character (allowed: printable)."""
    out = tmp_path_factory.mktemp("pkg") / "hostile"
    return source_package_factory(out, labels=HOSTILE_LABELS)


@pytest.mark.parametrize(
    ("text", "cell"),
    [
        ("happy", "happy"),
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", '"\'\rx"'),
        ('=HYPERLINK("x")', '"\'=HYPERLINK(""x"")"'),
        ("a,b", '"a,b"'),
        ("0.500000", "0.500000"),
        ("photo-\udcff.png", "photo-\\xff.png"),
        ("=\udcfe", "'=\\xfe"),
        ("lone\ud800", "lone\\ud800"),
    ],
)
def test_csv_cell(text: str, cell: str) -> None:
    assert csv_cell(text) == cell
    csv_cell(text).encode("utf-8")  # always writable


def test_formula_labels_and_names_are_neutralised(
    hostile_pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(("=cmd|calc.png", "@x.png", "plain.png")):
        Image.new("RGB", (40, 40), (90 + 50 * i, 60, 30)).save(photos / name)
    monkeypatch.chdir(photos)  # paths are written as given: "=cmd|calc.png", not /tmp/...
    out = tmp_path / "preds.csv"
    code, text = _predict(str(hostile_pkg), ".", "-o", str(out))
    assert code == 0, text
    rows = _rows(out)
    assert rows[0] == ["path", "label", "probability"] and len(rows) == 4
    assert sorted(r[0] for r in rows[1:]) == ["'=cmd|calc.png", "'@x.png", "plain.png"]
    for row in rows[1:]:
        assert row[1] in {"'" + lbl for lbl in HOSTILE_LABELS}
        assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in row)


def test_undecodable_file_name_is_escaped_not_fatal(source_pkg: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (90, 60, 30)).save(photos / "a.png")
    Image.new("RGB", (40, 40), (30, 60, 90)).save(photos / "c.png")
    os.rename(photos / "c.png", os.fsencode(photos) + b"/b-\xff\xfe.png")
    out = tmp_path / "preds.csv"
    code, text = _predict(str(source_pkg), str(photos), "-o", str(out))
    assert code == 0, text
    assert "2 predicted, 0 skipped" in text
    rows = _rows(out)
    assert [Path(r[0]).name for r in rows[1:]] == ["a.png", "b-\\xff\\xfe.png"]
    assert all(len(r) == 3 and float(r[2]) > 0 for r in rows[1:])
    code, text = _predict(str(source_pkg), str(photos))  # the same rows on stdout
    assert code == 0 and "b-\\xff\\xfe.png," in text


def _labels_table(tmp_path: Path, body: str, bom: bool) -> Path:
    folder = tmp_path / ("bom" if bom else "plain")
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    path = folder / "labels.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8"))
    return path


@pytest.mark.parametrize("body", ["path,label\na.png,happy\nb.png,sad\n", "a.png,2\nb.png,0\n"])
def test_labels_csv_with_bom_reads_the_same(tmp_path: Path, body: str) -> None:
    labels = ["sad", "neutral", "happy"]
    plain = _labels_table(tmp_path, body, bom=False)
    bom = _labels_table(tmp_path, body, bom=True)
    for given in (labels, None):
        a, b = read_labels_csv(plain, labels=given), read_labels_csv(bom, labels=given)
        assert [(s.key, s.label) for s in a.samples] == [(s.key, s.label) for s in b.samples]
        assert a.labels == b.labels
    a = labelled_dataset(plain.parent, plain, labels)
    b = labelled_dataset(bom.parent, bom, labels)
    assert [(s.key, s.label) for s in b.samples] == [(s.key, s.label) for s in a.samples]
    assert sorted(s.label for s in b.samples) == [0, 2]
