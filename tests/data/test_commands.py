"""The `sourcefree synth` command, and the torch-free import promise of sourcefree.data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sourcefree.cli.commands_data import synth
from sourcefree.errors import ConfigError, DatasetError


def test_synth_writes_a_domain(tmp_path: Path) -> None:
    out = tmp_path / "wild"
    result = CliRunner().invoke(
        synth, [str(out), "--domain", "wild-mild", "--n", "5", "--size", "32", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 5 images of domain 'wild-mild'" in result.output
    assert len(list(out.glob("*.png"))) == 5
    assert (out / "labels.csv").read_text().startswith("path,label\n")
    assert (out / "aus.csv").exists()


def test_synth_refuses_a_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    result = CliRunner().invoke(synth, [str(tmp_path), "--n", "2"])
    assert isinstance(result.exception, DatasetError)
    assert "is not empty" in str(result.exception)
    assert "--overwrite" in str(result.exception)


def test_synth_overwrites_its_own_output(tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert CliRunner().invoke(synth, [str(out), "--n", "3"]).exit_code == 0
    again = CliRunner().invoke(synth, [str(out), "--n", "2", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert len(list(out.glob("*.png"))) == 2


def test_synth_unknown_domain_suggests(tmp_path: Path) -> None:
    result = CliRunner().invoke(synth, [str(tmp_path / "o"), "--domain", "studo"])
    assert isinstance(result.exception, ConfigError)
    assert "did you mean 'studio'?" in str(result.exception).lower()
    assert not (tmp_path / "o").exists()


def test_synth_rejects_bad_numbers(tmp_path: Path) -> None:
    result = CliRunner().invoke(synth, [str(tmp_path / "o"), "--n", "0"])
    assert isinstance(result.exception, ConfigError)
    assert "cannot write a domain of n=0 images" in str(result.exception)
    result = CliRunner().invoke(synth, [str(tmp_path / "o"), "--size", "4000"])
    assert "cannot generate images of size 4000" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_synth_help_lists_domains() -> None:
    result = CliRunner().invoke(synth, ["--help"])
    assert result.exit_code == 0
    for name in ("studio", "wild-mild", "nir", "fer-like", "prior-shift"):
        assert name in result.output


def test_main_cli_turns_errors_into_exit_code_2(tmp_path: Path) -> None:
    cli = pytest.importorskip("sourcefree.cli.app")
    result = CliRunner().invoke(cli.main, ["synth", str(tmp_path / "o"), "--domain", "nope"])
    assert result.exit_code == 2
    assert "unknown synthetic domain 'nope'" in result.output


def test_data_imports_no_torch() -> None:
    code = (
        "import sys, sourcefree.data, sourcefree.cli.commands_data, sourcefree.data.synthetic, "
        "sourcefree.data.faces; "
        "bad = [m for m in ('torch', 'cv2') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
