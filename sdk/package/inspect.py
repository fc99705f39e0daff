"""Readable summary of a verified package (``sourcefree inspect``). No torch import."""

from __future__ import annotations

import os
from typing import Any

from sourcefree.package.loader import load_package
from sourcefree.package.manifest import ONNX_NAME
from sourcefree.package.onnx_check import summarize


def size_text(n: int) -> str:
    """A byte count for people: ``512 B``, ``3.4 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def summarize_package(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a package and describe it: labels, input, architecture, files, signature."""
    pkg = load_package(path)
    m = pkg.manifest
    graph = summarize(pkg.read(ONNX_NAME))
    spec = m.input
    signature = (
        "present (verify it with `sourcefree verify PKG --key VENDOR.pub`)"
        if pkg.signed
        else "none"
    )
    out: dict[str, Any] = {
        "name": m.name,
        "version": m.version,
        "kind": m.kind,
        "sha256": pkg.sha256,
        "labels": ", ".join(m.labels),
        "input": {
            "size": f"{spec.size[0]}x{spec.size[1]}",
            "channels": spec.channels,
            "color": spec.color,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation,
        },
        "architecture": {
            "name": m.architecture.name,
            "classes": m.architecture.num_classes,
            "feature_dim": m.architecture.feature_dim,
        },
        "onnx": {
            "opset": m.onnx.opset,
            "ir_version": m.onnx.ir_version,
            "precision": m.onnx.precision,
            "nodes": sum(graph.ops.values()),
            "ops": ", ".join(sorted(graph.ops)),
        },
        "files": {name: size_text(entry.size) for name, entry in sorted(m.files.items())},
        "signature": signature,
        "provenance": {k: v for k, v in m.provenance.items() if k != "config"},
    }
    if m.source_stats is not None:
        out["source_stats"] = ", ".join(sorted(m.source_stats.to_dict()))
    det = pkg.au_detector
    if det is not None:
        aux_graph = summarize(pkg.read(det.file))
        out["auxiliary"] = {
            "au_detector": f"{det.file} ({size_text(m.files[det.file].size)}, "
            f"{sum(aux_graph.ops.values())} nodes)",
            "action_units": ", ".join(det.au_names),
            "au_threshold": det.threshold,
        }
    return out
