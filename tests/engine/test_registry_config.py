"""Method registry and config loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from sourcefree.engine import config as cfgmod
from sourcefree.engine.method import Method
from sourcefree.engine.registry import get_method, list_methods, register_method, unregister_method
from sourcefree.errors import ConfigError


@dataclass(frozen=True)
class SSL:
    """Nested section."""

    init: Literal["source", "scratch"] = "source"
    """Backbone initialisation."""
    temperature: float = 0.1
    """Softmax temperature."""


@dataclass(frozen=True)
class Demo:
    """A config with every supported field type."""

    lr: float = 0.01
    """Learning rate."""
    epochs: int = 2
    """Epochs."""
    amp: bool = True
    """Mixed precision."""
    name: str = "x"
    """A name."""
    crops: tuple[int, ...] = (32, 16)
    """Crop sizes."""
    ssl: SSL = field(default_factory=SSL)
    """Warm-up settings."""


def test_unknown_method_suggests_and_lists() -> None:
    with pytest.raises(ConfigError) as err:
        get_method("tnet")
    text = str(err.value)
    assert text.startswith("Unknown method 'tnet'. Did you mean 'tent'? Available: ")
    assert "adabn" in text


def test_duplicate_registration_raises() -> None:
    class Dup(Method):
        description = "a throw-away method"
        config_class = Demo

    register_method("dup-test")(Dup)
    try:
        assert "dup-test" in list_methods()
        with pytest.raises(ConfigError, match="registered twice"):
            register_method("dup-test")(Dup)
    finally:
        unregister_method("dup-test")


def test_description_required() -> None:
    class NoDesc(Method):
        config_class = Demo

    with pytest.raises(ConfigError, match="one-line description"):
        register_method("nodesc-test")(NoDesc)


def test_overrides_are_typed_and_dotted() -> None:
    cfg = cfgmod.load_config(
        Demo,
        overrides=[
            "lr=1e-3",
            "epochs=5",
            "amp=false",
            "crops=24,12",
            "ssl.init=scratch",
            "ssl.temperature=0.05",
        ],
    )
    assert cfg == Demo(lr=1e-3, epochs=5, amp=False, crops=(24, 12), ssl=SSL("scratch", 0.05))
    assert cfgmod.from_dict(Demo, cfgmod.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lrr=1", "unknown config key 'lrr'. Did you mean 'lr'"),
        ("ssl.inti=source", "unknown config key 'ssl.inti'. Did you mean 'init'"),
        ("epochs=two", "config key 'epochs' is 'two'.*Expected an integer"),
        ("ssl.init=imagenet", "Choose one of 'source', 'scratch'"),
        ("lr=nan", "Expected a finite number"),
        ("ssl=1", "is a section"),
        ("lr", "is not key=value"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfgmod.load_config(Demo, overrides=[override])


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nssl:\n  init: scratch\n")
    cfg = cfgmod.load_config(Demo, file=path, overrides=["lr=0.25"])
    assert cfg.lr == 0.25 and cfg.ssl.init == "scratch" and cfg.ssl.temperature == 0.1
    assert cfgmod.load_config(Demo, file=_write(tmp_path, cfgmod.to_yaml(cfg))) == cfg


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "round.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: [1, 2]\n", "Expected a number"),
        ("ssl:\n  intt: source\n", "Did you mean 'init'"),
        ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
        ("- 1\n- 2\n", "does not hold a mapping"),
    ],
)
def test_bad_yaml(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        cfgmod.load_config(Demo, file=path)


def test_describe_and_diff() -> None:
    rows = {k: (d, h) for k, d, h in cfgmod.describe(Demo)}
    assert rows["ssl.init"] == ("source", "Backbone initialisation.")
    assert rows["crops"][0] == "32,16"
    old = cfgmod.to_dict(Demo())
    new = cfgmod.to_dict(Demo(lr=0.5))
    assert cfgmod.diff(old, new) == ["lr: 0.01 -> 0.5"]


def test_describe_shows_the_parents_nested_defaults() -> None:
    @dataclass(frozen=True)
    class Outer:
        ssl: SSL = field(default_factory=lambda: SSL(init="scratch"))
        """SSL section with a changed default."""

    rows = {k: d for k, d, _ in cfgmod.describe(Outer)}
    assert rows["ssl.init"] == "scratch"


def test_architecture_families_are_registered_only_by_load_builtin_methods() -> None:
    """The engine never loads the adapters layer itself: one explicit call does."""
    import subprocess
    import sys
    import textwrap

    code = """
        import sys
        from sourcefree.errors import PackageError
        from sourcefree.engine import models, registry
        try:
            models._family("la-cmfer.smallcnn")
        except PackageError as exc:
            print("refused:", "load_builtin_methods" in exc.fix)
        print("adapters loaded:", "sourcefree.adapters" in sys.modules)
        registry.load_builtin_methods()
        print("family:", models._family("la-cmfer.smallcnn") is not None)
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split("\n")
    assert out[:3] == ["refused: True", "adapters loaded: False", "family: True"]
