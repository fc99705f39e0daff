"""Fuzzing the readers of untrusted bytes with hypothesis.

Property: for any input (random bytes, or a valid seed file with bit flips,
truncations, insertions, deletions and overwrites), each reader either returns
or raises a ``SourcefreeError`` subclass: never another exception, never a hang.
Targets: the manifest (``strictjson.loads`` + ``Manifest.from_dict``), the
safetensors header (``weights.read_header_with_metadata``/``check_safetensors``),
the ONNX reader (``onnx_check.summarize``/``check_model``) and the image decoder
(``imaging.decode_image``, which allowlists formats and refuses bombs first,
then ``imaging.preprocess``).

The default run is short and deterministic (200 examples per target,
``derandomize=True``, no example database). The long run::

    SOURCEFREE_FUZZ_EXAMPLES=20000 OMP_NUM_THREADS=1 \\
        .venv/bin/pytest -q -m slow tests/test_fuzz.py

Each example runs under an address-space cap (current use + 2 GiB), so a
reader that allocates from an attacker's length fails with MemoryError (a
finding) instead of exhausting the machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sourcefree.data import imaging
from sourcefree.errors import PackageError, SourcefreeError
from sourcefree.package import onnx_check, strictjson, weights
from sourcefree.package.manifest import MAX_MANIFEST_BYTES, ONNX_NAME, WEIGHTS_NAME, Manifest

DEFAULT_EXAMPLES = 200
LONG_EXAMPLES = int(os.environ.get("SOURCEFREE_FUZZ_EXAMPLES", "20000"))
_HEADROOM = 2 << 30


@contextlib.contextmanager
def _address_space_cap() -> Iterator[None]:
    """Cap the soft RLIMIT_AS at current use + 2 GiB while a target runs (Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        yield
        return
    vm = next(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + _HEADROOM if hard == resource.RLIM_INFINITY else min(vm + _HEADROOM, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@st.composite
def _mutation(draw: st.DrawFn, seeds: tuple[bytes, ...]) -> bytes:
    """A seed with 1-8 edits: bit flips, truncations, insertions, deletions, overwrites."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(("flip", "truncate", "insert", "delete", "set")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "set" and data:
            data[at] = draw(st.sampled_from((0x00, 0x7F, 0x80, 0xFF, 0x22, 0x5B, 0x7B, 0x5C)))
    return bytes(data)


def _inputs(seeds: tuple[bytes, ...]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=2048), _mutation(seeds))


def fuzz(target: Callable[[bytes], Any], seeds: tuple[bytes, ...], examples: int) -> None:
    """Run ``target`` on fuzzed inputs; anything but a SourcefreeError fails the test."""

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_inputs(seeds))
    def run(data: bytes) -> None:
        with _address_space_cap(), contextlib.suppress(SourcefreeError):
            target(data)

    run()


# --- seeds and targets -------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(source_pkg: Path) -> Manifest:
    raw = (source_pkg / "manifest.json").read_bytes()
    return Manifest.from_dict(strictjson.loads(raw, what="m", max_bytes=MAX_MANIFEST_BYTES))


def _small_onnx(data: bytes) -> bytes:
    """The package graph with each initializer cut to one element: a structure-dense seed."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load_model_from_string(data)
    for tensor in model.graph.initializer:
        size = tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        del tensor.dims[:]
        tensor.dims.append(1)
        tensor.raw_data = tensor.raw_data[:size]
    return bytes(model.SerializeToString())


def _safetensors_seed(manifest: Manifest) -> bytes:
    from safetensors.numpy import save

    arch = manifest.architecture
    rng = np.random.default_rng(0)
    return bytes(
        save(
            {
                "backbone.conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float16),
                "backbone.bn.num_batches_tracked": np.array(3, dtype=np.int64),
                "head.weight": rng.standard_normal((arch.num_classes, arch.feature_dim)).astype(
                    np.float32
                ),
                "head.bias": np.zeros(arch.num_classes, dtype=np.float32),
            },
            metadata={"format": "pt"},
        )
    )


def _image_seeds() -> tuple[bytes, ...]:
    from PIL import Image

    grid = (np.arange(16 * 16 * 4, dtype=np.uint32) * 37 % 256).astype(np.uint8)
    rgba = Image.fromarray(grid.reshape(16, 16, 4), "RGBA")
    out = []
    for fmt, mode in (
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("JPEG", "RGB"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "CMYK"),
        ("WEBP", "RGB"),
        ("PPM", "L"),
    ):
        buf = io.BytesIO()
        rgba.convert(mode).save(buf, format=fmt)
        out.append(buf.getvalue())
    return tuple(out)


def _manifest_target(data: bytes) -> None:
    Manifest.from_dict(strictjson.loads(data, what="manifest.json", max_bytes=MAX_MANIFEST_BYTES))


def _image_target(manifest: Manifest) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        imaging.preprocess(imaging.decode_image(io.BytesIO(data), "rgb"), manifest.input)

    return target


def _onnx_target(manifest: Manifest) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        onnx_check.summarize(data)
        onnx_check.check_model(data, manifest)

    return target


def _weights_target(manifest: Manifest) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        weights.read_header_with_metadata(data)
        weights.check_safetensors(data, manifest)

    return target


Case = tuple[Callable[[bytes], Any], tuple[bytes, ...]]


@pytest.fixture(scope="module")
def cases(source_pkg: Path, manifest: Manifest) -> dict[str, Case]:
    small = _small_onnx((source_pkg / ONNX_NAME).read_bytes())
    onnx_check.check_model(small, manifest)  # the seed itself is valid
    return {
        "manifest": (_manifest_target, ((source_pkg / "manifest.json").read_bytes(),)),
        "safetensors": (
            _weights_target(manifest),
            (_safetensors_seed(manifest), (source_pkg / WEIGHTS_NAME).read_bytes()),
        ),
        "onnx": (_onnx_target(manifest), (small,)),
        "image": (_image_target(manifest), _image_seeds()),
    }


TARGETS = ["manifest", "safetensors", "onnx", "image"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on broken TIFF tags
@pytest.mark.parametrize("name", TARGETS)
def test_reader_raises_only_typed_errors(cases: dict[str, Case], name: str) -> None:
    target, seeds = cases[name]
    fuzz(target, seeds, DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", TARGETS)
def test_reader_raises_only_typed_errors_long(cases: dict[str, Case], name: str) -> None:
    target, seeds = cases[name]
    fuzz(target, seeds, LONG_EXAMPLES)


# --- findings, kept as regression tests ----------------------------------------------------

#: Found by this fuzzer in the first onnx_check (before its bounded rewrite): a field
#: read with the wrong wire type. TypeError (len of an int), ValueError (int of bytes),
#: and bytes(2**33) allocating 8 GiB from a 5-byte varint.
ONNX_REPRODUCERS = ["080a3a025000", "080a42021200", "080a3a082a06408080808020"]


@pytest.mark.parametrize("hexdata", ONNX_REPRODUCERS)
def test_onnx_wrong_wire_type_is_a_typed_error(hexdata: str) -> None:
    with _address_space_cap(), pytest.raises(PackageError):
        onnx_check.summarize(bytes.fromhex(hexdata))


def _header(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_safetensors_dtype_of_another_type_is_a_typed_error() -> None:
    data = _header({"t": {"dtype": ["F32"], "shape": [], "data_offsets": [0, 0]}})
    with pytest.raises(PackageError, match="unsupported dtype list"):
        weights.read_header(data)


def test_safetensors_errors_quote_a_short_prefix_of_names() -> None:
    data = _header({"t" * 100_000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 0]}})
    with pytest.raises(PackageError, match="offsets that do not match") as info:
        weights.read_header(data)
    assert len(str(info.value)) < 400


def test_safetensors_huge_shape_products_are_refused() -> None:
    shape = [(1 << 40) - 1] * 1000 + [0]
    data = _header({"t": {"dtype": "F32", "shape": shape[:-1], "data_offsets": [0, 0]}})
    with pytest.raises(PackageError, match="offsets that do not match"):
        weights.read_header(data)
    empty = _header({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    assert weights.read_header(empty)["t"].shape[-1] == 0
