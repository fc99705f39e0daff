"""Strict JSON: depth is measured before parsing, numbers are bounded, errors stay short."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from sourcefree import PackageError, load_package
from sourcefree.package import strictjson, weights
from sourcefree.package.manifest import WEIGHTS_NAME

Forge = Callable[[Path, str, bytes], None]
DEPTHS = [17, 600, 100_000]


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _loads(text: str | bytes) -> object:
    data = text.encode() if isinstance(text, str) else text
    return strictjson.loads(data, what="x.json", max_bytes=1 << 24)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "{{{"]', 1),
        (r'["\"[[[[", "\\", "\\\"{{{"]', 1),
        (r'{"k\"[[": ["]]]]"]}', 2),
        ('"unterminated [[[[', 0),
        ('"ends in a backslash \\', 0),
        ("]]][[[", 0),
    ],
)
def test_nesting_counts_brackets_outside_strings_only(text: str, depth: int) -> None:
    assert strictjson.nesting(text) == depth


def test_nesting_agrees_with_the_parser_on_valid_json() -> None:
    doc = {"a": [[{"b": ["[", "\\", '"{']}]], "c": {"d": [[[[1]]]]}}
    assert strictjson.nesting(json.dumps(doc)) == 6


@pytest.mark.parametrize("n", DEPTHS)
def test_deep_text_is_refused_before_parsing(n: int) -> None:
    with pytest.raises(PackageError, match="nested deeper than 16 levels"):
        _loads(_deep(n))


def test_depth_at_the_limit_is_read() -> None:
    assert _loads(_deep(strictjson.MAX_DEPTH)) is not None


@pytest.mark.parametrize("n", DEPTHS)
def test_deep_manifest_is_refused_by_load_package(pkg_copy: Path, n: int) -> None:
    manifest = json.loads((pkg_copy / "manifest.json").read_text())
    text = json.dumps(manifest)
    deep = text.replace('"provenance": {', f'"provenance": {{"note": {_deep(n)}, ', 1)
    (pkg_copy / "manifest.json").write_text(deep)
    with pytest.raises(PackageError, match="nested deeper than 16 levels"):
        load_package(pkg_copy)


def _header_file(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("n", DEPTHS)
def test_deep_safetensors_header_is_refused(pkg_copy: Path, forge: Forge, n: int) -> None:
    data = _header_file(b'{"__metadata__": ' + _deep(n).encode() + b"}")
    with pytest.raises(PackageError, match="nested deeper than 16 levels"):
        weights.read_header(data)
    forge(pkg_copy, WEIGHTS_NAME, data)
    with pytest.raises(PackageError, match="nested deeper than 16 levels"):
        load_package(pkg_copy)


@pytest.mark.parametrize("text", ["1e999", "[-1e999]", '{"a": 1E400}'])
def test_overflowing_floats_are_refused(text: str) -> None:
    with pytest.raises(PackageError, match="NaN or Infinity"):
        _loads(text)


@pytest.mark.parametrize("digits", [65, 5000])
def test_long_integers_are_refused(digits: int) -> None:
    with pytest.raises(PackageError, match="longer than 64 digits"):
        _loads("[" + "7" * digits + "]")


def test_integers_a_package_needs_are_read() -> None:
    assert _loads(f"[{2**64}, -{2**63}]") == [2**64, -(2**63)]


def test_duplicate_key_error_quotes_a_short_prefix() -> None:
    key = "k" * 100_000
    with pytest.raises(PackageError, match="twice") as info:
        _loads(f'{{"{key}": 1, "{key}": 2}}')
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("n", [600, 100_000])
def test_deep_manifest_embedded_in_the_onnx_graph_is_refused(
    pkg_copy: Path, forge: Forge, n: int
) -> None:
    import onnx

    from sourcefree.package.manifest import ONNX_MANIFEST_KEY, ONNX_NAME

    model = onnx.load_model_from_string((pkg_copy / ONNX_NAME).read_bytes())
    (entry,) = [p for p in model.metadata_props if p.key == ONNX_MANIFEST_KEY]
    entry.value = entry.value.replace('"provenance": {', f'"provenance": {{"note": {_deep(n)}, ', 1)
    assert "[[[[" in entry.value
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    with pytest.raises(PackageError, match="model.onnx metadata is nested deeper than 16"):
        load_package(pkg_copy)
