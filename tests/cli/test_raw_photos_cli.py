"""Issue 23's acceptance through the CLI: raw photos in, the same faces served.

A tiny smallcnn package is exported with ``--faces align``, adapted with
``sourcefree adapt PKG photos/ -m adabn`` on full-frame photos (scikit-image's
astronaut, LFW faces pasted on a larger background, two faces in one JPEG, a
coffee cup without a face), then served with ``sourcefree predict`` and
evaluated with ``sourcefree evaluate``. The tensors the adaptation computed on
(spied on ``TargetData.tensor``, the one place target pixels become model input)
are bitwise the tensors that serving builds for the same photos. The README's
"Raw photos" commands run as written.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sourcefree.cli.app import main
from sourcefree.package.loader import load_package
from tests.face_photos import astronaut, lfw_faces, write_smallcnn_weights

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("cv2")  # detection and alignment need OpenCV (the faces extra)

ROOT = Path(__file__).resolve().parents[2]
LABELS = "surprise,fear,happiness"
#: Faces the detector finds in each photo (0: none, skipped at adapt and evaluate).
FACES = {
    "astronaut.png": 1,
    "lfw0.png": 1,
    "lfw1.png": 1,
    "lfw2.png": 1,
    "pair.jpg": 2,
    "coffee.png": 0,
}
KEPT = sorted(name for name, n in FACES.items() if n)
#: What must never reach a report or a manifest: the photos' stems and folder name.
PRIVATE = ("astronaut", "lfw", "pair", "coffee", "photos")


def _run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _scene(
    faces: list[tuple[Image.Image, int, tuple[int, int]]], size: tuple[int, int]
) -> Image.Image:
    """Faces (image, side, top-left corner) pasted on a plain background of ``size``."""
    canvas = Image.new("RGB", size, (90, 110, 130))
    for face, side, at in faces:
        canvas.paste(face.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), at)
    return canvas


def write_photos(root: Path) -> Path:
    """The full-frame photos of :data:`FACES` in ``root``."""
    root.mkdir(parents=True)
    astronaut().save(root / "astronaut.png")
    lfw = lfw_faces(4)
    for i in range(3):
        _scene([(lfw[i], 148, (40 + 50 * i, 30 + 20 * i))], (360, 270)).save(root / f"lfw{i}.png")
    pair = _scene([(lfw[3], 200, (20, 50)), (lfw[2], 148, (320, 90))], (520, 300))
    pair.save(root / "pair.jpg", quality=90)
    Image.fromarray(skimage_data.coffee()).save(root / "coffee.png")
    return root


@dataclass
class Seen:
    """What the adaptation decoded and computed on, captured by the spies."""

    keys: list[str] = field(default_factory=list)
    """The photo of each target row (``load_images``' kept samples)."""
    images: Any = None
    """The uint8 target images (``LoadedImages.images``)."""
    tensors: list[tuple[list[str], np.ndarray]] = field(default_factory=list)
    """Every ``TargetData.tensor`` call: the photo of each row, the float32 rows."""


@dataclass(frozen=True)
class Run:
    """One export (``--faces align``) and adapt run, shared by the module's tests."""

    photos: Path
    source: Path
    out: Path
    report: dict[str, Any]
    seen: Seen


def _spies(mp: pytest.MonkeyPatch, seen: Seen) -> None:
    from sourcefree.engine.method import TargetData
    from sourcefree.pipeline import prepare

    real_read, real_tensor = prepare.read_target, TargetData.tensor

    def read_target(*args: Any, **kwargs: Any) -> Any:
        read = real_read(*args, **kwargs)
        seen.keys, seen.images = read[1], read[0].images
        return read

    def tensor(self: Any, index: Any = None, **kwargs: Any) -> Any:
        out = real_tensor(self, index, **kwargs)
        if self.images is not seen.images:
            raise AssertionError("the adaptation computed on images it did not load")
        if index is None:
            index = slice(None)
        elif hasattr(index, "numpy"):
            index = index.cpu().numpy()
        rows = np.arange(len(self))[index]
        seen.tensors.append(([seen.keys[int(r)] for r in rows], out.detach().cpu().numpy()))
        return out

    mp.setattr(prepare, "read_target", read_target)
    mp.setattr(TargetData, "tensor", tensor)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Export with --faces align, adapt on the photos (adabn) with the spies on."""
    root = tmp_path_factory.mktemp("raw")
    photos = write_photos(root / "photos")
    weights = write_smallcnn_weights(root / "w.safetensors")
    source = root / "pkg"
    code, _, stderr = _run(
        "export", "--arch", "smallcnn", "--weights", weights, "--labels", LABELS,
        "--input-size", "32", "--faces", "align", "--out", source,
    )  # fmt: skip
    assert code == 0, stderr
    seen = Seen()
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        _spies(mp, seen)
        code, _, stderr = _run("adapt", source, photos, "-m", "adabn", "-o", out)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    return Run(photos, source, out, report, seen)


def test_adapt_counts_the_photo_without_a_face_and_names_none(run: Run) -> None:
    target = run.report["target"]
    assert target["images"] == len(KEPT)
    faces = target["read"]["faces"]  # counts only: the coffee cup had no face, skipped
    assert (faces["mode"], faces["no_face"], faces["no_face_skipped"]) == ("align", 1, 1)
    assert sorted(faces) == ["mode", "no_eyes", "no_face", "no_face_skipped"]
    assert 0 <= faces["no_eyes"] < len(KEPT)
    assert (target["read"]["ok"], target["read"]["total"]) == (len(FACES), len(FACES))
    adapted = load_package(run.out / "package").manifest
    assert adapted.kind == "adapted"
    assert adapted.input == load_package(run.source).manifest.input  # faces inherited
    assert adapted.input.faces.mode == "align"
    package = sorted((run.out / "package").iterdir())
    text = [run.out / "report.json", run.out / "report.html", run.out / "package/manifest.json"]
    for path in [*text, *package]:
        data = path.read_bytes()  # weights and graph: whole names (short words occur by chance)
        for private in (str(run.photos), *FACES):
            assert private.encode() not in data, (path.name, private)
    for path in text:
        for word in PRIVATE:
            assert word not in path.read_text(), (path.name, word)


def test_adapt_and_predict_see_bitwise_equal_inputs(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acceptance: the rows the adaptation computed on are what serving builds."""
    from sourcefree.runtime import Predictor

    assert sorted(run.seen.keys) == KEPT  # the coffee cup was skipped, every face kept
    assert run.seen.tensors, "the adaptation never normalised its target images"
    predictor = Predictor(run.out / "package", device="cpu")
    served = {name: predictor.preprocess(run.photos / name) for name in KEPT}
    computed: set[str] = set()
    for keys, rows in run.seen.tensors:
        assert rows.shape[1:] == served[KEPT[0]].shape and rows.dtype == np.float32
        for key, row in zip(keys, rows, strict=True):
            assert row.tobytes() == served[key].tobytes(), key
            computed.add(key)
    assert sorted(computed) == KEPT

    # `sourcefree predict` hands onnxruntime the same rows (spied on predict_array)
    handed: list[np.ndarray] = []
    real = Predictor.predict_array

    def spy(self: Any, x: np.ndarray, **kwargs: Any) -> Any:
        handed.append(x.copy())
        return real(self, x, **kwargs)

    monkeypatch.setattr(Predictor, "predict_array", spy)
    code, stdout, stderr = _run("predict", run.out / "package", run.photos, "--device", "cpu")
    assert code == 0, stderr
    assert "no face was found" in stderr
    order = [Path(row["path"]).name for row in csv.DictReader(io.StringIO(stdout))]
    assert order == KEPT
    x = np.concatenate(handed)
    assert x.tobytes() == np.stack([served[name] for name in order]).tobytes()


def test_predict_all_faces_lists_every_face(run: Run) -> None:
    code, stdout, stderr = _run(
        "predict", run.out / "package", run.photos, "--all-faces", "--device", "cpu"
    )
    assert code == 0, stderr
    rows = list(csv.DictReader(io.StringIO(stdout)))
    faces = [(Path(r["path"]).name, int(r["face"])) for r in rows]
    expected = [(n, i) for n in sorted(FACES) for i in (range(1, FACES[n] + 1) or [0])]
    assert faces == expected
    for row in rows:
        box = [row[k] for k in ("left", "top", "right", "bottom")]
        if row["face"] == "0":  # the coffee cup: a "no face" row, nothing predicted
            assert box == [""] * 4 and row["label"] == row["probability"] == ""
            continue
        left, top, right, bottom = map(int, box)
        assert 0 <= left < right and 0 <= top < bottom
        assert row["label"] in LABELS.split(",") and 0 < float(row["probability"]) <= 1
    pair = [r for r in rows if r["path"].endswith("pair.jpg")]
    assert int(pair[0]["left"]) < 200 < int(pair[1]["left"])  # largest first: the left face


def test_evaluate_on_the_raw_photos(run: Run, tmp_path: Path) -> None:
    truth = dict.fromkeys(FACES, "fear") | {"astronaut.png": "happiness", "lfw1.png": "surprise"}
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{k},{v}\n" for k, v in truth.items()))
    for pkg in (run.source, run.out):
        code, stdout, stderr = _run(
            "evaluate", pkg, run.photos, "--labels", labels, "--json", "--device", "cpu"
        )
        assert code == 0, stderr
        assert json.loads(stdout)["images"] == len(KEPT)  # 6 labelled, the cup skipped


# --- the README's raw-photo commands, as written ---------------------------------------


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Raw photos (face detection and alignment)\n", 1)[1].split("\n## ", 1)[0]


def _commands(block: str) -> list[list[str]]:
    """The shell lines of a code block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split("  #", 1)[0].strip() for line in joined.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("sourcefree ")]


def test_readme_raw_photo_commands_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Export (the Quickstart's fer.safetensors), adapt a photo folder, serve every face."""
    fenced = re.findall(r"^```(\w*)\n(.*?)^```", _readme_section(), re.MULTILINE | re.DOTALL)
    commands = [c for lang, body in fenced if not lang for c in _commands(body)]
    assert [c[1] for c in commands] == ["export", "adapt", "predict"]
    assert "--faces" in commands[0] and "--all-faces" in commands[2]
    python = [body for lang, body in fenced if lang == "python"]
    assert len(python) == 1 and "predict_faces" in python[0]
    monkeypatch.chdir(tmp_path)
    import torchvision
    from safetensors.torch import save_file

    labels = commands[0][commands[0].index("--labels") + 1].split(",")
    save_file(torchvision.models.resnet18(num_classes=len(labels)).state_dict(), "fer.safetensors")
    photos = write_photos(tmp_path / "site-photos")
    (photos / "group.jpg").write_bytes((photos / "pair.jpg").read_bytes())
    for command in commands:
        code, _, stderr = _run(*command[1:])
        assert code == 0, (command, stderr)
    rows = list(csv.DictReader(io.StringIO(Path("faces.csv").read_text())))
    assert len(rows) == sum(FACES.values()) + 2 + 1  # + group.jpg's two faces, the cup's row
    exec(compile(python[0], "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all(line.startswith("(") for line in printed)
