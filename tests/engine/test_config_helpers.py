"""engine.config's shared helpers: the dotted setter (``--set`` and ``--select auto``
grid entries) and the "did you mean" hint (unknown config keys and methods)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from sourcefree.engine import config as cfgmod
from sourcefree.engine.registry import get_method
from sourcefree.errors import ConfigError
from sourcefree.pipeline.selection import apply_overrides


@dataclass(frozen=True)
class Inner:
    """Nested section."""

    temperature: float = 0.1
    """Softmax temperature."""


@dataclass(frozen=True)
class Outer:
    """A config with a nested section and a tuple."""

    lr: float = 0.01
    """Learning rate."""
    crops: tuple[int, ...] = (32, 16)
    """Crop sizes."""
    ssl: Inner = field(default_factory=Inner)
    """Warm-up settings."""


def test_set_dotted_creates_and_replaces_levels() -> None:
    data: dict[str, Any] = {"a": {"b": 1}, "c": 5}
    cfgmod.set_dotted(data, "a.b", 2)
    cfgmod.set_dotted(data, "x.y.z", 3)
    cfgmod.set_dotted(data, "c.d", 4)  # a leaf in the way becomes a section
    assert data == {"a": {"b": 2}, "x": {"y": {"z": 3}}, "c": {"d": 4}}


def test_set_and_grid_overrides_share_the_setter() -> None:
    by_set = cfgmod.load_config(Outer, overrides=["ssl.temperature=0.5", "crops=8,4"])
    by_grid = apply_overrides(
        Outer, cfgmod.to_dict(Outer()), {"ssl.temperature": 0.5, "crops": (8, 4)}
    )
    assert by_set == by_grid == Outer(crops=(8, 4), ssl=Inner(temperature=0.5))


def test_did_you_mean() -> None:
    assert cfgmod.did_you_mean("lrr", ["lr", "crops"]) == "did you mean 'lr'? "
    assert cfgmod.did_you_mean("zzz", ["lr", "crops"]) == ""
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr'\. Did you mean 'lr'\?"):
        cfgmod.load_config(Outer, overrides=["lrr=1"])
    with pytest.raises(ConfigError, match=r"Unknown method 'tnet'\. Did you mean 'tent'\?"):
        get_method("tnet")
