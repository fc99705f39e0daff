"""Vendor export: parity-checked, atomic, and free of private strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sourcefree import load_package
from sourcefree.engine.models import build_classifier
from sourcefree.errors import ExportError, SourcefreeError
from sourcefree.export import source_package
from sourcefree.package.manifest import ONNX_NAME, InputSpec
from sourcefree.package.onnx_check import summarize
from sourcefree.runtime.predictor import Predictor

LABELS = ["a", "b", "c"]


def _export(out: Path, **kwargs: object) -> None:
    torch.manual_seed(0)
    source_package(
        build_classifier("smallcnn", 3),
        architecture="smallcnn",
        labels=LABELS,
        input_spec=InputSpec(size=(32, 32)),
        out=out,
        **kwargs,  # type: ignore[arg-type]
    )


def test_torchvision_model_exports_with_parity(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    vendor = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    pkg = source_package(
        vendor,
        architecture="resnet18",
        labels=LABELS,
        input_spec=InputSpec(size=(32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        out=tmp_path / "rn18",
    )
    assert pkg.manifest.architecture.feature_dim == 512
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    pred = Predictor(pkg, device="cpu").predict_array(x)
    with torch.no_grad():
        ref = torch.softmax(vendor(torch.from_numpy(x)), 1).numpy()
    assert np.abs(pred.probabilities - ref).max() < 1e-4


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SourcefreeError, match="exists and is not empty.*--overwrite"):
        _export(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_output(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _export(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.safetensors",
    ]


def test_parity_failure_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sourcefree.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "FP32_ATOL", -1.0)
    with pytest.raises(ExportError, match="onnxruntime disagrees with torch.*nothing was written"):
        _export(tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_write_nothing(tmp_path: Path) -> None:
    model = build_classifier("smallcnn", 3)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(ExportError, match="'head.weight' contains NaN or Inf"):
        source_package(
            model,
            architecture="smallcnn",
            labels=LABELS,
            input_spec=InputSpec(size=(32, 32)),
            out=tmp_path / "pkg",
        )
    assert list(tmp_path.iterdir()) == []


def test_label_count_must_match_outputs(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="3 outputs but 4 labels"):
        source_package(
            build_classifier("smallcnn", 3),
            architecture="smallcnn",
            labels=["a", "b", "c", "d"],
            input_spec=InputSpec(size=(32, 32)),
            out=tmp_path / "pkg",
        )


def test_graph_carries_no_private_strings(source_pkg: Path) -> None:
    import onnx

    data = (source_pkg / ONNX_NAME).read_bytes()
    summary = summarize(data)
    assert summary.doc_strings == 0
    assert summary.node_metadata == 0
    assert set(summary.metadata) == {"sourcefree.manifest"}
    model = onnx.load_model_from_string(data)
    assert all(not n.metadata_props for n in model.graph.node)
    for needle in (b"/home", b"/tmp", b"/work", b".py", b"stack_trace", b"site-packages"):
        assert needle not in data, needle
    embedded = json.loads(model.metadata_props[0].value)
    assert "files" not in embedded
    assert embedded["labels"] == ["surprise", "fear", "happiness"]


def test_graph_is_standard_ops_dynamic_batch(source_pkg: Path) -> None:
    summary = summarize((source_pkg / ONNX_NAME).read_bytes())
    assert set(summary.opsets) == {""}
    assert summary.inputs["input"][0] == "batch"
    assert summary.ir_version == 10
    assert {"logits", "features"} <= set(summary.outputs)


def test_no_sidecar_files(source_pkg: Path) -> None:
    assert sorted(p.name for p in source_pkg.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.safetensors",
    ]


def test_fp16_export_checked_by_top1(tmp_path: Path) -> None:
    _export(tmp_path / "half", fp16=True)
    pkg = load_package(tmp_path / "half")
    assert pkg.manifest.onnx.precision == "fp16"
    pred = Predictor(pkg, device="cpu").predict_array(np.zeros((2, 3, 32, 32), np.float32))
    assert pred.probabilities.dtype == np.float32


def test_source_stats_are_validated(tmp_path: Path) -> None:
    from sourcefree.errors import PackageError

    with pytest.raises(PackageError, match="'source_stats.class_counts' is invalid"):
        _export(tmp_path / "pkg", source_stats={"class_counts": [1, 2]})
