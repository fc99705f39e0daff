"""Parallel and reduced-scale decoding (issue 18, point 2): ``load(workers=N, reduced_decode=)``.

Three tests start a real pool of two workers (about half a second each); the others
decode in this process or use a stand-in worker that starts without importing anything.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, JpegImagePlugin

from sourcefree.cli.app import main
from sourcefree.data import dataset as dataset_module
from sourcefree.data import decode, read_image_folder
from sourcefree.data.decode import (
    DecodePlan,
    DecodeWorkerError,
    _decode_chunk,
    _encode_samples,
    _grow_pipe,
    _rebuild_error,
    check_workers,
    chunk_size,
    resolve_workers,
)
from sourcefree.data.faces import FaceDetectorError
from sourcefree.data.imaging import decode_image, draft_side
from sourcefree.data.synthetic import generate
from sourcefree.errors import ConfigError, DatasetError
from sourcefree.package.manifest import FaceSpec, InputSpec
from sourcefree.pipeline.request import AdaptRequest

ImageWriter = Callable[..., Path]

#: Mean absolute difference (grey levels, 0-255) allowed between reduced-scale and
#: full decoding of a 1024 px JPEG face resized to 32 px (measured: about 0.3).
MAX_REDUCED_MAE = 1.0


def _big_face(side: int = 1024, seed: int = 0) -> Image.Image:
    """A synthetic 64 px face upscaled to ``side`` px (as a large photo of one face)."""
    face = generate("studio", 1, 64, seed=seed).images[0]
    return Image.fromarray(face).resize((side, side), Image.Resampling.BICUBIC)


def _mixed(root: Path, write_image: ImageWriter) -> Path:
    """Good PNGs and JPEGs of several sizes, a corrupt file, a truncated JPEG, a zero-byte file."""
    rng = np.random.default_rng(3)
    for i in range(9):
        write_image(root / f"good{i:02d}.png", size=(16 + 3 * i, 12 + 5 * i), value=20 * i)
    for i in range(3):
        pixels = rng.integers(0, 256, (40 + 30 * i, 90 - 10 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"photo{i}.jpg", quality=90)
    _big_face(256).save(root / "large.jpg", quality=90)  # reduced: 256 px -> 64 for 32 px
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zero.jpg").write_bytes(b"")
    return root


class _Bar:
    """A stand-in progress bar that counts its steps."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def update(self, n: int = 1) -> None:
        self.counts.append(n)

    def close(self) -> None:
        pass


def _load(
    root: Path, monkeypatch: pytest.MonkeyPatch, log: Path, **kwargs: Any
) -> tuple[Any, int, str]:
    steps: list[int] = []
    monkeypatch.setattr(dataset_module, "progress_bar", lambda *a, **k: _Bar(steps))
    loaded = read_image_folder(root).load(32, max_bad_fraction=0.5, log_path=log, **kwargs)
    return loaded, sum(steps), log.read_text()


@pytest.mark.parametrize("ahead", [0, decode.PARENT_AHEAD])
def test_two_workers_give_bitwise_the_same_load(
    ahead: int, tmp_path: Path, write_image: ImageWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ahead`` 0: two started workers decode everything; else one worker and this process."""
    monkeypatch.setattr(decode, "PARENT_AHEAD", ahead)
    root = _mixed(tmp_path / "data", write_image)
    started: list[int] = []
    enter = decode.DecodePool.__enter__

    def spy(self: decode.DecodePool) -> decode.DecodePool:
        started.append(self.workers)
        return enter(self)

    monkeypatch.setattr(decode.DecodePool, "__enter__", spy)
    one, bar1, log1 = _load(root, monkeypatch, tmp_path / "one.log", workers=1)
    two, bar2, log2 = _load(root, monkeypatch, tmp_path / "two.log", workers=2)
    assert started == [2]  # workers=1 decoded in this process, workers=2 in a pool
    assert one.images.shape == (13, 32, 32, 3) and one.images.dtype == np.uint8
    assert one.images.tobytes() == two.images.tobytes()
    assert np.array_equal(one.indices, two.indices) and np.array_equal(one.labels, two.labels)
    assert one.report == two.report
    assert one.report.reasons == {"corrupt": 2, "empty": 1}
    assert bar1 == bar2 == 16
    assert log1 == log2 and len(log1.splitlines()) == 3


def test_this_process_and_a_worker_share_the_chunks_and_give_the_same_load(
    tmp_path: Path, write_image: ImageWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process decodes slowly (patched here only): the worker, once ready, takes chunks."""
    root = _mixed(tmp_path / "data", write_image)
    one, _, log1 = _load(root, monkeypatch, tmp_path / "one.log", workers=1)
    real, pools = decode.decode_sample, []
    exit_ = decode.DecodePool.__exit__

    def slow(sample: Any, plan: DecodePlan) -> decode.Decoded:
        time.sleep(0.25)  # about 3 s for the 13 images: the worker starts in well under that
        return real(sample, plan)

    def spy(self: decode.DecodePool, *args: Any) -> None:
        pools.append((self.workers, len(self._procs), self.chunks_by_workers))
        exit_(self, *args)

    monkeypatch.setattr(decode, "decode_sample", slow)
    monkeypatch.setattr(decode.DecodePool, "__exit__", spy)
    two, _, log2 = _load(root, monkeypatch, tmp_path / "two.log", workers=2)
    assert len(pools) == 1 and pools[0][:2] == (2, 1), "workers=2: one started, and this one"
    assert pools[0][2] >= 1, "the worker decoded some of the chunks"
    assert one.images.tobytes() == two.images.tobytes() and one.report == two.report
    assert np.array_equal(one.indices, two.indices) and log1 == log2


def test_strict_mode_raises_the_same_error_with_workers(
    tmp_path: Path, write_image: ImageWriter
) -> None:
    data = read_image_folder(_mixed(tmp_path / "data", write_image))
    errors = []
    for workers in (1, 2):
        with pytest.raises(DatasetError, match="Strict mode stops") as info:
            data.load(32, strict=True, workers=workers)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_faces_are_the_same_with_workers(tmp_path: Path) -> None:
    """Detection, alignment and the no-face counts cross the process boundary unchanged."""
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    from tests.face_photos import astronaut, lfw_faces

    root = tmp_path / "photos"
    root.mkdir()
    astronaut().save(root / "astronaut.png")
    astronaut().resize((1100, 1100), Image.Resampling.BICUBIC).save(root / "big.jpg", quality=90)
    for i, face in enumerate(lfw_faces(2)):
        face.save(root / f"lfw{i}.png")
    Image.fromarray(np.full((96, 128, 3), 90, dtype=np.uint8)).save(root / "wall.png")  # no face
    spec = InputSpec(size=(32, 32), faces=FaceSpec("align", 0.25, "whole"))
    data = read_image_folder(root)
    one = data.load(spec=spec, workers=1)
    two = data.load(spec=spec, workers=2)
    assert one.images.tobytes() == two.images.tobytes()
    assert one.report == two.report and one.report.no_face >= 1
    assert np.array_equal(one.indices, two.indices)


def test_a_dead_worker_is_a_typed_error_and_no_worker_survives(
    tmp_path: Path, write_image: ImageWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = read_image_folder(_mixed(tmp_path / "data", write_image))
    procs: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def record(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = popen(*args, **kwargs)
        procs.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", record)  # the module decode starts workers with
    monkeypatch.setattr(decode, "_WORKER_CODE", "import sys; sys.exit(3)")
    monkeypatch.setattr(decode, "PARENT_AHEAD", 0)  # else this process decodes all 13 alone
    with pytest.raises(DecodeWorkerError, match=r"exit code 3.*--workers 1"):
        data.load(32, workers=2, max_bad_fraction=0.5)
    assert procs and all(p.returncode is not None for p in procs)


def test_a_workers_typed_error_keeps_its_type(
    tmp_path: Path, write_image: ImageWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in worker answers with a FaceDetectorError frame: raised here as that class."""
    data = read_image_folder(_mixed(tmp_path / "data", write_image))
    frame = {
        "items": [],
        "error": {"module": "sourcefree.data.faces", "name": "FaceDetectorError",
                  "what": "no cascade", "why": "OpenCV 5", "fix": "pip install it"},
    }  # fmt: skip
    code = (
        "import sys, struct\n"
        f"h = {json.dumps(frame).encode()!r}\n"
        "sys.stdout.buffer.write(struct.pack('<II', len(h), 0) + h)\n"
        "sys.stdout.flush()\n"
        "sys.stdin.buffer.read()\n"
    )
    monkeypatch.setattr(decode, "_WORKER_CODE", code)
    monkeypatch.setattr(decode, "PARENT_AHEAD", 0)  # the worker's first answer is awaited
    with pytest.raises(FaceDetectorError, match=r"no cascade\. OpenCV 5\. Fix: pip install it"):
        data.load(32, workers=2, max_bad_fraction=0.5)


def test_a_worker_sends_results_up_to_its_error(
    tmp_path: Path, write_image: ImageWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's side, in this process: the samples before the error, then the error."""
    data = read_image_folder(_mixed(tmp_path / "data", write_image))
    plan = DecodePlan((8, 8), "gray", "bilinear", FaceSpec())
    items, blob = _encode_samples([s for s in data.samples if "good" in s.key][:3])
    calls: list[int] = []
    real = decode.decode_sample

    def flaky(sample: Any, p: DecodePlan) -> decode.Decoded:
        calls.append(1)
        if len(calls) == 2:
            raise FaceDetectorError("boom", "why", "fix")
        return real(sample, p)

    monkeypatch.setattr(decode, "decode_sample", flaky)
    header, pixels = _decode_chunk({"items": items}, blob, plan)
    assert len(header["items"]) == 1 and len(pixels) == 64
    error = _rebuild_error(header["error"])
    assert type(error) is FaceDetectorError and str(error) == "boom. Why. Fix: fix."
    monkeypatch.setattr(decode, "decode_sample", lambda s, p: 1 / 0)
    header, _ = _decode_chunk({"items": items}, blob, plan)
    other = _rebuild_error(header["error"])
    assert type(other) is DecodeWorkerError and "ZeroDivisionError" in str(other)
    assert "--workers 1" in str(other)


def test_in_memory_pixels_and_boxes_survive_the_protocol() -> None:
    """Samples with pixels (CSV formats), boxes, scan-time errors and odd bytes in paths."""
    from sourcefree.data import Sample

    grey = np.arange(48 * 40, dtype=np.uint8).reshape(48, 40)
    samples = [
        Sample("a", pixels=grey, box=(2, 3, 30, 40)),
        Sample("b", path=Path(b"/tmp/caf\xe9/x.png".decode("utf-8", "surrogateescape"))),
        Sample("c", error="missing"),
    ]
    items, blob = _encode_samples(samples)
    back = decode._decode_samples(json.loads(json.dumps(items)), blob)
    assert back[0].pixels is not None and np.array_equal(back[0].pixels, grey)
    assert back[0].box == (2, 3, 30, 40) and back[1].path == samples[1].path
    assert back[2].error == "missing" and back[2].path is None


def test_large_jpegs_are_decoded_at_reduced_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    _big_face().save(root / "face.jpg", quality=90)
    _big_face().save(root / "face.png")
    _big_face(48).save(root / "small.jpg", quality=90)  # under 2 x 32 px: full scale
    calls: list[tuple[Any, ...]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Any, mode: Any, size: Any) -> Any:
        calls.append((self.size, mode, size))
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = read_image_folder(root)
    data.load(32, workers=1)
    assert calls == [((1024, 1024), None, (32, 32))]  # the large JPEG only, never the PNG
    calls.clear()
    data.load(32, workers=1, reduced_decode=False)
    assert calls == []
    assert decode_image(root / "face.jpg", "rgb", reduce_to=32).size == (128, 128)  # 1/8
    assert decode_image(root / "face.jpg", "rgb", reduce_to=300).size == (512, 512)  # 1/2
    assert decode_image(root / "face.png", "rgb", reduce_to=32).size == (1024, 1024)
    assert decode_image(root / "face.jpg", "rgb").size == (1024, 1024)


def test_the_draft_rule_keeps_more_pixels_for_faces() -> None:
    assert draft_side((32, 32), False) == 32 and draft_side((112, 96), False) == 112
    assert draft_side((32, 32), True) == 512 and draft_side((224, 224), True) == 896
    plan = dataset_module._load_plan(
        InputSpec(size=(112, 112), faces=FaceSpec("detect")), None, None, None, False, 0.25
    )
    assert plan.reduce_to == 512
    off = dataset_module._load_plan(None, 64, None, None, False, 0.25, reduced_decode=False)
    assert off.reduce_to is None


def test_reduced_decoding_is_close_to_full_decoding(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for seed in range(4):
        _big_face(seed=seed).save(root / f"face{seed}.jpg", quality=90)
    data = read_image_folder(root)
    reduced = data.load(32, workers=1).images.astype(np.float64)
    full = data.load(32, workers=1, reduced_decode=False).images.astype(np.float64)
    mae = float(np.abs(reduced - full).mean())
    assert 0.0 < mae <= MAX_REDUCED_MAE, mae
    assert data.load(32, workers=1).images.tobytes() == reduced.astype(np.uint8).tobytes()


def test_the_predictor_serves_what_load_decodes_for_a_large_jpeg(
    source_pkg: Path, tmp_path: Path
) -> None:
    from sourcefree.runtime.predictor import Predictor

    root = tmp_path / "data"
    root.mkdir()
    _big_face(seed=5).save(root / "face.jpg", quality=90)
    predictor = Predictor(source_pkg, device="cpu")
    loaded = read_image_folder(root).load(spec=predictor.spec, workers=1)
    assert np.array_equal(
        predictor.preprocess(root / "face.jpg"), loaded.to_float(predictor.spec)[0]
    )


def test_worker_counts_are_checked() -> None:
    assert check_workers(None) is None and check_workers(3) == 3
    for bad in (0, -2, True, 1.5, "2"):
        with pytest.raises(ConfigError, match="--workers"):
            check_workers(bad)
    assert resolve_workers(None, 10) == 1 and resolve_workers(4, 10) == 4
    assert resolve_workers(None, 5000) >= 1
    with pytest.raises(ConfigError, match="workers 0"):
        AdaptRequest("p", "d", method="tent", out="o", workers=0)
    request = AdaptRequest("p", "d", method="tent", out="o", workers=3)
    assert "--workers 3" in request.command()
    assert "--workers" not in AdaptRequest("p", "d", method="tent", out="o").command()


def test_a_chunks_result_fits_in_the_enlarged_pipe(tmp_path: Path) -> None:
    for side in (32, 64, 112, 224, 512):
        nbytes = side * side * 3
        images = chunk_size(100_000, 2, nbytes)
        assert 1 <= images <= decode.MAX_CHUNK_IMAGES
        assert images == 1 or images * nbytes <= decode.MAX_CHUNK_BYTES < decode.PIPE_BYTES
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip("no F_SETPIPE_SZ on this system")
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    read_end, write_end = os.pipe()
    try:
        grown = _grow_pipe(write_end)
        size = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert grown is (limit >= decode.PIPE_BYTES)
    assert size >= decode.PIPE_BYTES if grown else size < decode.PIPE_BYTES
    if grown:  # the pool's worker pipes, both ways
        with decode.DecodePool(DecodePlan((8, 8), "gray", "bilinear", FaceSpec()), 2) as pool:
            for proc in pool._procs:
                for pipe in (proc.stdin, proc.stdout):
                    assert pipe is not None
                    assert fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ) >= decode.PIPE_BYTES
    with (tmp_path / "plain").open("wb") as plain:  # not a pipe: no error, only False
        assert _grow_pipe(plain.fileno()) is False


@pytest.mark.parametrize("command", ["adapt", "evaluate"])
def test_cli_workers_zero_exits_2(command: str, source_pkg: Path, tmp_path: Path) -> None:
    args = [command, str(source_pkg), str(tmp_path), "--workers", "0"]
    if command == "adapt":
        args += ["-m", "tent", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "error: --workers 0." in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
