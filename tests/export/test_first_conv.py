"""Grey and colour export: input channels come from the declared first convolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from sourcefree import load_package
from sourcefree.cli.app import main
from sourcefree.engine.models import first_conv_channels, get_architecture
from sourcefree.errors import PackageError
from sourcefree.package.manifest import ARCHITECTURE_NAMES

CASES = [(n, c) for n in ARCHITECTURE_NAMES for c in get_architecture(n).channels]


def _vendor_state(name: str, channels: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(get_architecture(name).build(3, channels).state_dict())


def _export(weights: Path, arch: str, out: Path, *extra: str) -> tuple[int, str]:
    args = ["export", "--arch", arch, "--weights", str(weights), "--labels", "a,b,c"]
    args += ["--input-size", "32", "--out", str(out), *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize(("name", "channels"), CASES)
def test_declared_first_conv_is_the_network_first_convolution(name: str, channels: int) -> None:
    arch = get_architecture(name)
    vendor = arch.build(3, channels)
    first = next(k for k, m in vendor.named_modules() if isinstance(m, nn.Conv2d))
    assert arch.first_conv == f"{first}.weight"
    state = dict(vendor.state_dict())
    assert first_conv_channels(name, state) == channels
    assert first_conv_channels(arch, dict(reversed(state.items()))) == channels


def test_lookup_ignores_a_dict_whose_first_4d_tensor_is_another_layer() -> None:
    state = _vendor_state("smallcnn", 1)
    moved = {"features.10.weight": state.pop("features.10.weight"), **state}
    assert next(k for k, t in moved.items() if t.ndim == 4) == "features.10.weight"
    assert first_conv_channels("smallcnn", moved) == 1


def test_grey_smallcnn_exports_when_the_file_sorts_another_conv_first(tmp_path: Path) -> None:
    state = _vendor_state("smallcnn", 1)
    state["features.0.weight"] = state["features.0.weight"].half()  # sorted after fp32 tensors
    weights = tmp_path / "W.safetensors"
    save_file(state, str(weights))
    loaded = load_file(str(weights))
    assert next(k for k, t in loaded.items() if t.ndim == 4) != "features.0.weight"
    code, text = _export(weights, "smallcnn", tmp_path / "pkg", "--grayscale")
    assert code == 0, text
    spec = load_package(tmp_path / "pkg").manifest.input
    assert (spec.channels, spec.color, spec.mean) == (1, "gray", (0.5,))


@pytest.mark.parametrize(
    ("name", "channels", "grey", "expected"),
    [
        ("smallcnn", 1, True, (1, "gray")),
        ("smallcnn", 3, True, (3, "gray")),
        ("smallcnn", 3, False, (3, "rgb")),
        ("mobilenet_v3_small", 3, True, (3, "gray")),
        ("resnet18", 3, False, (3, "rgb")),
    ],
)
def test_export_sets_manifest_channels(
    tmp_path: Path, name: str, channels: int, grey: bool, expected: tuple[int, str]
) -> None:
    weights = tmp_path / "W.safetensors"
    save_file(_vendor_state(name, channels), str(weights))
    code, text = _export(weights, name, tmp_path / "pkg", *(["--grayscale"] if grey else []))
    assert code == 0, text
    spec = load_package(tmp_path / "pkg").manifest.input
    assert (spec.channels, spec.color) == expected


def test_one_channel_weights_without_grayscale_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / "W.safetensors"
    save_file(_vendor_state("smallcnn", 1), str(weights))
    code, text = _export(weights, "smallcnn", tmp_path / "pkg")
    assert code == 2 and "takes 1 channel" in text and "--grayscale" in text
    assert "Traceback" not in text
    assert not (tmp_path / "pkg").exists()


def test_first_conv_errors_are_typed() -> None:
    state = _vendor_state("smallcnn", 3)
    with pytest.raises(PackageError, match="does not match the architecture resnet18"):
        first_conv_channels("resnet18", state)
    state["features.0.weight"] = torch.zeros(32, 3)
    with pytest.raises(PackageError, match=r"'features.0.weight' has shape \[32, 3\]"):
        first_conv_channels("smallcnn", state)
    rn = _vendor_state("resnet18", 3)
    rn["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(
        PackageError, match="'conv1.weight' takes 1 input channels.*replicated to RGB"
    ):
        first_conv_channels("resnet18", rn)
    state["features.0.weight"] = torch.zeros(32, 2, 3, 3)
    with pytest.raises(
        PackageError, match="takes 2 input channels.*1 or 3-channel input.*one of those"
    ):
        first_conv_channels("smallcnn", state)
