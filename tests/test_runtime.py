"""The runtime: predictions match torch, bad inputs are refused, no torch, no telemetry."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sourcefree.data.imaging import ImageDecodeError
from sourcefree.errors import DeviceError, InputError
from sourcefree.runtime.predictor import Predictor


def test_export_verify_sign_predict_matches_torch(pkg_copy: Path, tmp_path: Path) -> None:
    """The issue's end-to-end case: export, verify, sign, predict, compare with torch."""
    import torch

    from sourcefree import load_package
    from sourcefree.engine.models import load_classifier
    from sourcefree.package.loader import sign_package
    from sourcefree.package.signing import keygen

    priv, pub = keygen(tmp_path / "k")
    sign_package(pkg_copy, priv)
    pkg = load_package(pkg_copy, public_key=pub, require_signature=True)
    predictor = Predictor(pkg, device="cpu")
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    pred = predictor.predict_array(x, features=True)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    with torch.no_grad():
        logits, feats = model(torch.from_numpy(x))
    ref = torch.softmax(logits, dim=1).numpy()
    assert np.abs(pred.probabilities - ref).max() < 1e-4
    assert pred.features is not None
    assert np.abs(pred.features - feats.numpy()).max() < 1e-4
    # The logits themselves, through the ONNX session directly:
    out = predictor.session.run(["logits"], {"input": x})[0]
    assert np.abs(out - logits.numpy()).max() <= 1e-4
    assert pred.labels == [pkg.manifest.labels[i] for i in logits.argmax(1).tolist()]


def test_predict_images_and_pil(source_pkg: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    path = tmp_path / "face.png"
    img.save(path)
    predictor = Predictor(source_pkg, device="cpu", batch_size=2)
    by_path = predictor.predict([path, path, path])
    by_pil = predictor.predict(img)
    assert len(by_path.labels) == 3
    np.testing.assert_allclose(by_path.probabilities[0], by_pil.probabilities[0], atol=1e-6)
    assert predictor.device == "cpu"


def test_predict_paths_skips_unreadable(source_pkg: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (120, 80, 60)).save(good)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    done, failed = Predictor(source_pkg, device="cpu").predict_paths([good, text, empty])
    assert [p for p, _, _ in done] == [good]
    assert {p for p, _ in failed} == {text, empty}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"hello, I am text", "not a supported image"),
    ],
)
def test_predict_refuses_bad_files(
    source_pkg: Path, tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=match):
        Predictor(source_pkg, device="cpu").predict([path])


def test_predict_refuses_decompression_bomb(source_pkg: Path, tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 MP, a few KB on disk
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageDecodeError, match="decompression bomb|too large"):
        Predictor(source_pkg, device="cpu").predict([path])


def test_predict_refuses_truncated_jpeg(source_pkg: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        Predictor(source_pkg, device="cpu").predict([path])


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 3, 31, 32), np.float32), r"input shape is \(2, 3, 31, 32\)"),
        (np.zeros((3, 32, 32), np.float32), r"input shape is \(3, 32, 32\)"),
        (np.zeros((0, 3, 32, 32), np.float32), r"N >= 1"),
        (np.zeros((2, 3, 32, 32), np.float64), "input dtype is float64"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN or Inf"),
    ],
)
def test_predict_array_refuses_bad_arrays(source_pkg: Path, array: np.ndarray, match: str) -> None:
    with pytest.raises(InputError, match=match):
        Predictor(source_pkg, device="cpu").predict_array(array)


def test_input_error_is_a_value_error() -> None:
    assert issubclass(InputError, ValueError)


def test_explicit_cuda_without_gpu_is_an_error(source_pkg: Path) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    with pytest.raises(DeviceError, match="'cuda' was requested"):
        Predictor(source_pkg, device="cuda")


def test_unknown_device_is_an_error(source_pkg: Path) -> None:
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        Predictor(source_pkg, device="tpu")


def _run_isolated(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_runtime_never_imports_torch(source_pkg: Path) -> None:
    code = f"""
        import sys
        import sourcefree, sourcefree.runtime.predictor
        assert "torch" not in sys.modules, "import sourcefree pulled in torch"
        import numpy as np
        p = sourcefree.runtime.predictor.Predictor({str(source_pkg)!r}, device="cpu")
        p.predict_array(np.zeros((2, 3, 32, 32), np.float32))
        assert "torch" not in sys.modules, "a prediction pulled in torch"
        print("ok")
    """
    assert _run_isolated(code, dict(os.environ)).strip() == "ok"


def test_prediction_leaves_no_telemetry_files(source_pkg: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["HOME"] = str(home)
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    code = f"""
        import os
        import numpy as np
        from sourcefree.runtime.predictor import Predictor
        assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
        p = Predictor({str(source_pkg)!r}, device="cpu")
        p.predict_array(np.zeros((1, 3, 32, 32), np.float32))
        print("ok")
    """
    assert _run_isolated(code, env).strip() == "ok"
    assert not (home / ".cache" / "Microsoft").exists()
    assert list(home.rglob("*onnxruntime*")) == []


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_network_is_blocked_in_tests() -> None:
    import socket

    with pytest.raises(Exception, match="(?i)socket"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", 9))
