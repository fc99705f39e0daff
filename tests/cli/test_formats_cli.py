"""Every dataset reader from the CLI: ``--format`` / ``--format-option`` on adapt and evaluate.

Each format gets a tiny fixture in its real on-disk layout (the writers of
``tests/data``), images of the test package's classes (surprise, fear, happiness)
and some of other classes, which evaluation drops and adaptation keeps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sourcefree.cli.app import main
from sourcefree.data import FORMATS, open_dataset
from sourcefree.data.sources import check_options, open_unlabelled
from sourcefree.errors import ConfigError, ResumeError, RunInterruptedError
from sourcefree.package.loader import load_package
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.pipeline.prepare import load_target, read_data
from tests.data.conftest import _write
from tests.data.test_formats import _fer2013, _votes
from tests.signal_helpers import sigterm_at

Fixture = tuple[Path, int, list[str]]
"""(DATA, images of the package's classes, --format-option words)."""


def _folder(root: Path) -> Fixture:
    for name, cls in (("a", "surprise"), ("b", "happy"), ("c", "fear"), ("d", "fear")):
        _write(root / cls / f"{name}.png", size=(32, 32), value=40)
    return root, 4, ["--format-option", "classes=true"]


def _csv(root: Path) -> Fixture:
    for name in "abcd":
        _write(root / f"{name}.png", size=(32, 32))
    csv = root / "labels.csv"
    csv.write_text("path,label\na.png,surprise\nb.png,happiness\nc.png,fear\nd.png,\n")
    return csv, 3, []


def _fer(root: Path) -> Fixture:
    root.mkdir()
    rows = [(5, 10, "Training"), (2, 20, "Training"), (3, 30, "PublicTest"), (0, 40, "Training")]
    return _fer2013(root / "fer2013.csv", rows), 2, ["--format-option", "split=train"]


def _ferplus(root: Path) -> Fixture:
    root.mkdir()
    _fer2013(root / "fer2013.csv", [(0, 11 * (i + 1), "Training") for i in range(4)])
    header = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,"
    votes = [_votes(happy=8), _votes(surprise=9), _votes(neutral=10), _votes(happy=2, surprise=7)]
    lines = [f"Training,fer{i:07d}.png,{v}" for i, v in enumerate(votes)]
    (root / "fer2013new.csv").write_text(header + "unknown,NF\n" + "\n".join(lines) + "\n")
    return root / "fer2013new.csv", 3, []


def _rafdb(root: Path) -> Fixture:
    labels = root / "basic" / "EmoLabel" / "list_patition_label.txt"
    labels.parent.mkdir(parents=True)
    names = {"train_00001": 1, "train_00002": 4, "test_0001": 2, "test_0002": 6}
    labels.write_text("".join(f"{n}.jpg {c}\n" for n, c in names.items()))
    for stem in names:
        _write(root / "basic" / "Image" / "aligned" / f"{stem}_aligned.jpg", size=(40, 40))
    return root, 1, ["--format-option", "split=test", "--format-option", "aligned=yes"]


def _scene(path: Path, size: tuple[int, int] = (96, 80), seed: int = 0) -> np.ndarray:
    """A noise scene (PNG, lossless), so that every crop has its own pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


#: AffectNet rows: file, (x, y, w, h), expression (1 happy, 3 surprise, 4 fear,
#: 6 anger, 7 contempt, 10 no-face: dropped by the format itself).
AFFECTNET_ROWS = [
    ("1/a.png", (0, 0, 32, 32), 1),
    ("1/a.png", (40, 30, 32, 32), 3),
    ("2/b.png", (10, 5, 32, 32), 4),
    ("2/b.png", (50, 40, 32, 32), 6),
    ("2/b.png", (20, 20, 32, 32), 7),
    ("2/b.png", (0, 0, 32, 32), 10),
]


def _affectnet(root: Path) -> Fixture:
    _scene(root / "Manually_Annotated_Images" / "1" / "a.png", seed=1)
    _scene(root / "Manually_Annotated_Images" / "2" / "b.png", seed=2)
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir()
    head = "subDirectory_filePath,face_x,face_y,face_width,face_height,expression"
    rows = [f"{f},{x},{y},{w},{h},{e}" for f, (x, y, w, h), e in AFFECTNET_ROWS]
    (lists / "training.csv").write_text(head + "\n" + "\n".join(rows) + "\n")
    return lists / "training.csv", 3, []


#: ExpW faces: scene, face id, (top, left, right, bottom), label (3 happy,
#: 5 surprise, 2 fear, 6 neutral: not a class of the test package).
EXPW_FACES = [
    ("s1.png", 0, (0, 0, 32, 32), 3),
    ("s1.png", 1, (40, 50, 82, 72), 5),
    ("s2.png", 0, (8, 16, 48, 40), 2),
    ("s2.png", 1, (30, 60, 92, 62), 6),
]


def _expw(root: Path) -> Fixture:
    _scene(root / "image" / "origin" / "s1.png", seed=3)
    _scene(root / "image" / "origin" / "s2.png", seed=4)
    (root / "label").mkdir()
    lines = [  # detector scores 60, 50, 40, 30
        f"{name} {face} {t} {left} {r} {b} {60.0 - 10 * i} {code}"
        for i, (name, face, (t, left, r, b), code) in enumerate(EXPW_FACES)
    ]
    (root / "label" / "label.lst").write_text("\n".join(lines) + "\n")
    return root / "label" / "label.lst", 3, []


def _ckplus(root: Path) -> Fixture:
    frames = root / "cohn-kanade-images" / "S005" / "001"
    for i in range(1, 6):
        _write(frames / f"S005_001_{i:08d}.png", size=(32, 32), value=20 * i)
    emotion = root / "Emotion" / "S005" / "001"
    emotion.mkdir(parents=True)
    (emotion / "S005_001_00000005_emotion.txt").write_text("   7.0000000e+00\n")  # surprise
    return root, 2, ["--format-option", "last-frames=2"]


def _jaffe(root: Path) -> Fixture:
    for name in ("KA.SU1.1", "KA.HA2.2", "YM.FE1.3", "YM.AN1.4"):
        _write(root / f"{name}.tiff", size=(32, 32), fmt="TIFF")
    return root, 3, []


FIXTURES: dict[str, Callable[[Path], Fixture]] = {
    "folder": _folder,
    "csv": _csv,
    "fer2013": _fer,
    "ferplus": _ferplus,
    "rafdb": _rafdb,
    "affectnet": _affectnet,
    "expw": _expw,
    "ckplus": _ckplus,
    "jaffe": _jaffe,
}


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_every_format_has_a_fixture() -> None:
    assert sorted(FIXTURES) == sorted(FORMATS)


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_evaluate_every_format(fmt: str, source_pkg: Path, tmp_path: Path) -> None:
    data, expected, options = FIXTURES[fmt](tmp_path / fmt)
    args = ["evaluate", str(source_pkg), str(data), "--format", fmt, *options, "--json"]
    code, stdout, stderr = _run(*args)
    assert code == 0, stderr
    metrics = json.loads(stdout)
    assert metrics["images"] == expected
    assert sum(map(sum, metrics["confusion"])) == expected
    assert metrics["labels"] == ["surprise", "fear", "happiness"]


def test_evaluate_folder_without_labels_is_refused(source_pkg: Path, tmp_path: Path) -> None:
    data, _, _ = _folder(tmp_path / "faces")
    code, stdout, stderr = _run("evaluate", str(source_pkg), str(data))
    assert code == 2 and not stdout
    assert "error: the folder format carries no labels" in stderr
    assert "--labels CSV" in stderr and "Traceback" not in stderr


def test_evaluate_with_a_labels_csv_still_works(source_pkg: Path, tmp_path: Path) -> None:
    """Today's form: a folder plus --labels (the CSV's images relative to it)."""
    csv, expected, _ = _csv(tmp_path / "faces")
    code, stdout, stderr = _run(
        "evaluate", str(source_pkg), str(csv.parent), "--labels", str(csv), "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["images"] == expected


def _box_crops(root: Path, faces: list[tuple[str, tuple[int, int, int, int]]]) -> np.ndarray:
    """Manual crops (left, top, right, bottom) of the scenes, stacked."""
    crops = []
    for name, (left, top, right, bottom) in faces:
        scene = np.asarray(Image.open(root / name).convert("RGB"))
        crops.append(scene[top:bottom, left:right])
    return np.stack(crops)


def _expw_crops(root: Path) -> np.ndarray:
    boxes = [(n, (left, t, r, b)) for n, _, (t, left, r, b), _ in EXPW_FACES]
    return _box_crops(root / "image" / "origin", boxes)


def _affectnet_crops(root: Path, skip: tuple[int, ...] = (10,)) -> np.ndarray:
    boxes = [(f, (x, y, x + w, y + h)) for f, (x, y, w, h), e in AFFECTNET_ROWS if e not in skip]
    return _box_crops(root / "Manually_Annotated_Images", boxes)


def test_open_dataset_crops_the_format_boxes(tmp_path: Path) -> None:
    """The one decode path crops each box: the loaded pixels are the manual crops."""
    lst, _, _ = _expw(tmp_path / "expw")
    loaded = open_dataset(lst, "expw").load(size=32)  # the boxes are 32x32: no resizing
    assert loaded.images.shape == (4, 32, 32, 3)
    assert np.array_equal(loaded.images, _expw_crops(tmp_path / "expw"))
    assert loaded.labels.tolist() == [3, 0, 1, 6]
    csv, _, _ = _affectnet(tmp_path / "affectnet")
    everything = open_unlabelled(csv, "affectnet").load(size=32)
    assert np.array_equal(everything.images, _affectnet_crops(tmp_path / "affectnet"))
    whole = open_dataset(csv, "affectnet", {"crop": False}).load(size=(80, 96))
    scene = Image.open(tmp_path / "affectnet" / "Manually_Annotated_Images" / "1" / "a.png")
    assert np.array_equal(whole.images[0], np.asarray(scene))


def _capture_loads(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """The uint8 images of every target read of the pipeline (what the trainer sees)."""
    from sourcefree.pipeline import prepare

    seen: list[np.ndarray] = []
    real = prepare.read_target

    def spy(*args: object, **kwargs: object) -> object:
        read = real(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(np.array(read[0].images))
        return read

    monkeypatch.setattr(prepare, "read_target", spy)
    return seen


ADAPT = ["-m", "adabn", "--set", "batch_size=2", "--no-gate", "--no-progress", "--no-plan-probe"]


def test_adapt_expw_trains_on_the_face_crops(
    source_pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ExpW"
    lst, labelled, _ = _expw(root)
    seen = _capture_loads(monkeypatch)
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        "adapt", str(source_pkg), str(lst), "--format", "expw", "-o", str(out), *ADAPT,
        "--eval-format-labels",
    )  # fmt: skip
    assert code == 0, stderr
    assert "adapted: accuracy" in stdout
    # every face, neutral included (the package has no neutral: labels choose nothing),
    # each cropped from its box and resized to the package's 32x32 input
    trained = seen[0]
    assert trained.shape == (len(EXPW_FACES), 32, 32, 3)
    assert np.array_equal(trained, _expw_crops(root))
    spec = load_package(source_pkg).manifest.input
    via_api = load_target(lst, spec, data_format="expw")
    assert np.array_equal(via_api.images, trained)
    text = (out / "report.json").read_text()
    report = json.loads(text)
    assert report["target"]["read"]["format"] == "expw"
    assert report["target"]["images"] == len(EXPW_FACES)
    assert report["evaluation"]["adapted"]["images"] == labelled
    for private in (str(tmp_path), "s1.png", "label.lst"):
        assert private not in text, "no paths or file names in the report"
        for path in (out / "package").iterdir():
            assert private.encode() not in path.read_bytes(), path.name


def test_adapt_affectnet_trains_on_every_face_crop(
    source_pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "AffectNet"
    csv, _, _ = _affectnet(root)
    seen = _capture_loads(monkeypatch)
    out = tmp_path / "out"
    code, _, stderr = _run(
        "adapt", str(source_pkg), str(csv), "--format", "affectnet", "-o", str(out), *ADAPT
    )
    assert code == 0, stderr
    # anger and contempt (not the package's classes) are adapted on; no-face rows are not
    assert np.array_equal(seen[0], _affectnet_crops(root))
    assert json.loads((out / "report.json").read_text())["target"]["read"]["dropped"] == 1


def test_folder_default_is_read_image_folder(tmp_path: Path) -> None:
    from sourcefree.data import read_image_folder

    data, _, _ = _folder(tmp_path / "faces")
    request = AdaptRequest("pkg", data, method="adabn", out=tmp_path / "o")
    assert request.data_format == "folder" and request.format_options == ()
    assert read_data(request).fingerprint() == read_image_folder(data).fingerprint()
    assert "--format" not in request.command()


def test_request_records_the_format_for_resume(tmp_path: Path) -> None:
    request = AdaptRequest(
        "pkg",
        "data/label.lst",
        method="tent",
        out="o",
        data_format="expw",
        format_options=["min-confidence=25", "images_root=scenes/"],
    )
    assert request.format_options == (("images_root", "scenes/"), ("min_confidence", 25.0))
    command = request.command(resume=True)
    assert "--format expw" in command and "--resume" in command
    assert "--format-option images_root=scenes/ --format-option min_confidence=25.0" in command
    again = dataclasses.replace(request, format_options=dict(request.format_options))
    assert again == request


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_resume_refuses_a_changed_format_dataset(source_pkg: Path, tmp_path: Path) -> None:
    lst, _, _ = _expw(tmp_path / "ExpW")
    request = AdaptRequest(
        source_pkg,
        lst,
        method="tent",
        out=tmp_path / "run",
        overrides=["batch_size=2", "epochs=2"],
        workdir=tmp_path / "wd",
        device="cpu",
        data_format="expw",
        on_step=sigterm_at(2),
    )
    with pytest.raises(RunInterruptedError, match="--resume"):
        adapt(request)
    resume = dataclasses.replace(request, resume=True, on_step=None)
    with pytest.raises(ResumeError, match=r"(?i)the target dataset changed \(4 -> 2 images"):
        adapt(dataclasses.replace(resume, format_options={"min_confidence": 45}))
    lines = lst.read_text().splitlines()
    relabelled = lines[-1].rsplit(" ", 1)[0] + " 3"  # neutral -> happy
    lst.write_text("\n".join([*lines[:-1], relabelled]) + "\n")
    with pytest.raises(ResumeError, match="(?i)the target dataset changed"):
        adapt(resume)  # the same faces, but the annotation file changed
    lst.write_text("\n".join(lines) + "\n")
    os.utime(lst, ns=(0, 0))
    with pytest.raises(ResumeError, match="(?i)the target dataset changed"):
        adapt(resume)  # its modification time is part of the fingerprint


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "nosuch"], "--format 'nosuch' is not known. The formats are folder, csv,"),
        (
            ["--format", "expw", "--format-option", "split=test"],
            "'split': the expw format has no such option. The expw format takes images_root, "
            "min_confidence",
        ),
        (
            ["--format", "rafdb", "--format-option", "split=dev"],
            "split='dev' is not valid for the rafdb format. Split is one of train, test",
        ),
        (
            ["--format", "ckplus", "--format-option", "last_frames=0"],
            "Last_frames is a whole number of at least 1 (frames per sequence, default 3)",
        ),
        (["--format", "fer2013", "--format-option", "split"], "'split' is not KEY=VALUE"),
        (["--format-option", "classes=maybe"], "Classes is true or false (one subfolder"),
        (
            ["--format", "jaffe", "--format-option", "x=1"],
            "the jaffe format has no such option. The jaffe format takes no options",
        ),
    ],
)
def test_bad_format_or_option_exits_2(
    args: list[str], message: str, source_pkg: Path, tmp_path: Path
) -> None:
    data, _, _ = _folder(tmp_path / "faces")
    for verb in (
        ["evaluate", str(source_pkg), str(data)],
        ["adapt", str(source_pkg), str(data), "-m", "adabn", "-o", str(tmp_path / "out")],
    ):
        code, stdout, stderr = _run(*verb, *args)
        assert code == 2 and not stdout, (verb[0], stderr)
        assert stderr.startswith("error: ") and message in stderr, stderr
        assert "Fix:" in stderr and "Traceback" not in stderr
        assert not (tmp_path / "out").exists()


def test_eval_format_labels_needs_labels(source_pkg: Path, tmp_path: Path) -> None:
    data, _, _ = _folder(tmp_path / "faces")
    base = ["adapt", str(source_pkg), str(data), "-m", "adabn", "-o", str(tmp_path / "out")]
    code, _, stderr = _run(*base, "--eval-format-labels")
    assert code == 2 and "the folder format carries no labels" in stderr
    with pytest.raises(ConfigError, match="with --eval-labels"):
        AdaptRequest(
            "p", data, method="adabn", out="o", eval_labels="l.csv", eval_format_labels=True
        )


def test_check_options_types_values() -> None:
    assert check_options("ckplus", {"last_frames": 2, "neutral_first": "no"}) == {
        "last_frames": 2,
        "neutral_first": False,
    }
    assert check_options("fer2013", ["split=PublicTest"]) == {"split": "publictest"}
    with pytest.raises(ConfigError, match="given twice"):
        check_options("expw", ["min_confidence=1", "min-confidence=2"])
    with pytest.raises(ConfigError, match="is not valid"):
        check_options("ckplus", {"last_frames": True})
    with pytest.raises(ConfigError, match="one string"):
        check_options("expw", "min_confidence=1")
