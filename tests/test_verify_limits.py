"""Acceptance: ``sourcefree verify`` stays under 1 GiB and 30 s whatever a package holds.

Each hostile package is consistently hashed (the manifest lists the forged file's
size and sha256), so verification reaches the parser under attack. ``verify`` runs
in a child process with RLIMIT_AS at 1 GiB (a valid package needs under 256 MiB of
address space) and a 30 s timeout; it must refuse the package with exit code 2 and
one typed ``error:`` line, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sourcefree.package.manifest import ONNX_NAME, WEIGHTS_NAME
from sourcefree.package.weights import MAX_HEADER_BYTES
from tests import protobuf_bytes as pb

Forge = Callable[[Path, str, bytes], None]
MEMORY_LIMIT = 1 << 30
TIME_LIMIT_S = 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _verify(pkg: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sourcefree", "verify", str(pkg)],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S,
        preexec_fn=_limit_memory,
        env=env,
        check=False,
    )


def _assert_refused(pkg: Path, match: str) -> None:
    result = _verify(pkg)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[:5]
    assert match in lines[0], lines[0]


def test_valid_package_verifies_within_the_limits(source_pkg: Path) -> None:
    result = _verify(source_pkg)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK ")


# --- JSON -------------------------------------------------------------------------------


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("n", [600, 100_000])
def test_deep_manifest(pkg_copy: Path, n: int) -> None:
    text = (pkg_copy / "manifest.json").read_text()
    deep = text.replace('"provenance": {', f'"provenance": {{"note": {_deep(n)}, ', 1)
    assert deep != text
    (pkg_copy / "manifest.json").write_text(deep)
    _assert_refused(pkg_copy, "nested deeper than 16 levels")


def _safetensors(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@pytest.mark.parametrize("n", [600, 100_000])
def test_deep_safetensors_header(pkg_copy: Path, forge: Forge, n: int) -> None:
    forge(pkg_copy, WEIGHTS_NAME, _safetensors(b'{"__metadata__": ' + _deep(n).encode() + b"}"))
    _assert_refused(pkg_copy, "nested deeper than 16 levels")


def _tensor_header(shape: list[int]) -> bytes:
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}
    return json.dumps({"head.weight": entry}).encode()


@pytest.mark.parametrize(
    "shape",
    [[0, 2**62], [2**40], [2**64 + 1], [(1 << 40) - 1] * 500_000],
    ids=["0x2^62", "2^40", "2^64+1", "500000-dims-of-2^40"],
)
def test_huge_safetensors_shape_claims(pkg_copy: Path, forge: Forge, shape: list[int]) -> None:
    forge(pkg_copy, WEIGHTS_NAME, _safetensors(_tensor_header(shape), b"\0" * 4))
    _assert_refused(pkg_copy, "model.safetensors is not a valid safetensors file")


def _list_flood(size: int) -> bytes:
    """A ``size``-byte header of empty lists: the most memory per byte that JSON allows."""
    count = (size - len(b'{"a":[]}')) // 3
    return b'{"a":[' + b"[]," * (count - 1) + b"[]]}"


def test_safetensors_header_at_the_size_limit(pkg_copy: Path, forge: Forge) -> None:
    forge(pkg_copy, WEIGHTS_NAME, _safetensors(_list_flood(MAX_HEADER_BYTES)))
    _assert_refused(pkg_copy, "malformed entry")


def test_safetensors_header_past_the_size_limit(pkg_copy: Path, forge: Forge) -> None:
    forge(pkg_copy, WEIGHTS_NAME, _safetensors(_list_flood(48 << 20)))
    _assert_refused(pkg_copy, "larger than the file or the limit")


# --- ONNX -------------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _with_graph_fields(model: bytes, extra: bytes) -> bytes:
    """Re-encode a ModelProto with ``extra`` appended to its graph (field 7)."""
    out = bytearray()
    pos = 0
    while pos < len(model):
        start = pos
        key, pos = _read_varint(model, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(model, pos)
        elif wire == 2:
            size, body = _read_varint(model, pos)
            pos = body + size
            if key >> 3 == 7:
                out += pb.ld(7, model[body:pos] + extra)
                continue
        else:
            pos += 8 if wire == 1 else 4
        out += model[start:pos]
    return bytes(out)


def _forge_graph(pkg: Path, forge: Forge, extra: bytes) -> None:
    model = _with_graph_fields((pkg / ONNX_NAME).read_bytes(), extra)
    forge(pkg, ONNX_NAME, model)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["files"][ONNX_NAME]["sha256"] == hashlib.sha256(model).hexdigest()


_FLOAT, _INT64 = 1, 7
#: 2**33 as a 9-byte (padded) varint.
_VARINT_2_33 = bytes([0x80, 0x80, 0x80, 0x80, 0xA0, 0x80, 0x80, 0x80, 0x00])


def test_onnx_name_field_with_the_wrong_wire_type(pkg_copy: Path, forge: Forge) -> None:
    tensor = (
        pb.key(1, 0) + pb.varint(1) + pb.key(2, 0) + pb.varint(_FLOAT)
        + pb.key(8, 0) + _VARINT_2_33  # TensorProto.name as a varint: "8 GiB of name"
        + pb.ld(9, b"\0" * 4)
    )  # fmt: skip
    _forge_graph(pkg_copy, forge, pb.ld(5, tensor))
    _assert_refused(pkg_copy, "model.onnx")


def test_onnx_sparse_initializer_with_huge_dims(pkg_copy: Path, forge: Forge) -> None:
    values = (
        pb.key(1, 0) + pb.varint(1) + pb.key(2, 0) + pb.varint(_FLOAT)
        + pb.ld(8, b"sparse") + pb.ld(9, b"\0" * 4)
    )  # fmt: skip
    indices = pb.key(1, 0) + pb.varint(1) + pb.key(2, 0) + pb.varint(_INT64) + pb.ld(9, b"\0" * 8)
    sparse = pb.ld(1, values) + pb.ld(2, indices) + pb.key(3, 0) + pb.varint(2**40)
    _forge_graph(pkg_copy, forge, pb.ld(15, sparse))
    _assert_refused(pkg_copy, "model.onnx")
