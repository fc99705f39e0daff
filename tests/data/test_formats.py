"""Public FER formats, each on tiny fixture files written in the real on-disk layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sourcefree.data import (
    FER7,
    FER8,
    read_affectnet,
    read_ckplus,
    read_expw,
    read_fer2013,
    read_ferplus,
    read_jaffe,
    read_rafdb,
)
from sourcefree.errors import DatasetError

ImageWriter = Callable[..., Path]


def _pixels(value: int, side: int = 48) -> str:
    return " ".join([str(value)] * (side * side))


def _fer2013(path: Path, rows: list[tuple[int, int, str]]) -> Path:
    lines = ["emotion,pixels,Usage"] + [f"{e},{_pixels(v)},{u}" for e, v, u in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fer2013_labels_and_splits(tmp_path: Path) -> None:
    csv = _fer2013(
        tmp_path / "fer2013.csv",
        [(0, 10, "Training"), (3, 20, "Training"), (5, 30, "PublicTest"), (6, 40, "PrivateTest")],
    )
    ds = read_fer2013(csv)
    assert ds.labels == FER7
    assert ds.targets.tolist() == [5, 3, 0, 6]  # angry, happy, surprise, neutral
    loaded = ds.load(size=48, color="gray")
    assert loaded.images.shape == (4, 48, 48, 1)
    assert loaded.images[:, 0, 0, 0].tolist() == [10, 20, 30, 40]
    assert read_fer2013(csv, split="train").targets.tolist() == [5, 3]
    assert read_fer2013(csv, split="PublicTest").targets.tolist() == [0]
    assert read_fer2013(csv, split="test").targets.tolist() == [6]
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        read_fer2013(csv, split="dev")


def test_format_csvs_with_a_bom_read_the_same(tmp_path: Path) -> None:
    """Spreadsheet tools save CSVs with a UTF-8 byte-order mark; the header must still match."""
    rows = [(0, 10, "Training"), (3, 20, "PublicTest")]
    plain = _fer2013(tmp_path / "plain.csv", rows)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    want = read_fer2013(plain)
    got = read_fer2013(bom)
    assert got.targets.tolist() == want.targets.tolist() == [5, 3]
    assert read_fer2013(bom, split="train").targets.tolist() == [5]


def test_fer2013_variants_and_bad_rows(tmp_path: Path) -> None:
    icml = tmp_path / "icml_face_data.csv"
    icml.write_text(
        f"emotion, Usage, pixels\n1,Training,{_pixels(7)}\n2,Training,1 2 3\n"
        f"4,Training,{_pixels(300)}\n"
    )
    ds = read_fer2013(icml)
    report = ds.preflight(max_bad_fraction=1.0)
    assert ds.targets.tolist() == [2, 1, 4]
    assert report.ok == 1 and report.reasons == {"bad_row": 2}
    kaggle_test = tmp_path / "test.csv"
    kaggle_test.write_text(f"pixels\n{_pixels(1)}\n{_pixels(2)}\n")
    unlabelled = read_fer2013(kaggle_test)
    assert unlabelled.labels is None and unlabelled.targets.tolist() == [-1, -1]
    with pytest.raises(DatasetError, match="has no column 'Usage'"):
        read_fer2013(kaggle_test, split="train")


def _votes(
    neutral: int = 0,
    happy: int = 0,
    surprise: int = 0,
    contempt: int = 0,
    nf: int = 0,
    unknown: int = 0,
) -> str:
    # neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF
    return f"{neutral},{happy},{surprise},0,0,0,0,{contempt},{unknown},{nf}"


def test_ferplus_joins_by_row_position(tmp_path: Path) -> None:
    _fer2013(
        tmp_path / "fer2013.csv",
        [(0, 11 * (i + 1), "Training" if i < 4 else "PublicTest") for i in range(6)],
    )
    header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,"
    header += "unknown,NF"
    rows = [
        f"Training,fer0000000.png,{_votes(happy=8, neutral=2)}",
        f"Training,,{_votes(nf=10)}",  # not a face: blank name shifts the numbering
        f"Training,fer0000001.png,{_votes(surprise=5, neutral=5)}",  # tie -> dropped
        f"Training,fer0000002.png,{_votes(contempt=6, neutral=4)}",
        f"PublicTest,fer0000003.png,{_votes(unknown=6, happy=4)}",  # unknown -> dropped
        f"PublicTest,fer0000004.png,{_votes(surprise=7, happy=3)}",
    ]
    (tmp_path / "fer2013new.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    ds = read_ferplus(tmp_path / "fer2013new.csv")
    assert ds.targets.tolist() == [3, 0]
    assert ds.dropped == 4
    assert ds.load(size=48, color="gray").images[:, 0, 0, 0].tolist() == [11, 66]
    with_contempt = read_ferplus(tmp_path / "fer2013new.csv", labels=FER8)
    assert with_contempt.targets.tolist() == [3, 7, 0]
    assert read_ferplus(tmp_path / "fer2013new.csv", split="val").targets.tolist() == [0]
    _fer2013(tmp_path / "short.csv", [(0, 1, "Training")])
    with pytest.raises(DatasetError, match="different numbers of rows"):
        read_ferplus(tmp_path / "fer2013new.csv", fer2013_csv=tmp_path / "short.csv")


def test_ferplus_generated_folder(tmp_path: Path, write_image: ImageWriter) -> None:
    folder = tmp_path / "FER2013Train"
    write_image(folder / "fer0000000.png", size=(48, 48))
    write_image(folder / "fer0000001.png", size=(48, 48))
    (folder / "label.csv").write_text(
        f'fer0000000.png,"(0, 0, 48, 48)",{_votes(happy=9, neutral=1)}\n'
        f'fer0000001.png,"(0, 0, 48, 48)",{_votes(neutral=10)}\n'
    )
    ds = read_ferplus(folder)
    assert ds.targets.tolist() == [3, 6]
    assert ds.load(size=48).report.ok == 2


def test_rafdb_basic(tmp_path: Path, write_image: ImageWriter) -> None:
    basic = tmp_path / "basic"
    (basic / "EmoLabel").mkdir(parents=True)
    (basic / "EmoLabel" / "list_patition_label.txt").write_text(
        "train_00001.jpg 5\ntrain_00002.jpg 1\ntest_0001.jpg 7\n"
    )
    for stem in ("train_00001", "train_00002", "test_0001"):
        write_image(basic / "Image" / "aligned" / f"{stem}_aligned.jpg", size=(100, 100))
        write_image(basic / "Image" / "original" / f"{stem}.jpg", size=(60, 80))
    ds = read_rafdb(tmp_path)  # the parent of basic/ works too
    assert ds.targets.tolist() == [4, 0, 6]
    assert ds.decode(0).size == (100, 100)
    assert read_rafdb(basic, aligned=False).decode(0).size == (60, 80)
    assert read_rafdb(basic, split="test").targets.tolist() == [6]


def test_affectnet_csv_with_boxes(tmp_path: Path, write_image: ImageWriter) -> None:
    lists = tmp_path / "Manually_Annotated_file_lists"
    lists.mkdir()
    write_image(tmp_path / "Manually_Annotated_Images" / "1" / "a.jpg", size=(120, 100))
    write_image(tmp_path / "Manually_Annotated_Images" / "2" / "b.png", size=(50, 50))
    landmarks = ";".join(["10.5"] * 136)
    header = (
        "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
        "expression,valence,arousal"
    )
    rows = [
        f"1/a.jpg,10,20,64,48,{landmarks},1,0.5,0.2",  # happy
        f"2/b.png,0,0,50,50,{landmarks},7,-0.2,0.1",  # contempt
        f"2/b.png,0,0,50,50,{landmarks},8,0,0",  # None
        f"2/b.png,0,0,50,50,{landmarks},10,0,0",  # No-Face
    ]
    (lists / "training.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    ds = read_affectnet(lists / "training.csv")
    assert ds.targets.tolist() == [3]
    assert ds.dropped == 3
    assert ds.decode(0).size == (64, 48)  # cropped to the face box
    assert read_affectnet(lists / "training.csv", labels=FER8).targets.tolist() == [3, 7]
    assert read_affectnet(lists / "training.csv", crop=False).decode(0).size == (120, 100)


def test_affectnet_npy_release(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "train_set"
    (root / "annotations").mkdir(parents=True)
    for ident, code in (("0", "3"), ("1", "6"), ("2", "9")):
        write_image(root / "images" / f"{ident}.jpg")
        np.save(root / "annotations" / f"{ident}_exp.npy", np.array(code))
    ds = read_affectnet(root)
    assert ds.targets.tolist() == [0, 5]  # surprise, anger; 9 (uncertain) dropped
    assert ds.dropped == 1


def test_expw_crops_each_face(tmp_path: Path, write_image: ImageWriter) -> None:
    (tmp_path / "label").mkdir()
    write_image(tmp_path / "image" / "origin" / "scene.jpg", size=(200, 150))
    (tmp_path / "label" / "label.lst").write_text(
        "scene.jpg 0 10 20 80 90 56.3 3\n"  # top left right bottom -> 60 x 80
        "scene.jpg 1 30 100 150 70 40.1 0\n"  # a second face: angry
        "missing.jpg 0 0 0 10 10 12.0 6\n"
        "scene.jpg 2 500 500 600 600 9.0 6\n"  # a box outside the image
    )
    ds = read_expw(tmp_path / "label" / "label.lst")
    assert ds.targets.tolist() == [3, 5, 6, 6]
    assert ds.decode(0).size == (60, 80)
    assert ds.decode(1).size == (50, 40)
    assert ds.samples[0].key != ds.samples[1].key
    assert ds.preflight(max_bad_fraction=1.0).reasons == {"missing": 1, "bad_box": 1}
    assert read_expw(tmp_path / "label" / "label.lst", min_confidence=50).targets.tolist() == [3]
    (tmp_path / "label" / "bad.lst").write_text("scene.jpg 0 10 20\n")
    with pytest.raises(DatasetError, match="line 1 of the ExpW label.lst is malformed"):
        read_expw(tmp_path / "label" / "bad.lst")


def test_ckplus_sequences(tmp_path: Path, write_image: ImageWriter) -> None:
    frames = tmp_path / "cohn-kanade-images" / "S005" / "001"
    for i in range(1, 6):
        write_image(frames / f"S005_001_{i:08d}.png", value=i)
    unlabelled = tmp_path / "cohn-kanade-images" / "S010" / "002"
    for i in range(1, 4):
        write_image(unlabelled / f"S010_002_{i:08d}.png")
    emotion = tmp_path / "Emotion" / "S005" / "001"
    emotion.mkdir(parents=True)
    (emotion / "S005_001_00000005_emotion.txt").write_text("   3.0000000e+00\n")
    ds = read_ckplus(tmp_path)
    assert ds.targets.tolist() == [6, 2, 2, 2]  # first frame neutral, last three disgust
    assert [s.key.rsplit("_", 1)[1] for s in ds.samples] == [
        "00000001.png",
        "00000003.png",
        "00000004.png",
        "00000005.png",
    ]
    assert read_ckplus(tmp_path, last_frames=1, neutral_first=False).targets.tolist() == [2]
    with pytest.raises(DatasetError, match="lacks cohn-kanade-images/ or Emotion/"):
        read_ckplus(tmp_path / "Emotion")


def test_jaffe_codes_from_names(tmp_path: Path, write_image: ImageWriter) -> None:
    write_image(tmp_path / "KA.AN1.39.tiff", size=(32, 32), fmt="TIFF")
    write_image(tmp_path / "KA.HA2.40.tiff", size=(32, 32), fmt="TIFF")
    write_image(tmp_path / "YM.SU3.58.tiff", size=(32, 32), fmt="TIFF")
    write_image(tmp_path / "stray.tiff", size=(32, 32), fmt="TIFF")
    (tmp_path / "README").write_text("JAFFE")
    ds = read_jaffe(tmp_path)
    assert ds.targets.tolist() == [5, 3, 0]
    assert ds.ignored == 2
    assert ds.load(size=16, color="gray").report.ok == 3
