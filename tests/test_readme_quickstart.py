"""The README's Quickstart, run as written: the vendor makes fer.safetensors with the
three-line snippet, then exports, keygens, signs and verifies with the commands shown
(issue 21: the first command needed a weights file the README never said how to make).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sourcefree.cli.app import main

ROOT = Path(__file__).resolve().parents[1]


def _quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]


def _commands(block: str) -> list[list[str]]:
    """The shell lines of a code block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split("  #", 1)[0].strip() for line in joined.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("sourcefree ")]


def test_quickstart_vendor_steps_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fenced = re.findall(r"^```(\w*)\n(.*?)^```", _quickstart(), re.MULTILINE | re.DOTALL)
    python = next(body for lang, body in fenced if lang == "python")
    assert "save_file" in python, "the weights snippet"
    shell = [_commands(body) for lang, body in fenced if not lang]
    vendor, customer = shell[0], shell[1]
    assert [c[1] for c in vendor] == ["export", "keygen", "sign"]
    assert [c[1] for c in customer] == ["verify", "inspect"]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(python, "README.md", "exec"), namespace)  # writes fer.safetensors
    assert (tmp_path / "fer.safetensors").is_file()
    runner = CliRunner()
    for command in [*vendor, *customer]:
        result = runner.invoke(main, command[1:])
        assert result.exit_code == 0, (command, result.output)
    assert "signature valid" in runner.invoke(main, customer[0][1:]).output
