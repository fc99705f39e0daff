"""Architecture registry: backbone/head split, feature dimension, vendor state dicts."""

from __future__ import annotations

import pytest
import torch

from sourcefree.engine.models import (
    ARCHITECTURES,
    build_classifier,
    feature_map_split,
    from_vendor_state,
    get_architecture,
)
from sourcefree.errors import PackageError
from sourcefree.package.manifest import ARCHITECTURE_NAMES


def test_torch_free_name_list_matches_registry() -> None:
    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_each_architecture_declares_its_split(name: str) -> None:
    arch = get_architecture(name)
    model = build_classifier(name, 5).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5)
    assert feats.shape == (2, arch.feature_dim)
    assert set(k.split(".")[0] for k in model.state_dict()) == {"backbone", "head"}


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_feature_map_split_recomposes_the_backbone(name: str) -> None:
    model = build_classifier(name, 5).eval()
    trunk, neck = feature_map_split(model.backbone, name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = trunk(x)
        assert fmap.ndim == 4
        assert torch.allclose(neck(fmap.mean(dim=(2, 3))), model.backbone(x), atol=1e-5)
    owned = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in owned for p in [*trunk.parameters(), *neck.parameters()])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "smallcnn"])
def test_vendor_state_dict_round_trip(name: str) -> None:
    arch = get_architecture(name)
    torch.manual_seed(0)
    vendor = arch.build(4, 3).eval()
    model = from_vendor_state(name, vendor.state_dict(), 4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], vendor(x))


def test_unknown_architecture_suggests() -> None:
    with pytest.raises(
        PackageError, match="unknown architecture 'resnet19'.*did you mean 'resnet18'"
    ):
        get_architecture("resnet19")


def test_wrong_class_count_in_vendor_weights() -> None:
    vendor = get_architecture("smallcnn").build(7, 3)
    with pytest.raises(
        PackageError, match="'fc.weight' has shape \\[7, 128\\], expected \\[3, 128\\]"
    ):
        from_vendor_state("smallcnn", vendor.state_dict(), 3)


def test_weights_of_another_architecture() -> None:
    vendor = get_architecture("smallcnn").build(3, 3)
    with pytest.raises(PackageError, match="does not match the architecture"):
        from_vendor_state("resnet18", vendor.state_dict(), 3)


def test_grey_input_only_for_smallcnn() -> None:
    assert build_classifier("smallcnn", 3, in_channels=1)(torch.randn(1, 1, 32, 32))[0].shape == (
        1,
        3,
    )
    with pytest.raises(PackageError, match="resnet18 takes 3-channel input"):
        build_classifier("resnet18", 3, in_channels=1)
