"""Generic readers: unlabelled folder, labelled folder, labels CSV."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sourcefree.data import FER7, read_image_folder, read_labeled_folder, read_labels_csv
from sourcefree.errors import DatasetError

ImageWriter = Callable[..., Path]


def test_image_folder_is_recursive_and_sorted(tmp_path: Path, write_image: ImageWriter) -> None:
    write_image(tmp_path / "b.png", value=1)
    write_image(tmp_path / "a" / "deep" / "c.jpg", value=2, fmt="JPEG")
    write_image(tmp_path / "a" / "d.bmp", value=3)
    ds = read_image_folder(tmp_path)
    assert [s.key for s in ds.samples] == ["a/d.bmp", "a/deep/c.jpg", "b.png"]
    assert ds.labels is None and ds.targets.tolist() == [-1, -1, -1]
    loaded = ds.load(size=4)
    assert loaded.images.shape == (3, 4, 4, 3)
    assert loaded.labels.tolist() == [-1, -1, -1]
    assert int(loaded.images[0, 2, 2, 0]) == 3


def test_labeled_folder_default_order(tmp_path: Path, write_image: ImageWriter) -> None:
    for cls, n in (("dog", 2), ("cat", 1), ("bird", 3)):
        for i in range(n):
            write_image(tmp_path / cls / f"{i}.png")
    ds = read_labeled_folder(tmp_path)
    assert ds.labels == ("bird", "cat", "dog")
    assert ds.class_counts().tolist() == [3, 1, 2]


def test_labeled_folder_in_package_order(tmp_path: Path, write_image: ImageWriter) -> None:
    # Kaggle FER2013 folder names, mapped onto the canonical order by synonym.
    for i, name in enumerate(("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")):
        write_image(tmp_path / "train" / name / f"img{i}.jpg", fmt="JPEG")
    ds = read_labeled_folder(tmp_path / "train", labels=FER7)
    assert ds.labels == FER7
    by_folder = {s.key.split("/")[0]: s.label for s in ds.samples}
    assert by_folder == {
        "angry": 5,
        "disgust": 2,
        "fear": 1,
        "happy": 3,
        "neutral": 6,
        "sad": 4,
        "surprise": 0,
    }


def test_labeled_folder_errors(tmp_path: Path, write_image: ImageWriter) -> None:
    write_image(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match="has no class subfolders"):
        read_labeled_folder(tmp_path)
    write_image(tmp_path / "happy" / "a.png")
    write_image(tmp_path / "bored" / "a.png")
    with pytest.raises(DatasetError, match=r"class folder\(s\) 'bored' match no label"):
        read_labeled_folder(tmp_path, labels=FER7)


def test_labels_csv_names_relative_to_csv(tmp_path: Path, write_image: ImageWriter) -> None:
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b, with comma.png")
    write_image(tmp_path / "imgs" / "c.png")
    (tmp_path / "labels.csv").write_text(
        'path,label\nimgs/a.png,Happy\n"imgs/b, with comma.png",sad\nimgs/c.png,surprise\n'
    )
    ds = read_labels_csv(tmp_path / "labels.csv", labels=FER7)
    assert ds.targets.tolist() == [3, 4, 0]
    assert ds.load(size=8).report.ok == 3


def test_labels_csv_indices_and_no_header(tmp_path: Path, write_image: ImageWriter) -> None:
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png")
    (tmp_path / "l.csv").write_text("a.png,2\nb.png,0\nc.png,\n")
    ds = read_labels_csv(tmp_path / "l.csv")
    assert ds.labels == ("0", "1", "2")
    assert ds.targets.tolist() == [2, 0, -1]
    digits = read_labels_csv(tmp_path / "l.csv", labels=[str(i) for i in range(10)])
    assert len(digits.labels or ()) == 10
    with pytest.raises(DatasetError, match="line 1 of the labels CSV has label index 2"):
        read_labels_csv(tmp_path / "l.csv", labels=["x", "y"])


def test_labels_csv_unlabelled_paths(tmp_path: Path, write_image: ImageWriter) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("path\na.png\n")
    ds = read_labels_csv(tmp_path / "l.csv")
    assert ds.labels is None and ds.targets.tolist() == [-1]


def test_labels_csv_paths_cannot_escape(tmp_path: Path, write_image: ImageWriter) -> None:
    write_image(tmp_path / "outside.png")
    root = tmp_path / "set"
    write_image(root / "a.png")
    (root / "l.csv").write_text(
        f"a.png,x\n../outside.png,x\n{tmp_path / 'outside.png'},x\nmissing.png,x\n"
    )
    report = read_labels_csv(root / "l.csv").preflight(max_bad_fraction=1.0)
    assert report.reasons == {"outside_root": 2, "missing": 1}
    assert report.ok == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a.png,happy,extra\n", "line 1 of the labels CSV has 3 fields"),
        ("a.png,bored\n", "line 1 of the labels CSV has unknown label 'bored'"),
        ("path,label\n", "the labels CSV has no rows"),
        ('"a.png,happy\n', "line 1 of the labels CSV is not valid CSV"),
    ],
)
def test_labels_csv_errors(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        read_labels_csv(tmp_path / "l.csv", labels=FER7)


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"the labels CSV '.*nope\.csv' does not exist"):
        read_labels_csv(tmp_path / "nope.csv")


def test_subset_and_torch_dataset(tmp_path: Path, write_image: ImageWriter) -> None:
    for cls in ("a", "b"):
        for i in range(2):
            write_image(tmp_path / cls / f"{i}.png", value=100 + i)
    ds = read_labeled_folder(tmp_path)
    sub = ds.subset(np.array([3, 0]))
    assert sub.targets.tolist() == [1, 0]
    tds = sub.torch_dataset(size=8)
    x, y = tds[0]
    assert tuple(x.shape) == (3, 8, 8) and int(y) == 1


def test_labels_csv_numeric_names_and_newline_paths(
    tmp_path: Path, write_image: ImageWriter
) -> None:
    write_image(tmp_path / "two\nlines.png", value=9)
    write_image(tmp_path / "b.png")
    (tmp_path / "l.csv").write_text('path,label\n"two\nlines.png",7\nb.png,1\n')
    ds = read_labels_csv(tmp_path / "l.csv", labels=[str(i) for i in range(1, 8)])
    assert ds.targets.tolist() == [6, 0]  # "7" and "1" are names here, not indices
    assert ds.load(size=4).report.ok == 2
