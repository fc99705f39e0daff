"""Hostile ONNX graphs with valid hashes: every one is a typed error, none allocates.

The red team's cases: external data reached through sparse tensors and attributes
(a file of the current directory read into the logits), fields of the wrong wire
type (``bytes(2**33)``), sparse tensors whose dense size is gigabytes, and graphs
onnxruntime would refuse only later. Plus: every string reaches the audit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from sourcefree import PackageError, load_package
from sourcefree.cli.app import main
from sourcefree.package import onnx_check
from sourcefree.package.audit import audit_package
from sourcefree.package.manifest import ONNX_MANIFEST_KEY, ONNX_NAME, Manifest
from sourcefree.package.onnx_check import (
    MAX_TENSOR_ELEMENTS,
    MAX_TOTAL_ELEMENTS,
    summarize,
)
from tests import protobuf_bytes as pb

Forge = Callable[[Path, str, bytes], None]


# -- models ----------------------------------------------------------------------


def _model(pkg: Path) -> Any:
    return onnx.load_model_from_string((pkg / ONNX_NAME).read_bytes())


def _external(name: str, count: int, location: str = "secret.txt") -> Any:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[count])
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _indices(count: int) -> Any:
    return helper.make_tensor("idx", TensorProto.INT64, [count], list(range(count)))


def _sparse(dims: list[int], nnz: int = 0) -> Any:
    values = helper.make_tensor("sparse_values", TensorProto.FLOAT, [nnz], [1.0] * nnz)
    return helper.make_sparse_tensor(values, _indices(nnz), dims)


def _verify(pkg: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["verify", str(pkg)], catch_exceptions=False)
    return result.exit_code, result.output


def _leaky_package(pkg: Path, forge: Forge, constant: Any) -> None:
    """Rewire the logits through ``logits_raw + leak``, ``leak`` made by ``constant``."""
    model = _model(pkg)
    for node in model.graph.node:
        for i, out in enumerate(node.output):
            if out == "logits":
                node.output[i] = "logits_raw"
    model.graph.node.extend([constant, helper.make_node("Add", ["logits_raw", "leak"], ["logits"])])
    forge(pkg, ONNX_NAME, model.SerializeToString())


# -- (a) external data anywhere --------------------------------------------------


def _sparse_value(model: Any) -> None:
    sparse = helper.make_sparse_tensor(_external("leak", 3), _indices(3), [3])
    model.graph.node.append(helper.make_node("Constant", [], ["leak"], sparse_value=sparse))


def _sparse_tensors_attribute(model: Any) -> None:
    sparse = helper.make_sparse_tensor(_external("leak", 3), _indices(3), [3])
    attr = helper.make_attribute("evil", [sparse])
    assert attr.type == onnx.AttributeProto.SPARSE_TENSORS
    model.graph.node[1].attribute.append(attr)


def _external_indices(model: Any) -> None:
    indices = TensorProto(name="idx", data_type=TensorProto.INT64, dims=[3])
    indices.data_location = TensorProto.EXTERNAL
    sparse = helper.make_sparse_tensor(helper.make_tensor("v", 1, [3], [1, 2, 3]), indices, [3])
    model.graph.node.append(helper.make_node("Constant", [], ["leak"], sparse_value=sparse))


def _sparse_initializer(model: Any) -> None:
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(_external("leak", 3), _indices(3), [3])
    )


def _tensors_attribute(model: Any) -> None:
    model.graph.node[1].attribute.append(helper.make_attribute("evil", [_external("leak", 3)]))


def _subgraph(model: Any) -> None:
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["leak"], value=_external("leak", 3))],
        "body",
        [],
        [helper.make_tensor_value_info("leak", TensorProto.FLOAT, [3])],
    )
    model.graph.node[1].attribute.append(helper.make_attribute("body", body))


def _location_flag_only(model: Any) -> None:
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL


@pytest.mark.parametrize(
    "edit",
    [
        _sparse_value,
        _sparse_tensors_attribute,
        _external_indices,
        _sparse_initializer,
        _tensors_attribute,
        _subgraph,
        _location_flag_only,
    ],
)
def test_external_data_is_refused_wherever_it_hides(
    source_pkg: Path, edit: Callable[[Any], None]
) -> None:
    model = _model(source_pkg)
    edit(model)
    with pytest.raises(PackageError, match="refers to external tensor data"):
        summarize(model.SerializeToString())


def test_secret_file_in_current_directory_never_reaches_the_logits(
    pkg_copy: Path, forge: Forge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime 1.31 resolves this location against the CWD when loading from bytes
    and adds the file's bytes to the logits; verify must refuse it first."""
    sparse = helper.make_sparse_tensor(_external("leak", 3), _indices(3), [3])
    _leaky_package(pkg_copy, forge, helper.make_node("Constant", [], ["leak"], sparse_value=sparse))
    (tmp_path / "secret.txt").write_bytes(b"ABCDEFGHIJKL")
    monkeypatch.chdir(tmp_path)
    code, out = _verify(pkg_copy)
    assert code == 2 and "refers to external tensor data" in out
    assert "Traceback" not in out
    with pytest.raises(PackageError, match="refers to external tensor data"):
        load_package(pkg_copy)


# -- (b) the protobuf reader ------------------------------------------------------

_BIG = 1 << 33  # bytes(2**33) would allocate 8 GiB

_WRONG_WIRE = {
    "producer name as varint": pb.varint_field(2, _BIG),
    "opset domain as varint": pb.ld(8, pb.varint_field(1, _BIG)),
    "metadata key as varint": pb.ld(14, pb.varint_field(1, _BIG)),
    "graph as varint": pb.varint_field(7, _BIG),
    "graph doc string as varint": pb.ld(7, pb.varint_field(10, _BIG)),
    "node as varint": pb.ld(7, pb.varint_field(1, _BIG)),
    "node name as varint": pb.ld(7, pb.ld(1, pb.varint_field(3, _BIG))),
    "attribute name as varint": pb.ld(7, pb.ld(1, pb.ld(5, pb.varint_field(1, _BIG)))),
    "tensor name as varint": pb.ld(7, pb.ld(5, pb.varint_field(8, _BIG))),
    "raw_data as varint": pb.ld(7, pb.ld(5, pb.varint_field(9, _BIG))),
    "value name as varint": pb.ld(7, pb.ld(11, pb.varint_field(1, _BIG))),
    "ir_version as bytes": pb.ld(1, b"\x0a"),
    "dims as fixed64": pb.ld(7, pb.ld(5, pb.key(1, 1) + bytes(8))),
}


@pytest.mark.parametrize("payload", list(_WRONG_WIRE.values()), ids=list(_WRONG_WIRE))
def test_wrong_wire_type_is_a_typed_error(payload: bytes) -> None:
    with pytest.raises(PackageError, match="wrong wire type"):
        summarize(b"\x08\x0a" + payload)


@pytest.mark.parametrize(
    "name", ["metadata key as varint", "tensor name as varint", "value name as varint"]
)
def test_wrong_wire_type_does_not_allocate(name: str) -> None:
    """Under an address-space limit 1 GiB above what Python holds, bytes(2**33) fails."""
    script = textwrap.dedent(
        """
        import resource, sys
        from sourcefree.errors import PackageError
        from sourcefree.package.onnx_check import summarize
        status = open("/proc/self/status").read()
        held = int(status.split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (held + (1 << 30), held + (1 << 30)))
        try:
            summarize(bytes.fromhex(sys.argv[1]))
        except PackageError as exc:
            print("refused:", exc)
        """
    )
    payload = b"\x08\x0a" + _WRONG_WIRE[name]
    assert len(payload) <= 12
    proc = subprocess.run(
        [sys.executable, "-c", script, payload.hex()], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "wrong wire type" in proc.stdout


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x28" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x28" + b"\xff" * 9 + b"\x7f", "exceeds 64 bits"),
        (pb.key(7, 2) + pb.varint(1 << 40), "runs past the end"),
        (pb.varint_field(99, 1), "field 99"),
        (
            pb.ld(7, pb.ld(5, pb.ld(1, b"".join(pb.varint(1) for _ in range(1000))))),
            "more than 32 dim",
        ),
        (
            pb.ld(7, pb.ld(5, b"".join(pb.varint_field(1, 1) for _ in range(40)))),
            "more than 32 dim",
        ),
        (pb.ld(7, pb.ld(5, pb.ld(7, b"\x81")) + pb.ld(5, b"")), "ends inside a varint"),
    ],
    ids=[
        "11-byte varint",
        "65-bit varint",
        "length past end",
        "unknown field",
        "packed rank",
        "unpacked rank",
        "packed",
    ],
)
def test_reader_bounds(payload: bytes, message: str) -> None:
    with pytest.raises(PackageError, match=message):
        summarize(b"\x08\x0a" + payload)


def test_repeated_singular_field_is_refused(source_pkg: Path) -> None:
    """Protobuf would merge two graphs (or two tensors) into one the reader never saw."""
    data = (source_pkg / ONNX_NAME).read_bytes()
    with pytest.raises(PackageError, match="Field 7 of ModelProto appears twice"):
        summarize(data + pb.ld(7, b""))


def test_field_budget_bounds_the_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_check, "MAX_FIELDS", 1000)
    node = b"".join(pb.ld(1, b"x") for _ in range(2000))
    with pytest.raises(PackageError, match="more than 1000 protobuf fields"):
        summarize(b"\x08\x0a" + pb.ld(7, pb.ld(1, node)))


def test_error_messages_quote_a_short_prefix(source_pkg: Path) -> None:
    model = _model(source_pkg)
    model.graph.node[1].op_type = "Evil" + "x" * 10_000
    with pytest.raises(PackageError) as info:
        summarize(model.SerializeToString())
    assert "'Evilxxxx" in str(info.value) and len(str(info.value)) < 400


# -- (c) sizes: sparse dense size, caps, data against dims -------------------------


def test_huge_sparse_initializer_is_refused(source_pkg: Path) -> None:
    model = _model(source_pkg)
    model.graph.sparse_initializer.append(_sparse([1 << 20, 1 << 20]))
    with pytest.raises(PackageError, match=f"declares {1 << 40} elements"):
        summarize(model.SerializeToString())


def test_caps_per_tensor_and_in_total(source_pkg: Path) -> None:
    """Up to the caps a model is read (sparse tensors count their dense size)."""
    model = _model(source_pkg)
    below = MAX_TOTAL_ELEMENTS - MAX_TENSOR_ELEMENTS - (1 << 20)
    model.graph.sparse_initializer.extend([_sparse([MAX_TENSOR_ELEMENTS]), _sparse([below])])
    summary = summarize(model.SerializeToString())
    assert summary.sparse_tensors == 2
    assert MAX_TOTAL_ELEMENTS - (1 << 20) < summary.elements <= MAX_TOTAL_ELEMENTS
    model.graph.sparse_initializer.append(_sparse([1 << 20]))
    with pytest.raises(PackageError, match=f"more than {MAX_TOTAL_ELEMENTS} elements in total"):
        summarize(model.SerializeToString())


def test_elements_are_counted(source_pkg: Path) -> None:
    model = _model(source_pkg)
    want = 0
    for init in model.graph.initializer:
        count = 1
        for d in init.dims:
            count *= d
        want += count
    assert summarize(model.SerializeToString()).elements == want


def _constant(dims: list[int]) -> Any:
    tensor = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=dims)
    return helper.make_node("Constant", [], ["c"], value=tensor)


def _initializer(**fields: Any) -> Any:
    return TensorProto(name="extra", **fields)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (_constant([1 << 20, 1 << 20]), "declares 1099511627776 elements"),
        (_initializer(data_type=1, dims=[1 << 14, (1 << 14) + 1]), "at most 268435456 per"),
        (_initializer(data_type=1, dims=[MAX_TENSOR_ELEMENTS + 1]), "dimension 268435457"),
        (_initializer(data_type=1, dims=[-1]), "dimension -1"),
        (_initializer(data_type=1, dims=[4], raw_data=bytes(12)), "16 bytes.*has 12 bytes"),
        (_initializer(data_type=1, dims=[4], float_data=[1, 2, 3]), "carries 3 values"),
        (_initializer(data_type=1, dims=[4]), "carries 0 values"),
        (_initializer(data_type=7, dims=[4], int64_data=[1, 2, 3]), "carries 3 values"),
        (_initializer(data_type=7, dims=[1], float_data=[1]), "does not use"),
        (_initializer(data_type=1, dims=[1], float_data=[1], raw_data=bytes(4)), "both"),
        (_initializer(data_type=99, dims=[1], raw_data=b"x"), "unknown data type 99"),
        (_initializer(data_type=8, dims=[1], raw_data=b"x"), "string tensor with raw_data"),
    ],
    ids=[
        "constant",
        "per-tensor cap",
        "one dimension",
        "negative",
        "raw size",
        "float count",
        "no data",
        "packed int64 count",
        "wrong field",
        "raw and typed",
        "unknown type",
        "raw string",
    ],
)
def test_dense_tensor_must_match_its_dims(source_pkg: Path, item: Any, message: str) -> None:
    model = _model(source_pkg)
    if isinstance(item, onnx.NodeProto):
        model.graph.node.append(item)
    else:
        model.graph.initializer.append(item)
    with pytest.raises(PackageError, match=message):
        summarize(model.SerializeToString())


def _bad_sparse(kind: str) -> Any:
    values = helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0])
    indices = helper.make_tensor("i", TensorProto.INT64, [2], [0, 1])
    dims = [4]
    if kind == "2-D values":
        values = helper.make_tensor("v", TensorProto.FLOAT, [1, 2], [1.0, 2.0])
    elif kind == "too many values":
        dims = [1]
    elif kind == "int32 indices":
        indices = helper.make_tensor("i", TensorProto.INT32, [2], [0, 1])
    elif kind == "indices rank":
        dims = [2, 2]
        indices = helper.make_tensor("i", TensorProto.INT64, [2, 3], [0] * 6)
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(values)
    sparse.indices.CopyFrom(indices)
    if kind != "no dims":
        sparse.dims.extend(dims)
    return sparse


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("2-D values", "values have 2 dimensions"),
        ("too many values", "has 2 values for 1 elements"),
        ("int32 indices", "indices are not int64"),
        ("indices rank", r"not int64 \[2\] or \[2, 2\]"),
        ("no dims", "lacks its values, indices or dims"),
    ],
)
def test_sparse_tensor_must_be_consistent(source_pkg: Path, kind: str, message: str) -> None:
    model = _model(source_pkg)
    model.graph.sparse_initializer.append(_bad_sparse(kind))
    with pytest.raises(PackageError, match=message):
        summarize(model.SerializeToString())


def test_sparse_tensors_are_refused_in_packages_but_audited(pkg_copy: Path, forge: Forge) -> None:
    model = _model(pkg_copy)
    sparse = _sparse([3], nnz=1)
    model.graph.node.append(helper.make_node("Constant", [], ["unused"], sparse_value=sparse))
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    assert summarize((pkg_copy / ONNX_NAME).read_bytes()).sparse_tensors == 1
    with pytest.raises(PackageError, match="holds 1 sparse tensor"):
        load_package(pkg_copy)
    report = audit_package(pkg_copy)
    assert report.onnx is not None and report.onnx["sparse_tensors"] == 1
    assert {f.kind for f in report.findings} >= {"unverified", "sparse-tensor"}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("wire", id="wrong wire type"),
        pytest.param("sparse", id="huge sparse dims"),
    ],
)
def test_verify_refuses_hostile_graphs_with_exit_2(
    pkg_copy: Path, forge: Forge, payload: str
) -> None:
    if payload == "wire":
        data = b"\x08\x0a" + _WRONG_WIRE["metadata key as varint"]
        message = "wrong wire type"
    else:
        model = _model(pkg_copy)
        model.graph.sparse_initializer.append(_sparse([1 << 20, 1 << 20]))
        data = model.SerializeToString()
        message = f"declares {1 << 40} elements"
    forge(pkg_copy, ONNX_NAME, data)
    code, out = _verify(pkg_copy)
    assert code == 2 and out.startswith("error:") and message in out, out
    assert "Traceback" not in out


# -- (3) what onnxruntime would refuse later ---------------------------------------


def _set_dim(name: str, dim: int, value: int) -> Callable[[Any], None]:
    def edit(model: Any) -> None:
        for info in [*model.graph.input, *model.graph.output]:
            if info.name == name:
                info.type.tensor_type.shape.dim[dim].dim_value = value

    return edit


def _no_opset(model: Any) -> None:
    del model.opset_import[:]


def _float16_logits(model: Any) -> None:
    for info in model.graph.output:
        if info.name == "logits":
            info.type.tensor_type.elem_type = TensorProto.FLOAT16


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_dim("input", 0, 1), r"input has shape \[1, 3, 32, 32\].*dynamic batch"),
        (_set_dim("logits", 0, 8), r"output 'logits' has shape \[8, 3\]"),
        (_set_dim("features", 0, 8), r"output 'features' has shape \[8, 128\]"),
        (_set_dim("logits", 1, 4), r"output 'logits' has shape \['batch', 4\].*3 labels"),
        (_set_dim("features", 1, 64), r"'features' has shape \['batch', 64\].*\[batch, 128\]"),
        (_no_opset, "imports the default op domain 0 times"),
        (_float16_logits, "output 'logits' is not float32"),
    ],
    ids=["input batch", "logits batch", "features batch", "labels", "feature_dim", "opset", "fp16"],
)
def test_graph_contract_is_checked_before_onnxruntime(
    pkg_copy: Path, forge: Forge, edit: Callable[[Any], None], message: str
) -> None:
    model = _model(pkg_copy)
    edit(model)
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    with pytest.raises(PackageError, match=message):
        load_package(pkg_copy)


@pytest.mark.parametrize(("field", "value"), [("opset", 16), ("opset", 22), ("ir_version", 6)])
def test_versions_outside_the_supported_range_are_refused(
    source_pkg: Path, field: str, value: int
) -> None:
    """The manifest schema refuses them, so graph and manifest cannot agree on them."""
    raw = json.loads((source_pkg / "manifest.json").read_text())
    raw["onnx"][field] = value
    with pytest.raises(PackageError, match=f"onnx.{field}"):
        Manifest.from_dict(raw)


def test_au_detector_batch_must_be_dynamic(
    au_source_pkg: Path, tmp_path: Path, forge: Forge
) -> None:
    import shutil

    pkg = tmp_path / "au"
    shutil.copytree(au_source_pkg, pkg)
    model = onnx.load_model_from_string((pkg / "au_detector.onnx").read_bytes())
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    forge(pkg, "au_detector.onnx", model.SerializeToString())
    with pytest.raises(PackageError, match=r"au_detector.onnx output has shape \[2, 14\]"):
        load_package(pkg)


# -- (4) every string reaches the audit -------------------------------------------


def _hide_strings(model: Any) -> None:
    """Put a marker string in each place a graph can carry text."""
    g = model.graph
    g.initializer.append(
        helper.make_tensor(
            "m-string-name",
            TensorProto.STRING,
            [1],
            [b"m-string-data"],  # type: ignore[list-item]  # onnx types vals as numbers
        )
    )
    info = helper.make_tensor_value_info("m-value", TensorProto.FLOAT, ["m-dim-param", 3])
    info.doc_string = "m-value-doc"
    info.type.denotation = "m-type-denotation"
    entry = info.metadata_props.add()
    entry.key, entry.value = "m-value-meta", "x"
    g.value_info.append(info)
    init = g.initializer[0]
    init.doc_string = "m-tensor-doc"
    entry = init.metadata_props.add()
    entry.key, entry.value = "m-tensor-meta", "y"
    node = g.node[1]
    node.overload = "m-overload"
    node.input.append("m-node-input")
    attr = helper.make_attribute("m-attr-name", b"m-attr-s", doc_string="m-attr-doc")
    node.attribute.extend([attr, helper.make_attribute("m-strings", [b"m-attr-strings"])])
    node.attribute.append(helper.make_attribute("m-sparse", _sparse([2])))
    node.attribute[-1].sparse_tensor.values.doc_string = "m-sparse-doc"
    annotation = g.quantization_annotation.add()
    annotation.tensor_name = "m-annotation"
    model.producer_version = "m-producer-version"
    model.domain = "m-domain"


def test_every_string_reaches_the_audit(source_pkg: Path) -> None:
    model = _model(source_pkg)
    _hide_strings(model)
    summary = summarize(model.SerializeToString())
    texts = " | ".join(text for _, text in summary.texts)
    markers = [
        "m-string-name", "m-string-data", "m-value", "m-dim-param", "m-value-doc",
        "m-type-denotation", "m-value-meta=x", "m-tensor-doc", "m-tensor-meta=y",
        "m-overload", "m-node-input", "m-attr-name", "m-attr-s", "m-attr-doc",
        "m-attr-strings", "m-sparse-doc", "m-annotation", "m-producer-version", "m-domain",
    ]  # fmt: skip
    assert [m for m in markers if m not in texts] == []
    assert summary.doc_strings == 4  # value, tensor, attribute, sparse values


def test_hidden_paths_are_flagged_by_the_audit(pkg_copy: Path, forge: Forge) -> None:
    model = _model(pkg_copy)
    model.graph.initializer.append(
        helper.make_tensor(
            "notes",
            TensorProto.STRING,
            [1],
            [b"/home/alice/faces/a.jpg"],  # type: ignore[list-item]
        )
    )
    entry = model.graph.output[0].metadata_props.add()
    entry.key, entry.value = "source", "C:\\data\\train.csv"
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    report = audit_package(pkg_copy)
    where = {f.where for f in report.findings}
    assert {"model.onnx string data", "model.onnx value metadata"} <= where


def test_duplicate_metadata_key_is_refused_and_flagged(pkg_copy: Path, forge: Forge) -> None:
    model = _model(pkg_copy)
    shadowed = model.metadata_props.add()
    shadowed.CopyFrom(model.metadata_props[0])
    model.metadata_props[0].value = json.dumps({"note": "/home/alice/faces"})
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    summary = summarize((pkg_copy / ONNX_NAME).read_bytes())
    assert summary.duplicate_metadata == [ONNX_MANIFEST_KEY]
    with pytest.raises(PackageError, match="repeats the metadata key 'sourcefree.manifest'"):
        load_package(pkg_copy)
    report = audit_package(pkg_copy)
    kinds = {(f.where, f.kind) for f in report.findings}
    assert ("model.onnx metadata 'sourcefree.manifest'", "onnx-metadata") in kinds
    assert ("model.onnx model metadata (duplicate key)", "path") in kinds
