"""One preprocessing path: the runtime's input is bitwise the training input (issue 17).

The same image files on disk (odd sizes, so every resize filter runs; an RGBA, a grey,
a JPEG and one already at the input size) go through the runtime (``Predictor.preprocess``
of a real package, and the function it calls for the other interpolations), evaluation
(``load_inputs``), adaptation (the data layer's ``load`` then ``TargetData.tensor``) and
vendor training (``to_tensor`` on the same uint8 RGB pixels), for an RGB, a one-channel
grey and a three-channel grey package, with every interpolation of the manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sourcefree.data import imaging
from sourcefree.data.dataset import ImageDataset
from sourcefree.data.imaging import normalise, rgb_to_grey
from sourcefree.data.readers import read_image_folder
from sourcefree.engine.method import TargetData, pixels_to_tensor
from sourcefree.errors import InputError
from sourcefree.package.manifest import INTERPOLATIONS, InputSpec
from sourcefree.runtime.evaluation import load_inputs
from sourcefree.runtime.predictor import Predictor
from sourcefree.vendor.training import to_tensor

SIZE = (20, 24)
#: One real package per kind, each exported with another interpolation:
#: (channels, colour, mean, std, interpolation).
KINDS: dict[str, tuple[int, str, tuple[float, ...], tuple[float, ...], str]] = {
    "rgb": (3, "rgb", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic"),
    "gray1": (1, "gray", (0.5,), (0.25,), "bilinear"),
    "gray3": (3, "gray", (0.45, 0.5, 0.55), (0.2, 0.25, 0.3), "nearest"),
}
CASES = [(kind, i) for kind in KINDS for i in INTERPOLATIONS]


def _spec(kind: str) -> InputSpec:
    channels, color, mean, std, interpolation = KINDS[kind]
    return InputSpec(SIZE, channels, color, mean, std, interpolation)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five files: RGB PNG, RGBA PNG, grey PNG, JPEG (odd sizes) and one at the input size."""
    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, 37 * 23 * 3).reshape(37, 23, 3)
    noisy = np.clip(ramp + rng.normal(0, 40, ramp.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(root / "rgb.png")
    rgba = rng.integers(0, 256, (29, 41, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (19, 27), dtype=np.uint8), "L").save(root / "grey.png")
    photo = rng.integers(0, 256, (45, 31, 3), dtype=np.uint8)
    Image.fromarray(photo).save(root / "photo.jpg", quality=90)
    exact = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    Image.fromarray(exact).save(root / "exact.png")
    return root


@pytest.fixture(scope="module")
def predictors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Predictor]:
    """A runtime predictor of a real, verified package per kind."""
    from sourcefree.engine.models import build_classifier
    from sourcefree.export import source_package

    root = tmp_path_factory.mktemp("parity-pkgs")
    out: dict[str, Predictor] = {}
    for kind in KINDS:
        spec = _spec(kind)
        torch.manual_seed(0)
        model = build_classifier("smallcnn", 3, in_channels=spec.channels).eval()
        pkg = source_package(
            model, architecture="smallcnn", labels=["a", "b", "c"], input_spec=spec, out=root / kind
        )
        out[kind] = Predictor(pkg, device="cpu")
    return out


def _serve(spec: InputSpec, items: Sequence[Path | Image.Image]) -> np.ndarray:
    """The runtime's input: what ``Predictor.preprocess`` computes for a package with ``spec``."""
    return np.stack(
        [imaging.preprocess(imaging.decode_image(item, spec.color), spec) for item in items]
    )


def _files(dataset: ImageDataset, indices: np.ndarray) -> list[Path]:
    return [dataset.root / dataset.samples[int(i)].key for i in indices]


@pytest.mark.parametrize("kind", list(KINDS))
def test_predictor_serves_what_the_runtime_function_makes(
    images: Path, predictors: dict[str, Predictor], kind: str
) -> None:
    predictor = predictors[kind]
    assert predictor.spec == _spec(kind)
    files = sorted(images.iterdir())
    served = np.stack([predictor.preprocess(f) for f in files])
    assert served.shape == (5, predictor.spec.channels, *SIZE) and served.dtype == np.float32
    assert np.array_equal(served, _serve(predictor.spec, files))
    pil = [Image.open(f) for f in files]
    assert np.array_equal(np.stack([predictor.preprocess(p) for p in pil]), served)


@pytest.mark.parametrize(("kind", "interpolation"), CASES)
def test_runtime_evaluation_and_training_inputs_are_bitwise_equal(
    images: Path, predictors: dict[str, Predictor], kind: str, interpolation: str
) -> None:
    spec = dataclasses.replace(predictors[kind].spec, interpolation=interpolation)
    dataset = read_image_folder(images)
    loaded = dataset.load(spec.size, spec.color, interpolation=spec.interpolation)
    assert loaded.report.ok == 5
    served = _serve(spec, _files(dataset, loaded.indices))
    trained = TargetData(loaded.images, spec, "parity").tensor().numpy()
    evaluated, _ = load_inputs(dataset, spec)
    assert np.array_equal(served, trained)
    assert np.array_equal(served, evaluated)


@pytest.mark.parametrize(("kind", "interpolation"), CASES)
def test_vendor_training_input_is_the_runtime_input(
    images: Path, predictors: dict[str, Predictor], kind: str, interpolation: str
) -> None:
    """Vendor training starts from uint8 RGB arrays; grey specs convert them like Pillow."""
    spec = dataclasses.replace(predictors[kind].spec, interpolation=interpolation)
    pixels = read_image_folder(images).load(spec.size, "rgb", interpolation=interpolation).images
    served = _serve(spec, [Image.fromarray(p) for p in pixels])
    assert np.array_equal(to_tensor(pixels, spec).numpy(), served)
    in_colour = pixels if spec.color == "rgb" else rgb_to_grey(pixels)
    assert np.array_equal(TargetData(in_colour, spec, "parity").tensor().numpy(), served)


def test_rgb_to_grey_is_pillows_l_for_every_colour() -> None:
    every = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([every >> 16, (every >> 8) & 255, every & 255], axis=-1).astype(np.uint8)
    rgb = rgb.reshape(4096, 4096, 3)
    pillow = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(rgb_to_grey(rgb)[..., 0], pillow)


@pytest.mark.parametrize("kind", list(KINDS))
def test_normalise_is_the_documented_float32_formula(kind: str) -> None:
    """``(p / 255 - mean) / std`` in float32, in that order, for every pixel value."""
    spec = _spec(kind)
    values = np.arange(256, dtype=np.uint8)
    pixels = np.repeat(values[:, None, None], 3 if spec.color == "rgb" else 1, axis=2)
    got = normalise(pixels, spec)
    unit = values.astype(np.float32) / np.float32(255)
    for c in range(spec.channels):
        m, s = np.float32(spec.mean[c]), np.float32(spec.std[c])
        assert np.array_equal(got[c, :, 0], (unit - m) / s)


def test_torch_wrapper_keeps_the_index_and_layout() -> None:
    rng = np.random.default_rng(1)
    spec = InputSpec(size=(5, 7), mean=(0.4, 0.5, 0.6), std=(0.3, 0.2, 0.1))
    data = TargetData(rng.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8), spec, "x")
    pick = np.array([4, 1])
    x = data.tensor(torch.from_numpy(pick), memory_format=torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(x.numpy(), normalise(data.images[pick], spec))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_input_is_bitwise_the_cpu_input() -> None:
    rng = np.random.default_rng(2)
    spec = InputSpec(size=(8, 8), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    data = TargetData(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), spec, "x")
    on_gpu = data.tensor(device=torch.device("cuda")).cpu().numpy()
    assert np.array_equal(on_gpu, normalise(data.images, spec))


def test_pixels_that_do_not_match_the_spec_are_refused() -> None:
    rgb = InputSpec(size=(2, 2))
    grey = InputSpec(size=(2, 2), channels=1, color="gray", mean=(0.5,), std=(0.5,))
    three = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="cannot be normalised"):
        normalise(three.astype(np.float32), rgb)
    with pytest.raises(InputError, match=r"The input spec \(gray\) takes uint8"):
        normalise(three, grey)
    with pytest.raises(InputError, match=r"The input spec \(rgb\) takes uint8"):
        pixels_to_tensor(torch.zeros(1, 2, 2, 1, dtype=torch.uint8), rgb)
    with pytest.raises(InputError, match="are not RGB"):
        rgb_to_grey(np.zeros((2, 2, 1), dtype=np.uint8))
    with pytest.raises(InputError, match="cannot be normalised"):
        to_tensor(three.astype(np.float64), rgb)
