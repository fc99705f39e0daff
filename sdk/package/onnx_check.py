"""Static validation of a package's ONNX graph, before onnxruntime sees it.

A small protobuf wire-format reader (no ``onnx`` dependency: applications
install only the runtime) walks the whole ModelProto, every subgraph included,
and refuses what a vendor graph never needs: custom op domains, ops outside an
allowlist, functions, training info, external data (of any kind, in any dense
or sparse tensor: ``../``, absolute, symlinked or hard-linked locations are all
refused the same way), fields ONNX IR 10 does not define, tensors larger than
:data:`MAX_TENSOR_ELEMENTS` (sparse ones by their dense size, which onnxruntime
allocates) or whose data disagrees with their shape, and graphs that disagree
with the manifest. Every size is checked against the bytes that remain before
anything is read, and a model may hold at most :data:`MAX_FIELDS` fields, so a
crafted file can neither allocate nor keep the reader busy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from sourcefree.errors import PackageError
from sourcefree.package import strictjson
from sourcefree.package.manifest import (
    MAX_IR_VERSION,
    MAX_MANIFEST_BYTES,
    MAX_OPSET,
    MIN_IR_VERSION,
    MIN_OPSET,
    ONNX_MANIFEST_KEY,
    ONNX_NAME,
    AUDetectorSpec,
    Manifest,
)

# MIN/MAX_IR_VERSION and MIN/MAX_OPSET (the accepted ranges) live with the manifest schema.
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
        # ViT/DeiT (timm): the class token is broadcast to the batch by Expand.
        "Expand",
    }
)  # fmt: skip
#: The two ops of an int8 graph in QDQ format (``sourcefree optimize --int8``: onnxruntime's
#: ``quantize_static``, QuantFormat.QDQ): quantise a float tensor to 8 bits and back, around
#: the allowlisted ops above; onnxruntime fuses them into its integer kernels. Across the
#: seven registry architectures and timm's resnet, mobilenetv3 and vit, quantize_static
#: emits no other new op. Read by every graph walk (``audit`` summarises int8 packages),
#: accepted only where the manifest's ``onnx.precision`` is ``int8``.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
STANDARD_DOMAINS = ("", "ai.onnx")
#: Most elements one tensor may declare (2**28; a sparse tensor counts its dense size).
MAX_TENSOR_ELEMENTS = 1 << 28
#: Most elements all tensors of a model may declare together (2**29: 2 GiB of float32).
MAX_TOTAL_ELEMENTS = 1 << 29
#: Most dimensions of a tensor or a declared shape.
MAX_RANK = 32
MAX_NODES = 100_000
#: Most protobuf fields read in one model: bounds the pure-Python reader to seconds (an
#: exported graph needs about 50 per node, so MAX_NODES nodes fit twice over).
MAX_FIELDS = 10_000_000
#: Most distinct free strings collected for the audit.
MAX_TEXTS = 1_000_000
#: Deepest nesting of subgraphs, and of types in types.
MAX_DEPTH = 8
_FLOAT = 1
_UINT8 = 2
_INT8 = 3
_INT32 = 6
_INT64 = 7
_STRING = 8
_FLOAT16 = 10
#: Data types a package's tensors (initializers, attribute tensors) may have, as the SDK's
#: exporters write them: float32 weights, float16 weights (``--fp16`` graphs), int64 shapes
#: and axes (Reshape, Slice, Unsqueeze, ...). Everything else (strings, bool, float64,
#: 8-bit floats, 4-bit ints, complex, ...) is refused: no exported classifier holds it.
TENSOR_TYPES = {_FLOAT: "float32", _FLOAT16: "float16", _INT64: "int64"}
#: And in an int8 graph (QDQ) only: int8 weights and their zero points (per-channel, symmetric),
#: uint8 activation zero points (asymmetric activations), int32 biases (scale = input scale x
#: weight scale). The scales themselves are float32.
QDQ_TENSOR_TYPES = {_INT8: "int8", _UINT8: "uint8", _INT32: "int32"}
#: Longest prefix of a name quoted in an error message.
_QUOTE = 40

#: data_type -> (bits per element in raw_data, typed field, typed entries per element as
#: (numerator, denominator)); see TensorProto in onnx.proto.
_DTYPES: dict[int, tuple[int, int, int, int]] = {
    1: (32, 4, 1, 1), 2: (8, 5, 1, 1), 3: (8, 5, 1, 1), 4: (16, 5, 1, 1), 5: (16, 5, 1, 1),
    6: (32, 5, 1, 1), 7: (64, 7, 1, 1), 8: (0, 6, 1, 1), 9: (8, 5, 1, 1), 10: (16, 5, 1, 1),
    11: (64, 10, 1, 1), 12: (32, 11, 1, 1), 13: (64, 11, 1, 1), 14: (64, 4, 2, 1),
    15: (128, 10, 2, 1), 16: (16, 5, 1, 1), 17: (8, 5, 1, 1), 18: (8, 5, 1, 1),
    19: (8, 5, 1, 1), 20: (8, 5, 1, 1), 21: (4, 5, 1, 2), 22: (4, 5, 1, 2),
    23: (4, 5, 1, 2), 24: (8, 5, 1, 1), 25: (2, 5, 1, 4), 26: (2, 5, 1, 4),
    27: (6, 5, 1, 1), 28: (6, 5, 1, 1),
}  # fmt: skip
_TYPED_FIELDS = frozenset({4, 5, 6, 7, 10, 11})
_HIGH_BYTES = bytes(range(0x80, 0x100))
_LONG_VARINT = re.compile(rb"[\x80-\xff]{10}")

Value = int | memoryview


@dataclass(frozen=True)
class _Schema:
    """The fields of one protobuf message: number -> allowed wire types, repeated or not.

    Codes: ``i`` varint, ``b`` length-delimited, ``f`` fixed32; upper case: repeated
    (``I``, ``F``, ``D`` also packed, ``D`` is fixed64).
    """

    name: str
    codes: dict[int, str]


_WIRES = {
    "i": frozenset({0}), "b": frozenset({2}), "f": frozenset({5}), "B": frozenset({2}),
    "I": frozenset({0, 2}), "F": frozenset({5, 2}), "D": frozenset({1, 2}),
}  # fmt: skip
_MODEL = _Schema(
    "ModelProto",
    {1: "i", 2: "b", 3: "b", 4: "b", 5: "i", 6: "b", 7: "b", 8: "B", 14: "B", 20: "B", 25: "B"},
)
_OPSET_ID = _Schema("OperatorSetIdProto", {1: "b", 2: "i"})
_ENTRY = _Schema("StringStringEntryProto", {1: "b", 2: "b"})
_GRAPH = _Schema(
    "GraphProto",
    {1: "B", 2: "b", 5: "B", 15: "B", 10: "b", 11: "B", 12: "B", 13: "B", 14: "B", 16: "B"},
)
_ANNOTATION = _Schema("TensorAnnotation", {1: "b", 2: "B"})
_NODE = _Schema(
    "NodeProto", {1: "B", 2: "B", 3: "b", 4: "b", 5: "B", 6: "b", 7: "b", 8: "b", 9: "B"}
)
_ATTRIBUTE = _Schema(
    "AttributeProto",
    {
        1: "b", 21: "b", 13: "b", 20: "i", 2: "f", 3: "i", 4: "b", 5: "b", 6: "b", 22: "b",
        14: "b", 7: "F", 8: "I", 9: "B", 10: "B", 11: "B", 23: "B", 15: "B",
    },
)  # fmt: skip
_VALUE_INFO = _Schema("ValueInfoProto", {1: "b", 2: "b", 3: "b", 4: "B"})
_TYPE = _Schema("TypeProto", {1: "b", 4: "b", 5: "b", 6: "b", 7: "b", 8: "b", 9: "b"})
_TENSOR_TYPE = _Schema("TypeProto.Tensor", {1: "i", 2: "b"})
_ELEM_TYPE = _Schema("TypeProto.Sequence", {1: "b"})
_MAP_TYPE = _Schema("TypeProto.Map", {1: "i", 2: "b"})
_OPAQUE_TYPE = _Schema("TypeProto.Opaque", {1: "b", 2: "b"})
_SHAPE = _Schema("TensorShapeProto", {1: "B"})
_DIMENSION = _Schema("TensorShapeProto.Dimension", {1: "i", 2: "b", 3: "b"})
_TENSOR = _Schema(
    "TensorProto",
    {
        1: "I", 2: "i", 3: "b", 4: "F", 5: "I", 6: "B", 7: "I", 8: "b", 9: "b", 10: "D",
        11: "I", 12: "b", 13: "B", 14: "i", 16: "B",
    },
)  # fmt: skip
_SPARSE = _Schema("SparseTensorProto", {1: "b", 2: "b", 3: "I"})


def _bad(why: str) -> PackageError:
    return PackageError(f"{ONNX_NAME} is not a valid ONNX model", why, "re-export the package")


def _quote(text: str) -> str:
    """A short, escaped prefix of an untrusted string, for error messages."""
    return repr(text[:_QUOTE] + ("..." if len(text) > _QUOTE else ""))


def _names(names: list[str]) -> str:
    shown = ", ".join(_quote(n) for n in names[:3])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > 3 else ''}]"


def _shape(dims: list[int | str]) -> str:
    shown = ", ".join(str(d) if isinstance(d, int) else _quote(d) for d in dims[:8])
    return f"[{shown}{', ...' if len(dims) > 8 else ''}]"


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """Decode the varint at ``pos``: (value, next position); at most 10 bytes, 64 bits."""
    result = 0
    for i in range(10):
        if pos >= len(data):
            raise _bad("a varint runs past the end of its message")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if result >> 64:
                raise _bad("a varint exceeds 64 bits")
            return result, pos
    raise _bad("a varint is longer than 10 bytes")


def _signed(value: int) -> int:
    """An int64 from its varint (two's complement)."""
    return value - (1 << 64) if value >> 63 else value


def _expect_bytes(wire: int, value: Value, what: str) -> memoryview:
    """``value`` of a length-delimited field, or a typed error naming ``what``."""
    if wire != 2 or not isinstance(value, memoryview):
        raise _bad(f"{what} has wire type {wire}, not a length-delimited value")
    return value


def _expect_int(wire: int, value: Value, what: str) -> int:
    """``value`` of a varint field, or a typed error naming ``what``."""
    if wire != 0 or not isinstance(value, int):
        raise _bad(f"{what} has wire type {wire}, not a varint")
    return value


def _text(value: memoryview, what: str) -> str:
    """A name that must be UTF-8 (op types, domains, value and metadata names)."""
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"{what} is not UTF-8") from None


def _count_varints(data: memoryview, what: str) -> int:
    """How many varints a packed field holds, counted in C (a varint ends at a byte < 0x80)."""
    if len(data) and data[-1] & 0x80:
        raise _bad(f"{what} ends inside a varint")
    if _LONG_VARINT.search(data):
        raise _bad(f"{what} holds a varint longer than 10 bytes")
    count = 0
    step = 1 << 20
    for start in range(0, len(data), step):
        count += len(data[start : start + step].tobytes().translate(None, _HIGH_BYTES))
    return count


def _count_values(number: int, wire: int, value: Value, what: str) -> int:
    """How many values one occurrence of a typed data field (packed or not) carries."""
    if isinstance(value, int) or wire != 2 or number == 6:
        return 1  # one varint, fixed-size value or string
    if number in (4, 10):
        size = 4 if number == 4 else 8
        if len(value) % size:
            raise _bad(f"{what} has {len(value)} bytes of packed data, not a multiple of {size}")
        return len(value) // size
    return _count_varints(value, what)


@dataclass
class GraphSummary:
    """What the validator read from a model (also used by ``inspect`` and ``audit``)."""

    ir_version: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    duplicate_metadata: list[str] = field(default_factory=list)
    """Model metadata keys seen more than once (``metadata`` keeps the last value)."""
    inputs: dict[str, list[int | str]] = field(default_factory=dict)
    outputs: dict[str, list[int | str]] = field(default_factory=dict)
    input_types: dict[str, int] = field(default_factory=dict)
    initializer_names: set[str] = field(default_factory=set)
    tensor_types: dict[int, int] = field(default_factory=dict)
    """Tensors (initializers, attribute tensors, sparse parts) by data type."""
    doc_strings: int = 0
    node_metadata: int = 0
    sparse_tensors: int = 0
    """Sparse tensors anywhere (walked and bounded here; refused in packages)."""
    elements: int = 0
    """Elements declared by all tensors (sparse ones by their dense size)."""
    producer: str = ""
    texts: list[tuple[str, str]] = field(default_factory=list)
    """Every free string as (where, text), each pair once: names (graph, node, value,
    tensor, attribute, dim_param), doc strings, metadata entries on the graph, nodes,
    values and tensors (and shadowed model metadata), attribute and string-tensor
    values, producer and domain (read by ``audit``)."""


class _Walker:
    """One pass over a ModelProto: fills a :class:`GraphSummary`, refuses hazards."""

    def __init__(self) -> None:
        self.summary = GraphSummary()
        self.fields_left = MAX_FIELDS
        self.seen: set[tuple[str, str]] = set()

    def fields(self, data: memoryview, schema: _Schema) -> Iterator[tuple[int, int, Value]]:
        """(number, wire type, value) of each field; unknown, mistyped or repeated
        singular fields are refused, every size is checked before it is sliced."""
        pos, end = 0, len(data)
        singular: set[int] = set()
        while pos < end:
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            code = schema.codes.get(number)
            if code is None:
                raise _bad(f"{schema.name} has field {number}, which ONNX IR 10 does not define")
            if wire not in _WIRES[code]:
                raise _bad(f"field {number} of {schema.name} has the wrong wire type {wire}")
            if code.islower():
                if number in singular:
                    raise _bad(f"field {number} of {schema.name} appears twice")
                singular.add(number)
            self.fields_left -= 1
            if self.fields_left < 0:
                raise _bad(f"it has more than {MAX_FIELDS} protobuf fields")
            value: Value
            if wire == 0:
                value, pos = _varint(data, pos)
            else:
                if wire == 2:
                    size, pos = _varint(data, pos)
                else:
                    size = 8 if wire == 1 else 4
                if size > end - pos:
                    raise _bad(f"field {number} of {schema.name} runs past the end")
                value = data[pos : pos + size]
                pos += size
            yield number, wire, value

    def text(self, where: str, value: memoryview | str) -> None:
        """Record a free string for the audit (bad UTF-8 is replaced, not refused)."""
        text = value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
        if not text or (where, text) in self.seen:
            return
        if len(self.seen) >= MAX_TEXTS:
            raise _bad(f"it carries more than {MAX_TEXTS} distinct strings")
        self.seen.add((where, text))
        self.summary.texts.append((where, text))

    def doc(self, where: str, value: memoryview) -> None:
        if len(value):
            self.summary.doc_strings += 1
            self.text(where, value)

    def entry(self, data: memoryview, strict: bool = False) -> tuple[str, str]:
        """``(key, value)`` of a StringStringEntryProto; ``strict``: both must be UTF-8."""
        key = val = ""
        for number, wire, value in self.fields(data, _ENTRY):
            raw = _expect_bytes(wire, value, "a metadata entry")
            text = (
                _text(raw, "a metadata entry") if strict else bytes(raw).decode("utf-8", "replace")
            )
            key, val = (text, val) if number == 1 else (key, text)
        return key, val

    def metadata(self, where: str, data: memoryview) -> None:
        key, val = self.entry(data)
        self.text(where, f"{key}={val}")

    def model(self, data: memoryview) -> None:
        s = self.summary
        graphs = 0
        for number, wire, value in self.fields(data, _MODEL):
            if number == 1:
                s.ir_version = _signed(_expect_int(wire, value, "ir_version"))
                continue
            if number == 5:
                continue  # model_version: a number
            raw = _expect_bytes(wire, value, f"field {number} of ModelProto")
            if number == 2:
                s.producer = _text(raw, "the producer name")
                self.text("producer name", s.producer)
            elif number in (3, 4):
                self.text("producer version" if number == 3 else "domain", raw)
            elif number == 6:
                self.doc("model doc string", raw)
            elif number == 8:
                self.opset(raw)
            elif number == 14:
                self.model_metadata(raw)
            elif number == 7:
                graphs += 1
                self.graph(raw, 0, top=True)
            elif number == 20:
                raise _bad("it carries training information")
            elif number == 25:
                raise PackageError(
                    f"{ONNX_NAME} defines local functions",
                    "package graphs are flat, so every op can be checked",
                    "re-export the package with the SDK (functions are inlined)",
                )
        if graphs != 1 or s.ir_version == 0:
            raise _bad("it has no graph or no IR version")

    def opset(self, data: memoryview) -> None:
        domain, version = "", 0
        for number, wire, value in self.fields(data, _OPSET_ID):
            if number == 1:
                domain = _text(_expect_bytes(wire, value, "an opset domain"), "an opset domain")
            else:
                version = _signed(_expect_int(wire, value, "an opset version"))
        if domain in self.summary.opsets:
            raise _bad(f"it imports the op domain {_quote(domain)} twice")
        self.summary.opsets[domain] = version
        self.text("opset domain", domain)

    def model_metadata(self, data: memoryview) -> None:
        s = self.summary
        key, val = self.entry(data, strict=True)
        if key in s.metadata:
            if key not in s.duplicate_metadata:
                s.duplicate_metadata.append(key)
            self.text("model metadata (duplicate key)", f"{key}={s.metadata[key]}")
        s.metadata[key] = val

    def graph(self, data: memoryview, depth: int, top: bool) -> None:
        if depth > MAX_DEPTH:
            raise _bad("subgraphs are nested too deeply")
        s = self.summary
        inputs: list[tuple[str, list[int | str], int]] = []
        for number, wire, value in self.fields(data, _GRAPH):
            raw = _expect_bytes(wire, value, f"field {number} of GraphProto")
            if number == 1:
                self.node(raw, depth)
            elif number == 2:
                self.text("graph name", raw)
            elif number == 5:
                name = self.tensor(raw, "an initializer")[0]
                if top:
                    s.initializer_names.add(name)
            elif number == 15:
                self.sparse(raw)
            elif number == 10:
                self.doc("graph doc string", raw)
            elif number == 14:
                self.annotation(raw)
            elif number == 16:
                s.node_metadata += 1
                self.metadata("graph metadata", raw)
            else:  # 11, 12, 13: inputs, outputs, value_info
                name, dims, elem = self.value_info(raw)
                if top and number == 11:
                    if any(name == n for n, _, _ in inputs):
                        raise _bad(f"two graph inputs are named {_quote(name)}")
                    inputs.append((name, dims, elem))
                elif top and number == 12:
                    if name in s.outputs:
                        raise _bad(f"two graph outputs are named {_quote(name)}")
                    s.outputs[name] = dims
                    s.input_types[f"output:{name}"] = elem
        for name, dims, elem in inputs:
            if name not in s.initializer_names:
                s.inputs[name] = dims
                s.input_types[name] = elem

    def annotation(self, data: memoryview) -> None:
        for number, wire, value in self.fields(data, _ANNOTATION):
            raw = _expect_bytes(wire, value, "a quantization annotation")
            if number == 1:
                self.text("quantization annotation", raw)
            else:
                self.metadata("quantization annotation", raw)

    def node(self, data: memoryview, depth: int) -> None:
        s = self.summary
        op = domain = ""
        subgraphs: list[memoryview] = []
        for number, wire, value in self.fields(data, _NODE):
            raw = _expect_bytes(wire, value, f"field {number} of NodeProto")
            if number in (1, 2):
                self.text("value name", raw)
            elif number == 3:
                self.text("node name", raw)
            elif number == 4:
                op = _text(raw, "an op type")
            elif number == 7:
                domain = _text(raw, "an op domain")
            elif number == 8:
                self.text("node overload", raw)
            elif number == 5:
                subgraphs += self.attribute(raw)
            elif number == 6:
                self.doc("node doc string", raw)
            else:  # 9
                s.node_metadata += 1
                self.metadata("node metadata", raw)
        if domain not in STANDARD_DOMAINS:
            raise PackageError(
                f"{ONNX_NAME} uses op {_quote(op)} from the custom domain {_quote(domain)}",
                "custom domains need native code that a package must never bring",
                "export with standard ONNX ops only",
            )
        if op not in ALLOWED_OPS and op not in QDQ_OPS:
            raise PackageError(
                f"{ONNX_NAME} uses the op {_quote(op)}, which is not on the allowlist",
                "packages may use the standard ops an image classifier needs "
                "(see docs/package-format.md)",
                "export a standard architecture, or ask us to review the op",
            )
        s.ops[op] = s.ops.get(op, 0) + 1
        if sum(s.ops.values()) > MAX_NODES:
            raise _bad(f"the graph has more than {MAX_NODES} nodes")
        for sub in subgraphs:
            self.graph(sub, depth + 1, top=False)

    def attribute(self, data: memoryview) -> list[memoryview]:
        """Walk one AttributeProto (every tensor, string and type); return its subgraphs."""
        graphs: list[memoryview] = []
        for number, wire, value in self.fields(data, _ATTRIBUTE):
            if number in (2, 3, 7, 8, 20):
                continue  # f, i, floats, ints, type: numbers
            raw = _expect_bytes(wire, value, f"field {number} of AttributeProto")
            if number == 1:
                self.text("attribute name", raw)
            elif number == 21:
                self.text("attribute reference", raw)
            elif number == 13:
                self.doc("attribute doc string", raw)
            elif number in (4, 9):
                self.text("attribute string", raw)
            elif number in (5, 10):
                self.tensor(raw, "an attribute tensor")
            elif number in (22, 23):
                self.sparse(raw)
            elif number in (6, 11):
                graphs.append(raw)
            else:  # 14, 15: type protos
                self.type(raw, 0)
        return graphs

    def value_info(self, data: memoryview) -> tuple[str, list[int | str], int]:
        name = ""
        dims: list[int | str] = []
        elem = 0
        for number, wire, value in self.fields(data, _VALUE_INFO):
            raw = _expect_bytes(wire, value, f"field {number} of ValueInfoProto")
            if number == 1:
                name = _text(raw, "a value name")
                self.text("value name", name)
            elif number == 2:
                dims, elem = self.type(raw, 0)
            elif number == 3:
                self.doc("value doc string", raw)
            else:  # 4
                self.metadata("value metadata", raw)
        return name, dims, elem

    def type(self, data: memoryview, depth: int) -> tuple[list[int | str], int]:
        """Walk a TypeProto; return (dims, element type) when it is a dense tensor type."""
        if depth > MAX_DEPTH:
            raise _bad("types are nested too deeply")
        dims: list[int | str] = []
        elem = 0
        kinds = 0
        for number, wire, value in self.fields(data, _TYPE):
            raw = _expect_bytes(wire, value, f"field {number} of TypeProto")
            if number == 6:
                self.text("type denotation", raw)
                continue
            kinds += 1
            if number in (1, 8):
                tensor = self.tensor_type(raw)
                dims, elem = tensor if number == 1 else ([], 0)
            elif number == 7:
                for _, ow, ov in self.fields(raw, _OPAQUE_TYPE):
                    self.text("opaque type", _expect_bytes(ow, ov, "an opaque type"))
            else:  # 4, 9: sequence and optional; 5: map
                for mn, mw, mv in self.fields(raw, _MAP_TYPE if number == 5 else _ELEM_TYPE):
                    if mn == 2 or number != 5:
                        self.type(_expect_bytes(mw, mv, "an element type"), depth + 1)
        if kinds > 1:
            raise _bad("a type is of more than one kind")
        return dims, elem

    def tensor_type(self, data: memoryview) -> tuple[list[int | str], int]:
        dims: list[int | str] = []
        elem = 0
        for number, wire, value in self.fields(data, _TENSOR_TYPE):
            if number == 1:
                elem = _expect_int(wire, value, "an element type")
                continue
            for _, sw, sv in self.fields(_expect_bytes(wire, value, "a shape"), _SHAPE):
                dim: int | str = "?"
                for dn, dw, dv in self.fields(_expect_bytes(sw, sv, "a dimension"), _DIMENSION):
                    if dn == 1:
                        dim = _signed(_expect_int(dw, dv, "dim_value"))
                    elif dn == 2:
                        dim = _text(_expect_bytes(dw, dv, "dim_param"), "a dim_param")
                        self.text("dim param", dim)
                    else:
                        self.text("dim denotation", _expect_bytes(dw, dv, "a denotation"))
                dims.append(dim)
                if len(dims) > MAX_RANK:
                    raise _bad(f"a shape has more than {MAX_RANK} dimensions")
        return dims, elem

    def tensor(self, data: memoryview, what: str) -> tuple[str, list[int], int]:
        """Check one TensorProto: no external data, bounded dims, data matching the dims.

        Returns (name, dims, data type).
        """
        name = ""
        dims: list[int] = []
        dtype = 0
        raw: memoryview | None = None
        typed: dict[int, int] = {}
        for number, wire, value in self.fields(data, _TENSOR):
            if number == 1:
                self.dims(dims, wire, value, what)
            elif number == 2:
                dtype = _expect_int(wire, value, "a tensor data type")
            elif number in (13, 14) and (number == 13 or value != 0):
                raise PackageError(
                    f"{ONNX_NAME} refers to external tensor data",
                    "package graphs must be self-contained; external files could point "
                    "outside the package (../, absolute paths, symlinks, hard links) or "
                    "read a file of the current directory into the model",
                    "re-export the package as a single ONNX file (models under 2 GB)",
                )
            elif number == 3:
                raise _bad(f"{what} is split into segments")
            elif number in _TYPED_FIELDS:
                typed[number] = typed.get(number, 0) + _count_values(number, wire, value, what)
                if number == 6:
                    self.text("string data", _expect_bytes(wire, value, "string_data"))
            elif number == 9:
                raw = _expect_bytes(wire, value, "raw_data")
            elif number == 8:
                name = _text(_expect_bytes(wire, value, "a tensor name"), "a tensor name")
                self.text("tensor name", name)
            elif number == 12:
                self.doc("tensor doc string", _expect_bytes(wire, value, "a doc string"))
            elif number == 16:
                self.metadata("tensor metadata", _expect_bytes(wire, value, "metadata"))
        count = self.elements(dims, what)
        _check_data(dtype, count, raw, typed, what)
        self.summary.tensor_types[dtype] = self.summary.tensor_types.get(dtype, 0) + 1
        return name, dims, dtype

    def dims(self, dims: list[int], wire: int, value: Value, what: str) -> None:
        """Append one dims field (a varint, or packed varints) to ``dims``, bounded in number."""
        pos = 0
        while isinstance(value, int) or pos < len(value):
            if len(dims) >= MAX_RANK:
                raise _bad(f"{what} has more than {MAX_RANK} dimensions")
            if isinstance(value, int):
                dims.append(_signed(value))
                return
            dim, pos = _varint(value, pos)
            dims.append(_signed(dim))

    def elements(self, dims: list[int], what: str) -> int:
        """Elements declared by ``dims``, counted against the per-tensor and total caps."""
        if len(dims) > MAX_RANK:
            raise _bad(f"{what} has more than {MAX_RANK} dimensions")
        count = 1
        for dim in dims:
            if dim < 0 or dim > MAX_TENSOR_ELEMENTS:
                raise _bad(f"{what} has dimension {dim}")
            count *= dim
        if count > MAX_TENSOR_ELEMENTS:
            raise _bad(
                f"{what} declares {count} elements (at most {MAX_TENSOR_ELEMENTS} per tensor)"
            )
        self.summary.elements += count
        if self.summary.elements > MAX_TOTAL_ELEMENTS:
            raise _bad(f"its tensors declare more than {MAX_TOTAL_ELEMENTS} elements in total")
        return count

    def sparse(self, data: memoryview) -> None:
        """Check a SparseTensorProto like a dense one: its dense size counts (onnxruntime
        densifies it), values are ``[nnz]``, indices int64 ``[nnz]`` or ``[nnz, rank]``."""
        self.summary.sparse_tensors += 1
        dims: list[int] = []
        values: list[int] | None = None
        indices: tuple[list[int], int] | None = None
        for number, wire, value in self.fields(data, _SPARSE):
            if number == 3:
                self.dims(dims, wire, value, "a sparse tensor")
                continue
            raw = _expect_bytes(wire, value, f"field {number} of SparseTensorProto")
            if number == 1:
                values = self.tensor(raw, "a sparse tensor's values")[1]
            else:
                _, idims, itype = self.tensor(raw, "a sparse tensor's indices")
                indices = (idims, itype)
        dense = self.elements(dims, "a sparse tensor")
        if values is None or indices is None or not dims:
            raise _bad("a sparse tensor lacks its values, indices or dims")
        if len(values) != 1:
            raise _bad(f"a sparse tensor's values have {len(values)} dimensions, not 1")
        nnz = values[0]
        if nnz > dense:
            raise _bad(f"a sparse tensor has {nnz} values for {dense} elements")
        if indices[1] != _INT64 or indices[0] not in ([nnz], [nnz, len(dims)]):
            raise _bad(f"a sparse tensor's indices are not int64 [{nnz}] or [{nnz}, {len(dims)}]")


def _check_data(
    dtype: int, count: int, raw: memoryview | None, typed: dict[int, int], what: str
) -> None:
    """Refuse tensor data that disagrees with the tensor's type and ``count`` elements."""
    spec = _DTYPES.get(dtype)
    if spec is None:
        raise _bad(f"{what} has the unknown data type {dtype}")
    bits, data_field, num, den = spec
    if raw is not None and typed:
        raise _bad(f"{what} carries both raw_data and typed data")
    if any(number != data_field for number in typed):
        raise _bad(f"{what} carries data in a field its data type {dtype} does not use")
    if raw is not None:
        if dtype == _STRING:
            raise _bad(f"{what} is a string tensor with raw_data")
        want = (count * bits + 7) // 8
        if len(raw) != want:
            raise _bad(f"{what} declares {count} elements ({want} bytes) but has {len(raw)} bytes")
        return
    want = (count * num + den - 1) // den
    have = typed.get(data_field, 0)
    if have != want:
        raise _bad(f"{what} declares {count} elements but carries {have} values ({want} expected)")


def summarize(data: bytes) -> GraphSummary:
    """Read a serialised ModelProto; refuse structural hazards while reading.

    Sparse tensors are walked and bounded but not refused here (``audit`` summarises
    packages that fail verification); :func:`check_model` refuses them.
    """
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        raise PackageError(
            f"{ONNX_NAME} is a pickle or zip archive, not an ONNX model",
            "such files can run code when loaded and are never read",
            "export the model to ONNX with `sourcefree export`",
        )
    walker = _Walker()
    walker.model(memoryview(data))
    return walker.summary


def _check_precision(summary: GraphSummary, name: str, precision: str) -> None:
    """QDQ ops and 8/32-bit integer tensors in int8 graphs only; known tensor types only."""
    int8 = precision == "int8"
    qdq = sorted(op for op in summary.ops if op in QDQ_OPS)
    if qdq and not int8:
        raise PackageError(
            f"{name} uses the op {qdq[0]}, but its precision is {precision}",
            "quantise/dequantise ops belong to int8 graphs (onnx.precision int8), "
            "which `sourcefree optimize --int8` writes",
            "re-export the package with the SDK, or optimize its fp32 package with --int8",
        )
    allowed = {**TENSOR_TYPES, **(QDQ_TENSOR_TYPES if int8 else {})}
    for dtype in sorted(set(summary.tensor_types) - set(allowed)):
        kind = QDQ_TENSOR_TYPES.get(dtype, f"data type {dtype}")
        raise PackageError(
            f"{name} holds a tensor of {kind}",
            f"{precision} graphs hold {', '.join(allowed.values())} tensors only"
            + ("" if int8 else "; 8-bit and int32 tensors belong to int8 graphs"),
            "re-export the package with the SDK",
        )


def _check_graph(
    summary: GraphSummary, name: str, manifest: Manifest, input_name: str, precision: str
) -> None:
    """What every graph of a package satisfies: no sparse tensors or duplicate metadata,
    a supported IR version and opset equal to the manifest's, standard domains only, ops
    and tensor types of its ``precision``, and one float32 input
    ``[batch, channels, height, width]`` with a dynamic batch."""
    onnx = manifest.onnx

    def refuse(what: str, why: str, fix: str = "re-export the package with the SDK") -> None:
        raise PackageError(f"{name} {what}", why, fix)

    if summary.sparse_tensors:
        refuse(
            f"holds {summary.sparse_tensors} sparse tensor(s)",
            "no exporter of this SDK writes them and onnxruntime densifies them at load",
        )
    if summary.duplicate_metadata:
        refuse(
            f"repeats the metadata key {_quote(summary.duplicate_metadata[0])}",
            "a reader would keep only one of the values; which one is not defined",
        )
    ir = summary.ir_version
    if not MIN_IR_VERSION <= ir <= MAX_IR_VERSION or ir != onnx.ir_version:
        refuse(
            f"has IR version {ir}",
            f"this SDK reads IR versions {MIN_IR_VERSION} to {MAX_IR_VERSION} and the "
            f"package's graphs use {onnx.ir_version}",
        )
    for domain, version in summary.opsets.items():
        if domain not in STANDARD_DOMAINS:
            refuse(
                f"imports the custom op domain {_quote(domain)}",
                "custom domains need native code that a package must never bring",
                "export with standard ONNX ops only",
            )
        if not MIN_OPSET <= version <= MAX_OPSET or version != onnx.opset:
            refuse(
                f"uses opset {version}",
                f"this SDK supports opsets {MIN_OPSET} to {MAX_OPSET} and the manifest says "
                f"{onnx.opset}",
            )
    if len(summary.opsets) != 1:
        refuse(
            f"imports the default op domain {len(summary.opsets)} times",
            "a graph imports the standard domain ('' or 'ai.onnx') exactly once",
        )
    if list(summary.inputs) != [input_name]:
        refuse(
            f"has inputs {_names(list(summary.inputs))}",
            f"the manifest expects exactly one input named {input_name!r}",
        )
    height, width = manifest.input.size
    dims = summary.inputs[input_name]
    channels = manifest.input.channels
    if len(dims) != 4 or isinstance(dims[0], int) or dims[1:] != [channels, height, width]:
        refuse(
            f"input has shape {_shape(dims)}",
            f"the manifest's input spec needs [batch, {channels}, {height}, {width}] "
            "with a dynamic batch",
        )
    if summary.input_types[input_name] != _FLOAT:
        refuse("input is not float32", "the runtime feeds float32")
    _check_precision(summary, name, precision)


def _check_output(summary: GraphSummary, what: str, output: str, width: int, why: str) -> None:
    """``output`` is float32 ``[batch, width]`` with a dynamic batch (``what`` names it)."""
    dims = summary.outputs[output]
    if len(dims) != 2 or isinstance(dims[0], int) or dims[1] != width:
        raise PackageError(
            f"{what} has shape {_shape(dims)}",
            f"{why}: [batch, {width}] with a dynamic batch is expected",
            "re-export the package with the SDK",
        )
    if summary.input_types.get(f"output:{output}") != _FLOAT:
        raise PackageError(
            f"{what} is not float32",
            "the runtime reads float32 outputs (fp16 graphs keep float32 outputs)",
            "re-export the package with the SDK",
        )


def check_model(data: bytes, manifest: Manifest) -> GraphSummary:
    """Validate the graph against the manifest's ``onnx`` and ``input`` contracts."""
    summary = summarize(data)
    spec = manifest.onnx
    _check_graph(summary, ONNX_NAME, manifest, spec.input, spec.precision)
    for out in (spec.logits, spec.features):
        if out not in summary.outputs:
            raise PackageError(
                f"{ONNX_NAME} has no output named {out!r}",
                f"outputs are {_names(sorted(summary.outputs))}",
                "re-export the package with the SDK",
            )
    labels = len(manifest.labels)
    for out, width, why in (
        (spec.logits, labels, f"the manifest has {labels} labels"),
        (spec.features, manifest.architecture.feature_dim, "that is the feature_dim"),
    ):
        _check_output(summary, f"{ONNX_NAME} output {out!r}", out, width, why)
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
            f"{ONNX_NAME} carries unexpected metadata key {_quote(extra[0])}",
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
    no functions, training info, sparse tensors or external data, IR version and
    opset of the package), the classifier's input contract, exactly one output of
    shape ``[batch, len(au_names)]``, and no metadata at all (the manifest describes it).
    """
    name = spec.file
    summary = summarize_auxiliary(data, name)
    _check_graph(summary, name, manifest, spec.input, "fp32")  # auxiliary graphs are fp32
    if list(summary.outputs) != [spec.output]:
        raise PackageError(
            f"{name} has outputs {_names(list(summary.outputs))}",
            f"the manifest expects exactly one output named {spec.output!r}",
            "re-export the package with the SDK",
        )
    count = len(spec.au_names)
    why = f"the manifest names {count} action units"
    _check_output(summary, f"{name} output", spec.output, count, why)
    if summary.metadata:
        raise PackageError(
            f"{name} carries metadata key {_quote(sorted(summary.metadata)[0])}",
            "an auxiliary graph carries no metadata; the manifest describes it",
            "re-export the package with the SDK",
        )
    return summary
