"""Face preprocessing as part of the package's input contract (``input.faces``).

Real photos: scikit-image's astronaut (a NASA portrait) and LFW faces, and its coffee
cup as a photo without a face. The key check: a package exported with ``--faces align``
gives bitwise the same input tensors on the adaptation/evaluation side
(``ImageDataset.load(spec=...)``) and on the serving side (``Predictor``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sourcefree.cli.app import main
from sourcefree.data import read_image_folder
from sourcefree.data.dataset import ImageDataset, Sample
from sourcefree.data.faces import (
    MAX_FACE_SIDE,
    NoFaceError,
    align_face,
    eye_template,
    face_inputs,
    find_eyes,
    grey_pixels,
    model_face,
)
from sourcefree.errors import ConfigError, PackageError
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import FaceSpec, InputSpec
from sourcefree.runtime.predictor import Predictor
from tests.face_photos import astronaut as _astronaut
from tests.face_photos import lfw_faces as _lfw_faces
from tests.face_photos import write_smallcnn_weights

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("cv2")  # detection and alignment need OpenCV (the faces extra)

LABELS = "surprise,fear,happiness"
SIZE = 32
#: The astronaut photo rotated by this many degrees (counter-clockwise) about her face.
TILT = 12.0


def _run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _tilted() -> Image.Image:
    return _astronaut().rotate(TILT, resample=Image.Resampling.BICUBIC, center=(225, 115))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-frame photos: the astronaut (PNG, tilted JPEG), 4 LFW faces, a coffee cup."""
    root = tmp_path_factory.mktemp("photos")
    _astronaut().save(root / "astronaut.png")
    _tilted().save(root / "tilted.jpg", quality=90)
    for i, face in enumerate(_lfw_faces(4)):
        face.save(root / f"lfw{i}.png")
    Image.fromarray(skimage_data.coffee()).save(root / "coffee.png")  # no face
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_smallcnn_weights(tmp_path_factory.mktemp("vendor") / "w.safetensors")


def _export(weights: Path, out: Path, *extra: str) -> tuple[int, str]:
    return _run(
        "export", "--arch", "smallcnn", "--weights", weights, "--labels", LABELS,
        "--input-size", str(SIZE), "--out", out, *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def align_pkg(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "align"
    code, output = _export(weights, out, "--faces", "align")
    assert code == 0, output
    return out


@pytest.fixture(scope="module")
def whole_pkg(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "whole"
    code, output = _export(
        weights, out, "--faces", "detect", "--face-margin", "0.4", "--no-face", "whole"
    )
    assert code == 0, output
    return out


# --- the manifest field ---------------------------------------------------------------


def test_export_writes_the_face_spec(align_pkg: Path, whole_pkg: Path) -> None:
    faces = json.loads((align_pkg / "manifest.json").read_text())["input"]["faces"]
    assert faces == {
        "mode": "align",
        "margin": 0.25,
        "no_face": "skip",
        "detector": "opencv-haar-frontalface-default",
    }
    spec = load_package(whole_pkg).manifest.input.faces
    assert spec == FaceSpec(mode="detect", margin=0.4, no_face="whole")


def test_face_spec_round_trip() -> None:
    spec = InputSpec(size=(SIZE, SIZE), faces=FaceSpec(mode="align", margin=0.5))
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_mode_none_serialises_as_before(source_pkg: Path) -> None:
    """A package without faces keeps the manifest of earlier SDKs: no ``faces`` key."""
    raw = json.loads((source_pkg / "manifest.json").read_text())
    assert sorted(raw["input"]) == sorted(
        ["size", "channels", "color", "mean", "std", "interpolation", "layout", "dtype"]
    )
    assert load_package(source_pkg).manifest.input.faces == FaceSpec()
    assert "faces" not in InputSpec(size=(8, 8)).to_dict()


GOOD = {"mode": "align", "margin": 0.25, "no_face": "skip", "detector": FaceSpec().detector}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mode": "landmarks"}, "input.faces.mode"),
        ({"mode": "none"}, "input.faces.mode"),
        ({"mode": 1}, "input.faces.mode"),
        ({"margin": 1.5}, "input.faces.margin"),
        ({"margin": -0.1}, "input.faces.margin"),
        ({"margin": True}, "input.faces.margin"),
        ({"margin": "0.25"}, "input.faces.margin"),
        ({"no_face": "guess"}, "input.faces.no_face"),
        ({"detector": "dlib-hog"}, "input.faces.detector"),
        ({"landmarks": [1, 2]}, "input.faces.landmarks"),
        ({"margin": None}, "input.faces.margin"),
    ],
)
def test_strict_parsing_names_the_field(change: dict[str, Any], field: str) -> None:
    raw = InputSpec(size=(SIZE, SIZE)).to_dict()
    raw["faces"] = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(PackageError, match=f"'{field}'"):
        InputSpec.from_dict(raw)


def test_not_an_object_is_refused() -> None:
    raw = {**InputSpec(size=(SIZE, SIZE)).to_dict(), "faces": "align"}
    with pytest.raises(PackageError, match="'input.faces'"):
        InputSpec.from_dict(raw)


def test_a_package_with_a_bad_face_spec_does_not_load(pkg_copy: Path) -> None:
    path = pkg_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["input"]["faces"] = {**GOOD, "margin": 3}
    path.write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=r"input\.faces\.margin"):
        load_package(pkg_copy)


def test_verify_and_audit_pass_with_faces(align_pkg: Path) -> None:
    code, output = _run("verify", align_pkg)
    assert code == 0, output
    code, output = _run("audit", align_pkg)
    assert code == 0, output
    assert "faces: align, margin 0.25, no face: skip" in output


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--face-margin", "0.3"), "--face-margin was given without --faces"),
        (("--no-face", "whole"), "--no-face was given without --faces"),
        (("--faces", "align", "--face-margin", "1.5"), "1.5 is not in the range"),
        (("--faces", "crop"), "'crop' is not one of"),
    ],
)
def test_export_refuses_bad_face_options(
    weights: Path, tmp_path: Path, extra: tuple[str, ...], needle: str
) -> None:
    code, output = _export(weights, tmp_path / "out", *extra)
    assert code == 2 and needle in output
    assert not (tmp_path / "out").exists()


# --- detection and alignment ----------------------------------------------------------


def test_align_levels_the_eyes_on_the_template() -> None:
    photo = _tilted()
    spec = FaceSpec(mode="align")
    face = face_inputs(photo, spec)[0]
    assert face.aligned and face.found
    before = find_eyes(grey_pixels(photo), face.box)
    assert before is not None
    (lx, ly), (rx, ry) = before
    assert math.degrees(math.atan2(ry - ly, rx - lx)) < -5  # tilted in the photo
    side = face.image.width
    assert face.image.size == (side, side)
    after = find_eyes(grey_pixels(face.image), (0, 0, side, side))
    assert after is not None
    (lx, ly), (rx, ry) = after
    assert abs(math.degrees(math.atan2(ry - ly, rx - lx))) < 2.0  # level after the warp
    for (x, y), (tx, ty) in zip(after, eye_template(side, spec.margin), strict=True):
        assert abs(x - tx) < 0.04 * side and abs(y - ty) < 0.04 * side


def test_detect_and_align_are_deterministic() -> None:
    photo = _astronaut()
    for mode in ("detect", "align"):
        a, b = (face_inputs(photo, FaceSpec(mode=mode)) for _ in range(2))
        assert [f.box for f in a] == [f.box for f in b]
        assert [f.image.tobytes() for f in a] == [f.image.tobytes() for f in b]


def test_detect_crop_is_the_square_face_with_its_margin() -> None:
    face = face_inputs(_astronaut(), FaceSpec(mode="detect", margin=0.5))[0]
    left, _, right, _ = face.box
    assert 70 < right - left < 130  # the astronaut's face (test_faces.py)
    width, height = face.image.size
    assert width == height and abs(width - 1.5 * (right - left)) <= 1
    assert not face.aligned


def test_eyes_not_found_fall_back_to_the_detect_crop() -> None:
    """A face box on a blank region: no eyes, so align keeps the detect crop, counted."""
    photo = Image.new("RGB", (200, 200), (120, 110, 100))
    spec = FaceSpec(mode="align")
    face = face_inputs(photo, spec, boxes=[(50, 50, 150, 150)])[0]
    assert not face.aligned
    expected = face_inputs(photo, FaceSpec(mode="detect"), boxes=[(50, 50, 150, 150)])[0]
    assert face.image.tobytes() == expected.image.tobytes()
    data = ImageDataset([Sample("a", pixels=np.asarray(photo), box=(50, 50, 150, 150))],
                        None, root=Path("."), kind="test")  # fmt: skip
    loaded = data.load(spec=InputSpec(size=(SIZE, SIZE), faces=spec))
    assert loaded.report.no_eyes == 1 and len(loaded.images) == 1


def test_a_format_box_stands_in_for_the_detector() -> None:
    """A sample's box (ExpW, AffectNet) is cut with the margin, without detection."""
    photo = _astronaut()
    box = (180, 70, 270, 160)
    spec = InputSpec(size=(SIZE, SIZE), faces=FaceSpec(mode="detect"))
    data = ImageDataset([Sample("a", pixels=np.asarray(photo), box=box)], None,
                        root=Path("."), kind="test")  # fmt: skip
    loaded = data.load(spec=spec)
    face = model_face(photo, spec.faces, box)
    assert face is not None and face.box == box
    expected = np.asarray(face.image.resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    assert np.array_equal(loaded.images[0], expected)


def test_huge_faces_are_scaled_down_to_the_cap() -> None:
    """A face filling a large photo: the crop (margin 1 doubles it) stays bounded."""
    photo = Image.new("RGB", (3000, 3000), (200, 150, 120))
    face = face_inputs(photo, FaceSpec(mode="detect", margin=1.0), boxes=[(0, 0, 3000, 3000)])
    assert face[0].image.size == (MAX_FACE_SIDE, MAX_FACE_SIDE)
    pixels = np.asarray(face[0].image)
    assert pixels[0, 0].tolist() == [0, 0, 0]  # outside the photo: black
    assert pixels[MAX_FACE_SIDE // 2, MAX_FACE_SIDE // 2].tolist() == [200, 150, 120]
    aligned = align_face(photo, ((500.0, 1000.0), (2500.0, 1000.0)), 1.0)
    assert aligned.size == (MAX_FACE_SIDE, MAX_FACE_SIDE)


def test_no_face_policy_on_one_photo() -> None:
    cup = Image.fromarray(skimage_data.coffee())
    assert face_inputs(cup, FaceSpec(mode="detect")) == []
    assert model_face(cup, FaceSpec(mode="detect", no_face="skip")) is None
    whole = model_face(cup, FaceSpec(mode="detect", no_face="whole"))
    assert whole is not None and not whole.found and whole.image is cup


# --- one preprocessing path -----------------------------------------------------------


def _served_inputs(predictor: Predictor, files: list[Path]) -> tuple[np.ndarray, list[Any]]:
    """The arrays ``predict_files`` hands to onnxruntime, and its failures."""
    seen: list[np.ndarray] = []
    original = predictor.predict_array

    def spy(x: np.ndarray, **kwargs: Any) -> Any:
        seen.append(x.copy())
        return original(x, **kwargs)

    predictor.predict_array = spy  # type: ignore[method-assign]
    done, failed = predictor.predict_files(files)
    assert [p for p, _ in done] == [f for f in files if f not in {p for p, _ in failed}]
    return np.concatenate(seen), failed


def test_adapt_and_serve_see_bitwise_equal_inputs(align_pkg: Path, photos: Path) -> None:
    """The acceptance check: same photo, same face, same tensor on both sides."""
    pkg = load_package(align_pkg)
    spec = pkg.manifest.input
    data = read_image_folder(photos)
    loaded = data.load(spec=spec)  # what adapt and evaluate decode
    x = loaded.to_float(spec)
    report = loaded.report
    assert (report.ok, report.no_face, report.no_face_skipped) == (len(data), 1, 1)
    assert "no face found in 1 (1 skipped)" in report.summary()
    assert "coffee" not in json.dumps(report.to_dict())  # counts only, never names
    kept = [photos / data.samples[int(i)].key for i in loaded.indices]
    assert (photos / "coffee.png") not in kept and len(kept) == len(data) - 1

    predictor = Predictor(pkg, device="cpu", batch_size=3)
    for path, row in zip(kept, x, strict=True):
        served = predictor.preprocess(path)
        assert served.dtype == row.dtype and served.tobytes() == row.tobytes()
    files = sorted(photos.iterdir())
    served_all, failed = _served_inputs(predictor, files)
    assert served_all.tobytes() == x.tobytes()
    assert failed == [(photos / "coffee.png", "no face was found in an image")]
    with pytest.raises(NoFaceError):
        predictor.preprocess(photos / "coffee.png")


def test_whole_policy_is_the_same_on_both_sides(whole_pkg: Path, photos: Path) -> None:
    pkg = load_package(whole_pkg)
    spec = pkg.manifest.input
    data = read_image_folder(photos)
    loaded = data.load(spec=spec)
    assert loaded.report.no_face == 1 and loaded.report.no_face_skipped == 0
    assert len(loaded.images) == len(data)
    predictor = Predictor(pkg, device="cpu")
    served, failed = _served_inputs(predictor, sorted(photos.iterdir()))
    assert failed == [] and served.tobytes() == loaded.to_float(spec).tobytes()
    cup = loaded.images[[data.samples[int(i)].key for i in loaded.indices].index("coffee.png")]
    whole = Image.open(photos / "coffee.png").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    assert np.array_equal(cup, np.asarray(whole))  # the whole frame, resized as before


def test_all_photos_without_a_face_is_an_error(align_pkg: Path, tmp_path: Path) -> None:
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "cup.png")
    from sourcefree.errors import DatasetError

    with pytest.raises(DatasetError, match="no face was found in any of the 1 readable"):
        read_image_folder(tmp_path).load(spec=load_package(align_pkg).manifest.input)


def test_load_refuses_conflicting_options(photos: Path) -> None:
    data = read_image_folder(photos)
    spec = InputSpec(size=(SIZE, SIZE), faces=FaceSpec(mode="detect"))
    with pytest.raises(ConfigError, match="both spec= and size"):
        data.load(SIZE, spec=spec)
    with pytest.raises(ConfigError, match="both spec= and detect_faces"):
        data.load(spec=spec, detect_faces=True)
    with pytest.raises(ConfigError, match="face_margin"):
        data.load(detect_faces=True, face_margin=2.0)


def test_detect_faces_maps_onto_the_same_function(photos: Path) -> None:
    """``load(detect_faces=True)`` is ``faces`` mode detect with the whole-frame policy."""
    data = read_image_folder(photos)
    legacy = data.load(SIZE, detect_faces=True, face_margin=0.4)
    spec = InputSpec(size=(SIZE, SIZE), faces=FaceSpec("detect", 0.4, "whole"))
    assert legacy.images.tobytes() == data.load(spec=spec).images.tobytes()
    assert legacy.report.no_face == 1


# --- adapted packages and serving several faces ---------------------------------------


def test_adapted_package_inherits_the_face_spec(align_pkg: Path, tmp_path: Path) -> None:
    from sourcefree.export.adapted import adapted_package
    from sourcefree.pipeline.prepare import fresh_model

    source = load_package(align_pkg)
    model = fresh_model(source, "cpu")
    pkg, _ = adapted_package(
        model, sources=[source], method="adabn", config={}, num_target_images=5,
        out=tmp_path / "adapted",
    )  # fmt: skip
    assert pkg.manifest.kind == "adapted"
    assert pkg.manifest.input == source.manifest.input
    assert pkg.manifest.input.faces.mode == "align"


def _group(tmp: Path) -> Path:
    """Two people: the astronaut, and a smaller copy of her to the right."""
    photo = _astronaut()
    canvas = Image.new("RGB", (820, 512), (40, 40, 40))
    canvas.paste(photo, (0, 0))
    canvas.paste(photo.resize((300, 300), Image.Resampling.BICUBIC), (515, 100))
    canvas.save(tmp / "group.png")
    return tmp / "group.png"


def test_predict_faces_returns_every_face(align_pkg: Path, tmp_path: Path) -> None:
    predictor = Predictor(align_pkg, device="cpu")
    faces = predictor.predict_faces(_group(tmp_path))
    assert len(faces) == 2
    big, small = faces
    area = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert area[0] > area[1] and big.box[0] < 300 < small.box[0]
    for face in faces:
        assert face.label in LABELS.split(",") and face.probabilities.shape == (3,)
        assert math.isclose(float(face.probabilities.sum()), 1.0, rel_tol=1e-5)
    # the largest face is what predict() serves for the photo
    single = predictor.predict(_group(tmp_path))
    assert np.allclose(single.probabilities[0], big.probabilities, atol=1e-6)
    assert predictor.predict_faces(Image.fromarray(skimage_data.coffee())) == []


def test_predict_faces_needs_a_package_that_detects_faces(source_pkg: Path) -> None:
    from sourcefree.errors import InputError

    with pytest.raises(InputError, match="does not detect faces"):
        Predictor(source_pkg, device="cpu").predict_faces(_astronaut())


def test_predict_all_faces_rows(align_pkg: Path, tmp_path: Path, photos: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(_group(tmp_path), folder / "group.png")
    shutil.copy(photos / "coffee.png", folder / "coffee.png")
    code, output = _run("-q", "predict", align_pkg, folder, "--all-faces", "--device", "cpu")
    assert code == 0, output
    rows = list(csv.reader(io.StringIO(output)))
    assert rows[0] == ["path", "face", "left", "top", "right", "bottom", "label", "probability"]
    by_face = [(Path(r[0]).name, r[1]) for r in rows[1:]]
    assert by_face == [("coffee.png", "0"), ("group.png", "1"), ("group.png", "2")]
    assert rows[1][2:] == [""] * 6  # no face: no box, no prediction
    for row in rows[2:]:
        left, top, right, bottom = map(int, row[2:6])
        assert right > left and bottom > top and row[6] in LABELS.split(",")
    code, output = _run(
        "-q", "predict", align_pkg, folder / "group.png", "--all-faces", "--format", "jsonl",
        "--top-k", "2", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, output
    records = [json.loads(line) for line in output.splitlines()]
    assert [r["face"] for r in records] == [1, 2]
    assert all(len(r["box"]) == 4 and len(r["top_k"]) == 2 for r in records)


def test_predict_reports_a_photo_without_a_face(align_pkg: Path, photos: Path) -> None:
    result = CliRunner().invoke(
        main, ["predict", str(align_pkg), str(photos / "coffee.png"), str(photos / "lfw0.png"),
               "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "no face was found" in result.output
    rows = [r for r in csv.reader(io.StringIO(result.stdout)) if r and r[0] != "path"]
    assert [Path(r[0]).name for r in rows] == ["lfw0.png"]


def test_predict_all_faces_refuses_a_package_without_faces(source_pkg: Path, photos: Path) -> None:
    code, output = _run(
        "predict", source_pkg, photos / "lfw0.png", "--all-faces", "--device", "cpu"
    )
    assert code == 2 and "does not detect faces" in output


def test_serving_faces_without_opencv_fails_at_once(
    align_pkg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from sourcefree.data.faces import FaceDetectorError, load_detectors

    load_detectors.cache_clear()
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    try:
        with pytest.raises(FaceDetectorError, match=r"pip install 'sourcefree\[faces\]'"):
            Predictor(align_pkg, device="cpu")
        code, output = _run("predict", align_pkg, align_pkg / "manifest.json", "--device", "cpu")
        assert code == 2 and "face detection needs OpenCV" in output
    finally:
        load_detectors.cache_clear()
