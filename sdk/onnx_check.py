"""Static validation of a package's ONNX graph, before onnxruntime sees it.

A small protobuf wire-format reader (no ``onnx`` dependency: applications
install only the runtime) walks the ModelProto and refuses what a vendor graph
never needs: custom op domains, ops outside an allowlist, functions, training
info, external data (of any kind: ``../``, absolute, symlinked or hard-linked
locations are all refused the same way), huge initializers, and tensor names or
shapes that disagree with the manifest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sourcefree import strictjson
from sourcefree.errors import PackageError
from sourcefree.manifest import (
    MAX_MANIFEST_BYTES,
    ONNX_MANIFEST_KEY,
    ONNX_NAME,
    AUDetectorSpec,
    Manifest,
)

#: Highest IR version this SDK writes and accepts (onnxruntime 1.2x-1.3x load it).
MAX_IR_VERSION = 10
#: Standard ONNX ops a vendor's image classifier may use.
ALLOWED_OPS = frozenset(
    {
        "Abs", "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat",
        "Constant", "Conv", "Div", "Dropout", "Elu", "Equal", "Erf", "Exp", "Flatten",
        "Gather", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater",
        "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
        "LayerNormalization", "LeakyRelu", "Less", "Log", "LogSoftmax", "MatMul", "Max",
        "MaxPool", "Mean", "Min", "Mul", "Neg", "Not", "Pad", "Pow", "PRelu",
        "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Selu",
        "Shape", "Sigmoid", "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze",
        "Sub", "Tanh", "Transpose", "Unsqueeze", "Where",
    }
)  # fmt: skip
STANDARD_DOMAINS = ("", "ai.onnx")
MAX_ELEMENTS = 1 << 31
MAX_NODES = 100_000
_FLOAT = 1
_FLOAT16 = 10


class _Reader:
    """Iterate (field number, wire type, value) over one protobuf message."""

    def __init__(self, data: memoryview) -> None:
        self.data = data

    def _varint(self, pos: int) -> tuple[int, int]:
        result = 0
        shift = 0
        while True:
            if pos >= len(self.data) or shift > 63:
                raise _bad("a varint runs past the end of its message")
            byte = self.data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, pos
            shift += 7

    def fields(self) -> Iterator[tuple[int, int, Any]]:
        pos = 0
        end = len(self.data)
        while pos < end:
            key, pos = self._varint(pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = self._varint(pos)
                yield number, wire, value
            elif wire == 1:
                if pos + 8 > end:
                    raise _bad("a fixed64 field runs past the end")
                yield number, wire, bytes(self.data[pos : pos + 8])
                pos += 8
            elif wire == 2:
                size, pos = self._varint(pos)
                if pos + size > end:
                    raise _bad("a length-delimited field runs past the end")
                yield number, wire, self.data[pos : pos + size]
                pos += size
            elif wire == 5:
                if pos + 4 > end:
                    raise _bad("a fixed32 field runs past the end")
                yield number, wire, bytes(self.data[pos : pos + 4])
                pos += 4
            else:
                raise _bad(f"unsupported protobuf wire type {wire}")


def _bad(why: str) -> PackageError:
    return PackageError(f"{ONNX_NAME} is not a valid ONNX model", why, "re-export the package")


def _text(value: Any) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("a name is not UTF-8") from None


def _loose(value: Any) -> str:
    """Decode a free string for ``GraphSummary.texts`` without refusing bad UTF-8."""
    return bytes(value).decode("utf-8", "replace")


def _entry(value: Any) -> str:
    """``key=value`` of a StringStringEntryProto (metadata_props)."""
    key, val = "", ""
    for number, _, v in _Reader(value).fields():
        key = _loose(v) if number == 1 else key
        val = _loose(v) if number == 2 else val
    return f"{key}={val}"


def _packed_ints(wire: int, value: Any) -> list[int]:
    if wire == 0:
        return [int(value)]
    out = []
    reader = _Reader(value)
    pos = 0
    while pos < len(value):
        v, pos = reader._varint(pos)
        out.append(v)
    return out


@dataclass
class GraphSummary:
    """What the validator read from a model (also used by ``inspect`` and ``audit``)."""

    ir_version: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, list[int | str]] = field(default_factory=dict)
    outputs: dict[str, list[int | str]] = field(default_factory=dict)
    input_types: dict[str, int] = field(default_factory=dict)
    initializer_names: set[str] = field(default_factory=set)
    doc_strings: int = 0
    node_metadata: int = 0
    producer: str = ""
    texts: list[tuple[str, str]] = field(default_factory=list)
    """Free strings as (where, text): node and tensor names, doc strings,
    graph and node metadata, producer and domain (read by ``audit``)."""


def _tensor(data: memoryview, summary: GraphSummary) -> None:
    count = 1
    name = ""
    for number, wire, value in _Reader(data).fields():
        if number == 1:
            for d in _packed_ints(wire, value):
                if d >= MAX_ELEMENTS:
                    raise _bad(f"an initializer has dimension {d}")
                count *= max(d, 1)
        elif number == 8:
            name = _text(value)
        elif number == 12 and len(value):
            summary.texts.append(("tensor doc string", _loose(value)))
        elif number in (13, 14) and (number == 13 or value == 1):
            raise PackageError(
                f"{ONNX_NAME} refers to external tensor data",
                "package graphs must be self-contained; external files could point "
                "outside the package (../, absolute paths, symlinks, hard links)",
                "re-export the package as a single ONNX file (models under 2 GB)",
            )
    if count > MAX_ELEMENTS:
        raise _bad(f"an initializer declares {count} elements")
    summary.initializer_names.add(name)
    if name:
        summary.texts.append(("tensor name", name))


def _value_info(data: memoryview) -> tuple[str, list[int | str], int]:
    name = ""
    dims: list[int | str] = []
    elem = 0
    for number, _, value in _Reader(data).fields():
        if number == 1:
            name = _text(value)
        elif number == 2:  # TypeProto
            for tn, _, tv in _Reader(value).fields():
                if tn != 1:  # only tensor types
                    continue
                for fn, _, fv in _Reader(tv).fields():
                    if fn == 1:
                        elem = int(fv)
                    elif fn == 2:
                        for sn, _, sv in _Reader(fv).fields():
                            if sn != 1:
                                continue
                            dim: int | str = "?"
                            for dn, _, dv in _Reader(sv).fields():
                                dim = int(dv) if dn == 1 else _text(dv) if dn == 2 else dim
                            dims.append(dim)
    return name, dims, elem


def _graph(data: memoryview, summary: GraphSummary, depth: int, top: bool) -> None:
    if depth > 8:
        raise _bad("subgraphs are nested too deeply")
    inputs: list[tuple[str, list[int | str], int]] = []
    for number, _, value in _Reader(data).fields():
        if number in (11, 12, 13):  # graph inputs, outputs and value_info
            for vn, _, vv in _Reader(value).fields():
                if vn in (1, 3) and len(vv):
                    where = "value name" if vn == 1 else "value doc string"
                    summary.texts.append((where, _loose(vv)))
        if number == 1:
            _node(value, summary, depth)
        elif number == 5:
            _tensor(value, summary)
        elif number == 15:
            for sn, _, sv in _Reader(value).fields():
                if sn in (1, 2):
                    _tensor(sv, summary)
        elif number == 10 and len(value):
            summary.doc_strings += 1
            summary.texts.append(("graph doc string", _loose(value)))
        elif number == 16:
            summary.node_metadata += 1
            summary.texts.append(("graph metadata", _entry(value)))
        elif number == 2 and len(value):
            summary.texts.append(("graph name", _loose(value)))
        elif top and number == 11:
            inputs.append(_value_info(value))
        elif top and number == 12:
            name, dims, elem = _value_info(value)
            summary.outputs[name] = dims
            summary.input_types[f"output:{name}"] = elem
    for name, dims, elem in inputs:
        if name not in summary.initializer_names:
            summary.inputs[name] = dims
            summary.input_types[name] = elem


def _node(data: memoryview, summary: GraphSummary, depth: int) -> None:
    op = ""
    domain = ""
    subgraphs: list[memoryview] = []
    for number, _, value in _Reader(data).fields():
        if number == 4:
            op = _text(value)
        elif number == 7:
            domain = _text(value)
        elif number == 6 and len(value):
            summary.doc_strings += 1
            summary.texts.append(("node doc string", _loose(value)))
        elif number == 9:
            summary.node_metadata += 1
            summary.texts.append(("node metadata", _entry(value)))
        elif number == 3 and len(value):
            summary.texts.append(("node name", _loose(value)))
        elif number == 5:
            for an, _, av in _Reader(value).fields():
                if an in (6, 11):
                    subgraphs.append(av)
                elif an in (5, 10):
                    _tensor(av, summary)
    if domain not in STANDARD_DOMAINS:
        raise PackageError(
            f"{ONNX_NAME} uses op {op!r} from the custom domain {domain!r}",
            "custom domains need native code that a package must never bring",
            "export with standard ONNX ops only",
        )
    if op not in ALLOWED_OPS:
        raise PackageError(
            f"{ONNX_NAME} uses the op {op!r}, which is not on the allowlist",
            "packages may use the standard ops an image classifier needs "
            "(see docs/package-format.md)",
            "export a standard architecture, or ask us to review the op",
        )
    summary.ops[op] = summary.ops.get(op, 0) + 1
    if sum(summary.ops.values()) > MAX_NODES:
        raise _bad(f"the graph has more than {MAX_NODES} nodes")
    for sub in subgraphs:
        _graph(sub, summary, depth + 1, top=False)


def summarize(data: bytes) -> GraphSummary:
    """Read a serialised ModelProto; refuse structural hazards while reading."""
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        raise PackageError(
            f"{ONNX_NAME} is a pickle or zip archive, not an ONNX model",
            "such files can run code when loaded and are never read",
            "export the model to ONNX with `sourcefree export`",
        )
    summary = GraphSummary()
    graphs = 0
    for number, wire, value in _Reader(memoryview(data)).fields():
        if number == 1 and wire == 0:
            summary.ir_version = int(value)
        elif number == 2 and wire == 2:
            summary.producer = _text(value)
            summary.texts.append(("producer name", summary.producer))
        elif number in (3, 4) and wire == 2 and len(value):
            summary.texts.append(("producer version" if number == 3 else "domain", _loose(value)))
        elif number == 6 and wire == 2 and len(value):
            summary.doc_strings += 1
            summary.texts.append(("model doc string", _loose(value)))
        elif number == 8 and wire == 2:
            dom, ver = "", 0
            for on, _, ov in _Reader(value).fields():
                dom = _text(ov) if on == 1 else dom
                ver = int(ov) if on == 2 else ver
            summary.opsets[dom] = ver
        elif number == 14 and wire == 2:
            key, val = "", ""
            for mn, _, mv in _Reader(value).fields():
                key = _text(mv) if mn == 1 else key
                val = _text(mv) if mn == 2 else val
            summary.metadata[key] = val
        elif number == 7 and wire == 2:
            graphs += 1
            _graph(value, summary, 0, top=True)
        elif number == 20:
            raise _bad("it carries training information")
        elif number == 25:
            raise PackageError(
                f"{ONNX_NAME} defines local functions",
                "package graphs are flat, so every op can be checked",
                "re-export the package with the SDK (functions are inlined)",
            )
    if graphs != 1 or summary.ir_version == 0:
        raise _bad("it has no graph or no IR version")
    return summary


def check_model(data: bytes, manifest: Manifest) -> GraphSummary:
    """Validate the graph against the manifest's ``onnx`` and ``input`` contracts."""
    summary = summarize(data)
    spec = manifest.onnx
    if summary.ir_version > MAX_IR_VERSION or summary.ir_version != spec.ir_version:
        raise PackageError(
            f"{ONNX_NAME} has IR version {summary.ir_version}",
            f"the manifest says {spec.ir_version} and this SDK reads up to {MAX_IR_VERSION}",
            "re-export the package with the SDK",
        )
    for domain, version in summary.opsets.items():
        if domain not in STANDARD_DOMAINS:
            raise PackageError(
                f"{ONNX_NAME} imports the custom op domain {domain!r}",
                "custom domains need native code that a package must never bring",
                "export with standard ONNX ops only",
            )
        if version != spec.opset:
            raise PackageError(
                f"{ONNX_NAME} uses opset {version}",
                f"the manifest says {spec.opset}",
                "re-export the package with the SDK",
            )
    if list(summary.inputs) != [spec.input]:
        raise PackageError(
            f"{ONNX_NAME} has inputs {list(summary.inputs)}",
            f"the manifest expects exactly one input named {spec.input!r}",
            "re-export the package with the SDK",
        )
    height, width = manifest.input.size
    dims = summary.inputs[spec.input]
    if len(dims) != 4 or dims[1:] != [manifest.input.channels, height, width]:
        raise PackageError(
            f"{ONNX_NAME} input has shape {dims}",
            f"the manifest's input spec needs "
            f"[batch, {manifest.input.channels}, {height}, {width}]",
            "re-export the package with the SDK",
        )
    if summary.input_types[spec.input] != _FLOAT:
        raise PackageError(
            f"{ONNX_NAME} input is not float32", "the runtime feeds float32", "re-export"
        )
    for out in (spec.logits, spec.features):
        if out not in summary.outputs:
            raise PackageError(
                f"{ONNX_NAME} has no output named {out!r}",
                f"outputs are {sorted(summary.outputs)}",
                "re-export the package with the SDK",
            )
    embedded = summary.metadata.get(ONNX_MANIFEST_KEY)
    if embedded is None:
        raise PackageError(
            f"{ONNX_NAME} has no embedded manifest ({ONNX_MANIFEST_KEY})",
            "graph and manifest must describe the same model",
            "re-export the package with the SDK",
        )
    parsed = strictjson.loads(
        embedded.encode(), what=f"{ONNX_NAME} metadata", max_bytes=MAX_MANIFEST_BYTES
    )
    if parsed != manifest.to_dict(with_files=False):
        raise PackageError(
            f"{ONNX_NAME}'s embedded manifest differs from manifest.json",
            "the graph belongs to another package or the manifest was edited",
            "re-export the package with the SDK",
        )
    extra = sorted(set(summary.metadata) - {ONNX_MANIFEST_KEY})
    if extra:
        raise PackageError(
            f"{ONNX_NAME} carries unexpected metadata key {extra[0]!r}",
            "graph metadata is allowlisted so nothing private travels in it",
            "re-export the package with the SDK",
        )
    return summary


def _renamed(exc: PackageError, name: str) -> PackageError:
    """``exc`` with the file it names changed from model.onnx to ``name``."""
    return type(exc)(exc.what.replace(ONNX_NAME, name), exc.why, exc.fix)


def summarize_auxiliary(data: bytes, name: str) -> GraphSummary:
    """:func:`summarize` for an auxiliary graph: the same refusals, errors naming ``name``."""
    try:
        return summarize(data)
    except PackageError as exc:
        raise _renamed(exc, name) from None


def check_au_detector(data: bytes, spec: AUDetectorSpec, manifest: Manifest) -> GraphSummary:
    """Validate the action-unit detector graph (``auxiliary.au_detector``).

    The same static checks as the classifier graph (op allowlist, standard domains,
    no functions, training info or external data, IR version and opset of the
    package), the classifier's input contract, exactly one output of shape
    ``[batch, len(au_names)]``, and no metadata at all (the manifest describes it).
    """
    name = spec.file
    summary = summarize_auxiliary(data, name)
    onnx = manifest.onnx

    def refuse(what: str, why: str) -> PackageError:
        return PackageError(f"{name} {what}", why, "re-export the package with the SDK")

    if summary.ir_version > MAX_IR_VERSION or summary.ir_version != onnx.ir_version:
        raise refuse(
            f"has IR version {summary.ir_version}",
            f"the package's graphs use {onnx.ir_version} and this SDK reads up to {MAX_IR_VERSION}",
        )
    for domain, version in summary.opsets.items():
        if domain not in STANDARD_DOMAINS:
            raise refuse(
                f"imports the custom op domain {domain!r}",
                "custom domains need native code that a package must never bring",
            )
        if version != onnx.opset:
            raise refuse(f"uses opset {version}", f"the manifest says {onnx.opset}")
    if list(summary.inputs) != [spec.input]:
        raise refuse(
            f"has inputs {list(summary.inputs)}",
            f"the manifest expects exactly one input named {spec.input!r}",
        )
    height, width = manifest.input.size
    dims = summary.inputs[spec.input]
    if len(dims) != 4 or dims[1:] != [manifest.input.channels, height, width]:
        raise refuse(
            f"input has shape {dims}",
            f"it takes the classifier's input, [batch, {manifest.input.channels}, "
            f"{height}, {width}]",
        )
    if summary.input_types[spec.input] != _FLOAT:
        raise refuse("input is not float32", "the runtime feeds float32")
    if list(summary.outputs) != [spec.output]:
        raise refuse(
            f"has outputs {list(summary.outputs)}",
            f"the manifest expects exactly one output named {spec.output!r}",
        )
    out_dims = summary.outputs[spec.output]
    if len(out_dims) != 2 or out_dims[1] != len(spec.au_names):
        raise refuse(
            f"output has shape {out_dims}",
            f"the manifest names {len(spec.au_names)} action units: "
            f"[batch, {len(spec.au_names)}] is expected",
        )
    if summary.input_types.get(f"output:{spec.output}") != _FLOAT:
        raise refuse("output is not float32", "action-unit probabilities are float32")
    if summary.metadata:
        raise refuse(
            f"carries metadata key {sorted(summary.metadata)[0]!r}",
            "an auxiliary graph carries no metadata; the manifest describes it",
        )
    return summary
