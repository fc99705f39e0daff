"""Static checks of a package's safetensors file, without torch.

The safetensors library enforces offsets and coverage but accepts duplicate
header keys and NaN/Inf payloads; both are refused here. The torch side
(``sourcefree.engine.models``) later checks names and shapes against the architecture.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from sourcefree.errors import PackageError
from sourcefree.package import strictjson
from sourcefree.package.manifest import WEIGHTS_NAME, Manifest

#: Largest header read. The registry's biggest architecture needs about 30 kB; parsed
#: JSON can take ~30x its text in memory, so this also bounds what a header costs.
MAX_HEADER_BYTES = 16 * 1024 * 1024
PREFIXES = ("backbone.", "head.")
_DTYPES: dict[str, tuple[int, str | None]] = {
    "F64": (8, "<f8"),
    "F32": (4, "<f4"),
    "F16": (2, "<f2"),
    "BF16": (2, None),
    "I64": (8, "<i8"),
    "I32": (4, "<i4"),
    "I16": (2, "<i2"),
    "I8": (1, "i1"),
    "U8": (1, "u1"),
    "BOOL": (1, "u1"),
}
_FLOATS = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _bad(why: str, fix: str = "re-export the package with the SDK") -> PackageError:
    return PackageError(f"{WEIGHTS_NAME} is not a valid safetensors file", why, fix)


def _quote(name: str) -> str:
    """A short, escaped prefix of an attacker-chosen name, for error messages."""
    return repr(name[:64])


def _elements(shape: list[int], limit: int) -> int:
    """Product of ``shape``, or ``limit + 1`` once it passes ``limit`` (no huge products)."""
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > limit:
            return limit + 1
    return count


def sniff_container(data: bytes, name: str) -> None:
    """Refuse pickles and zip archives renamed to a model file, by magic bytes."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise PackageError(
            f"{name} is a Python pickle",
            "pickles run code when loaded and are never read by this SDK",
            "export the weights with safetensors (`sourcefree export`)",
        )
    if data[:4] == b"PK\x03\x04":
        raise PackageError(
            f"{name} is a zip archive (a torch.save checkpoint?)",
            "torch checkpoints contain pickles and are never read by this SDK",
            "convert it with safetensors.torch.save_file and export again",
        )


def read_header(data: bytes, name: str = WEIGHTS_NAME) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; return tensors by name."""
    return read_header_with_metadata(data, name)[0]


def read_header_with_metadata(
    data: bytes, name: str = WEIGHTS_NAME
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Like :func:`read_header`, also returning the ``__metadata__`` strings (for ``audit``)."""
    sniff_container(data, name)
    if len(data) < 8:
        raise _bad("it is shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _bad(f"its header length {n} is larger than the file or the limit")
    raw = data[8 : 8 + n]
    if raw[:1] != b"{":
        raise _bad("its header does not start with a JSON object")
    header = strictjson.loads(raw, what=f"{name} header", max_bytes=MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise _bad("its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _bad("its __metadata__ must map strings to strings")
    body = len(data) - 8 - n
    infos: list[TensorInfo] = []
    for tname, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {_quote(tname)} has a malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            shown = _quote(dtype) if isinstance(dtype, str) else type(dtype).__name__
            raise _bad(f"tensor {_quote(tname)} has unsupported dtype {shown}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < (1 << 40) for d in shape
        ):
            raise _bad(f"tensor {_quote(tname)} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _bad(f"tensor {_quote(tname)} has invalid data_offsets")
        count = _elements(shape, body)
        start, end = offsets
        if not 0 <= start <= end <= body or end - start != count * _DTYPES[dtype][0]:
            raise _bad(f"tensor {_quote(tname)} has offsets that do not match its shape and dtype")
        infos.append(TensorInfo(tname, dtype, tuple(shape), start, end))
    infos.sort(key=lambda t: (t.start, t.end))
    cursor = 0
    for info in infos:
        if info.start != cursor:
            raise _bad("tensor data overlaps or leaves gaps")
        cursor = info.end
    if cursor != body:
        raise _bad("the file has bytes after the last tensor")
    return {t.name: t for t in infos}, dict(meta)


def _finite(data: bytes, base: int, info: TensorInfo) -> bool:
    buf = memoryview(data)[base + info.start : base + info.end]
    if info.dtype == "BF16":
        bits = np.frombuffer(buf, dtype="<u2")
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    fmt = _DTYPES[info.dtype][1]
    if fmt is None:
        raise _bad(f"tensor {_quote(info.name)} has a dtype without a numeric reading")
    return bool(np.isfinite(np.frombuffer(buf, dtype=fmt)).all())


def check_safetensors(data: bytes, manifest: Manifest) -> dict[str, TensorInfo]:
    """Validate the weights of a package against its manifest.

    Raises:
        PackageError: pickle/zip disguise, malformed header, names outside
            ``backbone.``/``head.``, a head that disagrees with the manifest,
            or NaN/Inf values (naming the tensor).
    """
    infos = read_header(data)
    base = 8 + struct.unpack("<Q", data[:8])[0]
    for name, info in infos.items():
        if not name.startswith(PREFIXES):
            raise PackageError(
                f"{WEIGHTS_NAME} holds a tensor named {_quote(name)}",
                "package weights are named backbone.* or head.*",
                "re-export the package with the SDK",
            )
        if info.dtype in _FLOATS and not _finite(data, base, info):
            raise PackageError(
                f"{WEIGHTS_NAME} tensor {_quote(name)} contains NaN or Inf",
                "a model with non-finite weights predicts garbage",
                "retrain or re-export a finite model",
            )
    arch = manifest.architecture
    expected = {
        "head.weight": (arch.num_classes, arch.feature_dim),
        "head.bias": (arch.num_classes,),
    }
    for name, shape in expected.items():
        if name not in infos:
            raise PackageError(
                f"{WEIGHTS_NAME} has no tensor {name!r}",
                "every package has a linear head",
                "re-export the package with the SDK",
            )
        if infos[name].shape != shape:
            raise PackageError(
                f"{WEIGHTS_NAME} tensor {name!r} has shape {list(infos[name].shape)}",
                f"the manifest's {arch.num_classes} labels and feature_dim {arch.feature_dim} "
                f"need {list(shape)}",
                "export again with the labels the model was trained on",
            )
    return infos
