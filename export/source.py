"""Vendor side: turn a trained model into a source package (no images leave)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sourcefree.errors import ExportError
from sourcefree.export.onnx import Parity
from sourcefree.export.writer import write_package
from sourcefree.manifest import InputSpec, SourceStats
from sourcefree.models import Classifier, from_vendor_state, get_architecture
from sourcefree.package import Package


def source_package(
    model: nn.Module,
    *,
    architecture: str,
    labels: Sequence[str],
    input_spec: InputSpec,
    out: str | os.PathLike[str],
    source_stats: SourceStats | dict[str, Any] | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    overwrite: bool = False,
    fp16: bool = False,
) -> Package:
    """Export a vendor model as a verified source package at ``out``.

    Args:
        model: a :class:`~sourcefree.models.Classifier`, or the registered
            architecture's own module (e.g. ``torchvision.models.resnet18``
            with ``num_classes=len(labels)``).
        architecture: registry name (``sourcefree.models.ARCHITECTURES``).
        labels: class names in output order.
        input_spec: preprocessing contract (size, colour, mean, std).
        out: package directory to create (must not exist or be empty).
        source_stats: optional aggregate statistics (class counts, per-class
            feature means, AU frequencies); never per-image data.
        name: package name; defaults to the output directory's name.
        version: package version string.
        overwrite: replace a non-empty ``out``.
        fp16: store an fp16 graph (fp32 inputs and outputs), checked by top-1 agreement.

    Returns:
        The package as read back and verified from ``out``.
    """
    get_architecture(architecture)
    if isinstance(model, Classifier):
        classifier = model
    else:
        state = model.state_dict()
        classifier = from_vendor_state(architecture, state, len(labels), input_spec.channels)
    stats = (
        SourceStats.from_dict(source_stats, len(labels))
        if isinstance(source_stats, dict)
        else source_stats
    )
    pkg_name = name or Path(out).name or "model"
    pkg, _ = export_classifier(
        classifier,
        architecture=architecture,
        labels=labels,
        input_spec=input_spec,
        out=out,
        source_stats=stats,
        name=pkg_name,
        version=version,
        overwrite=overwrite,
        fp16=fp16,
    )
    return pkg


def export_classifier(
    classifier: Classifier,
    *,
    architecture: str,
    labels: Sequence[str],
    input_spec: InputSpec,
    out: str | os.PathLike[str],
    source_stats: SourceStats | None,
    name: str,
    version: str,
    overwrite: bool,
    fp16: bool,
) -> tuple[Package, Parity]:
    """Write a ``kind=source`` package from a Classifier."""
    if len(set(labels)) != len(labels):
        raise ExportError("labels are not unique", f"got {list(labels)}", "name each class once")
    with torch.no_grad():
        return write_package(
            classifier,
            kind="source",
            name=name,
            version=version,
            labels=list(labels),
            input_spec=input_spec,
            architecture=architecture,
            out=out,
            source_stats=source_stats,
            overwrite=overwrite,
            fp16=fp16,
        )
