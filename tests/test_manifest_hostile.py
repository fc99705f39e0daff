"""Hostile manifests: labels that are markup, extra listed files, oversized inputs."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from sourcefree import PackageError, load_package
from sourcefree.cli.app import main
from sourcefree.errors import ConfigError
from sourcefree.package.manifest import (
    MAX_INPUT_ELEMENTS,
    InputSpec,
    Manifest,
    check_batch_bytes,
)


@pytest.fixture(scope="module")
def base(source_pkg: Path) -> dict[str, Any]:
    """The manifest of the session's source package, as a dict."""
    data: dict[str, Any] = json.loads((source_pkg / "manifest.json").read_text())
    return data


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


def _labels(base: dict[str, Any], label: str) -> dict[str, Any]:
    return _with(base, labels=[*base["labels"][:2], label])


BAD_LABELS = [
    "a\u202eb",  # right-to-left override
    "a\u202ab",  # left-to-right embedding
    "a\u2066b",  # left-to-right isolate
    "a\u2069b",  # pop directional isolate
    "a\u200bb",  # zero-width space
    "a\u200db",  # zero-width joiner
    "\ufeffhappy",  # byte-order mark
    "a\u2060b",  # word joiner
    "a\u2028b",  # line separator
    "a\u2029b",  # paragraph separator
    "a\x1b[31mb",  # ANSI escape
    "a\x85b",  # C1 control (NEL)
    "a\ue000b",  # private use
    "a\ud800b",  # lone surrogate
    "a\u0378b",  # unassigned
    "happy\n",  # trailing newline ("$" matched before it)
    " happy",
    "happy ",
    "happy\u3000",  # ideographic space at the end
    "a/b",
    "a\\b",
    "",
    "x" * 65,
]


@pytest.mark.parametrize("label", BAD_LABELS, ids=[ascii(v)[:24] for v in BAD_LABELS])
def test_hostile_label_is_refused_and_named(base: dict[str, Any], label: str) -> None:
    with pytest.raises(PackageError) as info:
        Manifest.from_dict(_labels(base, label))
    text = str(info.value)
    assert "labels[2]" in text
    assert repr(label[:40]) in text
    invisible = [c for c in label if not c.isprintable()]
    assert not any(c in text for c in invisible)  # quoted escaped, never raw


@pytest.mark.parametrize("label", ["happy", "Überraschung", "angry face", "中性", "=cmd|x"])
def test_normal_label_is_accepted(base: dict[str, Any], label: str) -> None:
    assert Manifest.from_dict(_labels(base, label)).labels[2] == label


def test_long_hostile_label_is_quoted_short(base: dict[str, Any]) -> None:
    with pytest.raises(PackageError) as info:
        Manifest.from_dict(_labels(base, "\u202e" + "x" * 100_000))
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize("field", ["name", "version"])
def test_trailing_newline_in_name_is_refused(base: dict[str, Any], field: str) -> None:
    with pytest.raises(PackageError, match=f"'{field}'"):
        Manifest.from_dict(_with(base, **{field: base[field] + "\n"}))


def _au(base: dict[str, Any], au_names: list[str], listed: bool = True) -> dict[str, Any]:
    out = _with(base)
    out["auxiliary"] = {
        "au_detector": {
            "file": "au_detector.onnx",
            "input": "input",
            "output": "au_probabilities",
            "au_names": au_names,
            "threshold": 0.5,
        }
    }
    if listed:
        out["files"]["au_detector.onnx"] = {"size": 1, "sha256": "0" * 64}
    return out


def test_au_name_with_trailing_newline_is_refused(base: dict[str, Any]) -> None:
    assert Manifest.from_dict(_au(base, ["AU1", "AU2"])).auxiliary is not None
    with pytest.raises(PackageError, match=r"au_names\[0\]"):
        Manifest.from_dict(_au(base, ["AU1\n", "AU2"]))


@pytest.mark.parametrize("extra", ["notes.txt", "model2.onnx", "au_detector.onnx", "weights.bin"])
def test_extra_listed_file_is_refused(base: dict[str, Any], extra: str) -> None:
    data = _with(base)
    data["files"][extra] = {"size": 1, "sha256": "0" * 64}
    with pytest.raises(PackageError, match=rf"'files\.{extra}'.*format defines no other file"):
        Manifest.from_dict(data)


def test_extra_file_beside_the_detector_is_refused(base: dict[str, Any]) -> None:
    data = _au(base, ["AU1"])
    data["files"]["readme.md"] = {"size": 1, "sha256": "0" * 64}
    with pytest.raises(PackageError, match=r"'files\.readme\.md'"):
        Manifest.from_dict(data)


def test_listed_and_hashed_extra_file_fails_to_load(pkg_copy: Path) -> None:
    data = b"private notes of the vendor"
    (pkg_copy / "notes.txt").write_bytes(data)
    manifest = json.loads((pkg_copy / "manifest.json").read_text())
    manifest["files"]["notes.txt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (pkg_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=r"files\.notes\.txt"):
        load_package(pkg_copy)


def _size(base: dict[str, Any], h: int, w: int) -> dict[str, Any]:
    data = _with(base)
    data["input"]["size"] = [h, w]
    return data


def test_oversized_input_is_refused_before_allocating(base: dict[str, Any]) -> None:
    with pytest.raises(PackageError, match=rf"input\.size.*cap of {MAX_INPUT_ELEMENTS}"):
        Manifest.from_dict(_size(base, 4096, 4096))
    with pytest.raises(PackageError, match=r"input\.size"):
        InputSpec(size=(1025, 1024))
    assert Manifest.from_dict(_size(base, 1024, 1024)).input.size == (1024, 1024)
    assert Manifest.from_dict(_size(base, 512, 512)).input.image_bytes == 4 * 3 * 512 * 512
    assert InputSpec(size=(2048, 1536), channels=1, color="gray", mean=(0.5,), std=(0.5,))


def test_batch_bytes_are_bounded() -> None:
    spec = InputSpec(size=(1024, 1024))
    with pytest.raises(ConfigError, match="--batch-size 65536 is too large") as info:
        check_batch_bytes(spec, 65536, "--batch-size")
    assert "pass --batch-size" in info.value.fix
    check_batch_bytes(InputSpec(size=(32, 32)), 64)


def test_predict_refuses_a_batch_over_the_budget(
    source_pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sourcefree.package.manifest.MAX_BATCH_BYTES", 4 * 3 * 32 * 32 * 10)
    Image.new("RGB", (40, 40), (90, 60, 30)).save(tmp_path / "one.png")
    args = ["predict", str(source_pkg), str(tmp_path / "one.png"), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "11"])
    assert result.exit_code == 2 and "--batch-size 11 is too large" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    result = CliRunner().invoke(main, [*args, "--batch-size", "10"])
    assert result.exit_code == 0, result.output
