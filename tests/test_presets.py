"""``adapt --preset``: every method's paper preset, its layering, refusals, report, docs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sourcefree.cli.commands_adapt import adapt_command, methods_command
from sourcefree.engine import config as cfgmod
from sourcefree.engine.presets import (
    CPU,
    PAPER,
    PAPER_PRESETS,
    PRESET_NAMES,
    method_presets,
    preset_layer,
    preset_values,
)
from sourcefree.engine.registry import get_method, list_methods
from sourcefree.errors import ConfigError
from sourcefree.pipeline.request import AdaptRequest

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = {"adabn", "tent", "shot", "shot-im", "clup", "difc", "la-cmfer", "adafer", "pocan"}


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def _setting(value: Any) -> str:
    """A value as ``--set`` and the docs write it."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


@pytest.mark.parametrize("method", sorted(BUILTIN))
def test_every_method_has_a_paper_preset_that_builds_its_config(method: str) -> None:
    assert set(list_methods()) >= BUILTIN
    cls = get_method(method).config_class
    values = preset_values(method, PAPER)
    layer = preset_layer(method, PAPER)
    built = cfgmod.to_dict(cfgmod.load_config(cls, preset=layer))  # a valid config
    keys = {key for key, _, _ in cfgmod.describe(cls)}
    for item in values:
        assert item.key in keys, f"{method}: no config key {item.key!r}"
        want = list(item.value) if isinstance(item.value, tuple) else item.value
        assert _get(built, item.key) == want, item.key
        assert item.source.strip(), f"{method} {item.key}: no source"
    assert len({v.key for v in values}) == len(values), "a key set twice"
    assert preset_values(method, CPU) == () and preset_layer(method, CPU) == {}


def test_the_key_check_can_fail() -> None:
    """A preset key that the config class lacks, or a bad value, is refused, naming the key."""
    with pytest.raises(ConfigError, match="unknown config key 'ssl.epoch'"):
        cfgmod.load_config(get_method("clup").config_class, preset={"ssl": {"epoch": 1}})
    with pytest.raises(ConfigError, match="ssl.prototypes"):
        cfgmod.load_config(get_method("clup").config_class, preset={"ssl": {"prototypes": -1}})
    with pytest.raises(ConfigError, match="finetune"):
        cfgmod.load_config(get_method("shot").config_class, preset={"finetune": {"lr": 0.1}})


def test_unknown_presets_and_methods_without_one() -> None:
    with pytest.raises(ConfigError, match="(?i)did you mean 'paper'"):
        preset_values("shot", "papr")
    with pytest.raises(ConfigError, match="has no 'paper' preset"):
        preset_values("someone-elses-method", PAPER)
    assert preset_values("someone-elses-method", CPU) == ()
    assert set(PAPER_PRESETS) == BUILTIN and PRESET_NAMES == ("cpu", "paper")


def test_preset_under_config_under_set(tmp_path: Path) -> None:
    cls = get_method("shot").config_class
    yaml_file = tmp_path / "over.yaml"
    yaml_file.write_text("epochs: 7\noptim:\n  lr: 0.05\n", encoding="utf-8")
    cfg = cfgmod.load_config(
        cls, file=yaml_file, overrides=["epochs=3"], preset=preset_layer("shot", PAPER)
    )
    assert cfg.epochs == 3  # --set over the file over the preset (15)
    assert cfg.optim.lr == 0.05  # the file over the preset (0.01)
    assert cfg.optim.backbone_lr_scale == 0.1  # the preset over the default (1.0)
    assert cfgmod.load_config(cls, preset=preset_layer("shot", CPU)) == cls()


def test_request_refuses_what_a_preset_cannot_do() -> None:
    def request(**kwargs: Any) -> AdaptRequest:
        return AdaptRequest("pkg", "data", **{"method": "shot", "out": "out", **kwargs})

    with pytest.raises(ConfigError, match=r"(?i)--preset 'papr' is not known.*mean 'paper'"):
        request(preset="papr")
    with pytest.raises(ConfigError, match="--select auto with --preset paper"):
        request(preset=PAPER, select="auto")
    with pytest.raises(ConfigError, match="-m auto with --preset paper"):
        request(method="auto", preset=PAPER)
    words = shlex.split(request(preset=PAPER).command(resume=True))
    assert adapt_command.make_context("adapt", words[2:]).params["preset"] == PAPER
    assert "--preset" not in request().command()
    assert request(preset=CPU).preset == "cpu"


@pytest.mark.parametrize(
    "extra",
    [["--preset", "gpu"], ["--preset", "paper", "--select", "auto"]],
    ids=["unknown", "select-auto"],
)
def test_cli_refusal_exits_2_and_writes_nothing(
    source_pkg: Path, tmp_path: Path, extra: list[str]
) -> None:
    data = tmp_path / "faces"
    data.mkdir()
    out = tmp_path / "out"
    args = [str(source_pkg), str(data), "-m", "shot", "-o", str(out), *extra]
    result = CliRunner().invoke(adapt_command, args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert "preset" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"], "nothing written"


def test_methods_lists_the_presets() -> None:
    rows = json.loads(CliRunner().invoke(methods_command, ["--json"]).output)
    by_name = {r["name"]: r for r in rows}
    for name in BUILTIN:
        presets = by_name[name]["presets"]
        assert presets == method_presets(name) and list(presets) == ["cpu", "paper"]
        assert presets["cpu"] == []
        assert [p["key"] for p in presets["paper"]] == [v.key for v in PAPER_PRESETS[name]]
    first = by_name["clup"]["presets"]["paper"][0]
    assert (first["key"], first["value"]) == ("ssl.epochs", 1000) and "Sec. 4" in first["source"]
    text = CliRunner().invoke(methods_command, []).output
    assert "    --preset paper: epochs=15 batch_size=64" in text  # shot
    assert "--preset paper: (the defaults" in text  # adabn: no schedule to set


def _docs_rows() -> set[tuple[str, str, str, str]]:
    """(method, key, paper value, CPU default) of docs/methods.md's "Paper presets" table."""
    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    section = text.split("\n## Paper presets", 1)[1]
    table = section.split("\n| method | key | paper value |", 1)[1].split("\n\n", 1)[0]
    rows = set()
    for line in table.splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        rows.add((cells[0], cells[1], cells[2], cells[3]))
    return rows


def test_docs_table_is_the_presets() -> None:
    want = set()
    for method, values in PAPER_PRESETS.items():
        defaults = {k: d for k, d, _ in cfgmod.describe(get_method(method).config_class)}
        for v in values:
            want.add((method, v.key, _setting(v.value), defaults[v.key]))
    assert _docs_rows() == want
    assert re.search(r"## Paper presets\n\n\*2026-12-05", (ROOT / "docs/methods.md").read_text())


def test_tiny_adapt_with_the_paper_preset_records_it(source_pkg: Path, tmp_path: Path) -> None:
    """SHOT, --preset paper under --config and --set, one epoch on 16 images."""
    from sourcefree.data.synthetic import write_domain

    data = write_domain(tmp_path / "wild", "wild-mild", 16, 32, seed=3)
    yaml_file = tmp_path / "over.yaml"
    yaml_file.write_text("epochs: 2\nbatch_size: 8\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [str(source_pkg), str(data), "-m", "shot", "-o", str(out), "--preset", "paper"]
    args += ["--config", str(yaml_file), "--set", "epochs=1", "--device", "cpu"]
    args += ["--no-gate", "--no-progress", "--no-plan-probe", "--workers", "1"]
    result = CliRunner().invoke(adapt_command, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["preset"] == "paper"
    config = report["config"]
    assert config["epochs"] == 1 and config["batch_size"] == 8  # --set, then --config
    assert config["optim"]["backbone_lr_scale"] == 0.1  # the preset (default 1.0)
