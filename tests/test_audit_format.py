"""``sourcefree audit``'s text report: the model graph and each auxiliary graph get one block
layout (graph, one row of their own, metadata keys, doc strings)."""

from __future__ import annotations

from typing import Any

from sourcefree.package.audit import AuditReport, format_report


def _graph(**changes: Any) -> dict[str, Any]:
    g: dict[str, Any] = {
        "ir_version": 8,
        "opsets": {"ai.onnx": 17, "com.example": 1},
        "nodes": 12,
        "ops": {"Conv": 3, "Relu": 9},
        "outputs": {"au": [1, 12]},
        "metadata_keys": ["sourcefree.manifest"],
        "doc_strings": 0,
        "node_metadata": 0,
        "producer": "pytorch",
    }
    return {**g, **changes}


def test_model_and_auxiliary_graph_blocks() -> None:
    report = AuditReport(
        verified=True,
        sha256=None,
        onnx=_graph(node_metadata=2),
        auxiliary={"au.onnx": _graph(metadata_keys=[], doc_strings=1, opsets={"ai.onnx": 13})},
    )
    text = format_report(report).splitlines()
    at = text.index("onnx")
    model = text[at + 1 : at + 6]
    at = text.index("auxiliary graph au.onnx")
    aux = text[at + 1 : at + 6]
    assert text[at - 1] == "" and aux[-1] == ""  # no node-metadata row for an auxiliary graph
    labels = ["graph", "metadata keys", "doc strings"]
    assert [r[:20].strip() for r in model] == [labels[0], "ops", *labels[1:], "node metadata"]
    assert [r[:20].strip() for r in aux[:4]] == [labels[0], "outputs", *labels[1:]]
    assert model[0][21:] == "IR 8, opsets ai.onnx 17, com.example 1, 12 nodes, producer 'pytorch'"
    assert aux[0][21:] == "IR 8, opsets ai.onnx 13, 12 nodes, producer 'pytorch'"
    assert [r[21:] for r in model[1:]] == ["Conv x3, Relu x9", "sourcefree.manifest", "0", "2"]
    assert [r[21:] for r in aux[1:4]] == ["au [1, 12]", "-", "1"]
