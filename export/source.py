"""Vendor side: turn a trained model into a source package (no images leave)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sourcefree.engine.models import Classifier, from_vendor_state, resolve_architecture
from sourcefree.errors import ExportError
from sourcefree.export.onnx import (
    Parity,
    au_detector_outputs,
    au_detector_to_onnx,
    check_au_detector_parity,
)
from sourcefree.export.writer import write_package
from sourcefree.package.loader import Package
from sourcefree.package.manifest import (
    ArchitectureSpec,
    ArchOption,
    AUDetectorSpec,
    Auxiliary,
    InputSpec,
    SourceStats,
)


def source_package(
    model: nn.Module,
    *,
    architecture: str,
    labels: Sequence[str],
    input_spec: InputSpec,
    out: str | os.PathLike[str],
    architecture_options: Mapping[str, ArchOption] | None = None,
    source_stats: SourceStats | dict[str, Any] | None = None,
    au_detector: nn.Module | None = None,
    au_names: Sequence[str] | None = None,
    au_threshold: float = 0.5,
    name: str | None = None,
    version: str = "1.0.0",
    overwrite: bool = False,
    fp16: bool = False,
) -> Package:
    """Export a vendor model as a verified source package at ``out``.

    Args:
        model: a :class:`~sourcefree.engine.models.Classifier`, or the registered
            architecture's own module (e.g. ``torchvision.models.resnet18``
            with ``num_classes=len(labels)``, or the timm model itself).
        architecture: registry name (``sourcefree.engine.models.ARCHITECTURES``),
            or ``timm:NAME`` for a model of ``timm.create_model(NAME, ...)``.
        labels: class names in output order.
        input_spec: preprocessing contract (size, colour, mean, std).
        out: package directory to create (must not exist or be empty).
        architecture_options: ``timm:NAME`` only: the ``timm.create_model``
            options the model was built with (allowlisted, e.g. ``{"img_size": 32}``);
            recorded with the timm version in the manifest.
        source_stats: optional aggregate statistics (class counts, per-class
            feature means, AU frequencies); never per-image data.
        au_detector: optional action-unit detector shipped with the model (AdaFER):
            a torch module taking the classifier's input and returning one
            ``(N, len(au_names))`` tensor of AU probabilities in [0, 1] (e.g.
            :func:`sourcefree.vendor.training.train_au_detector`). Exported to plain fp32
            ONNX as ``au_detector.onnx``, parity-checked against onnxruntime and
            described in the manifest's ``auxiliary.au_detector``.
        au_names: action-unit names in the detector's output order (required with
            ``au_detector``; ``source_stats.au_frequencies`` uses the same order).
        au_threshold: an AU counts as active at or above this output; the
            ``au_frequencies`` must have been counted with the same threshold
            (:func:`sourcefree.vendor.training.au_frequencies`).
        name: package name; defaults to the output directory's name.
        version: package version string.
        overwrite: replace a non-empty ``out``.
        fp16: store an fp16 graph (fp32 inputs and outputs), checked by top-1 agreement.

    Returns:
        The package as read back and verified from ``out``.

    Examples:
        >>> import torchvision
        >>> from sourcefree.export import source_package
        >>> from sourcefree.package.manifest import InputSpec
        >>> model = torchvision.models.resnet18(num_classes=3)  # ... trained on your faces
        >>> pkg = source_package(model, architecture="resnet18", labels=["surprise", "fear",
        ...     "happiness"], input_spec=InputSpec(size=(64, 64)), out="fer-pkg")
        >>> vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32,
        ...     patch_size=4)  # ... trained
        >>> pkg = source_package(vit, architecture="timm:vit_tiny_patch16_224",
        ...     architecture_options={"img_size": 32, "patch_size": 4}, labels=[...],
        ...     input_spec=InputSpec(size=(32, 32)), out="fer-vit")
    """
    arch = resolve_architecture(architecture, architecture_options)
    if isinstance(model, Classifier):
        classifier = model
    else:
        state = model.state_dict()
        classifier = from_vendor_state(arch, state, len(labels), input_spec.channels)
    record = ArchitectureSpec(
        name=arch.name,
        num_classes=len(labels),
        feature_dim=classifier.head.in_features,
        in_channels=input_spec.channels,
        options=arch.options,
        timm_version=arch.timm_version,
    )
    stats = (
        SourceStats.from_dict(source_stats, len(labels))
        if isinstance(source_stats, dict)
        else source_stats
    )
    pkg_name = name or Path(out).name or "model"
    auxiliary, aux_files = _au_auxiliary(au_detector, au_names, au_threshold, stats, input_spec)
    pkg, _ = export_classifier(
        classifier,
        architecture=record,
        labels=labels,
        input_spec=input_spec,
        out=out,
        source_stats=stats,
        name=pkg_name,
        version=version,
        overwrite=overwrite,
        fp16=fp16,
        auxiliary=auxiliary,
        auxiliary_files=aux_files,
    )
    return pkg


def _au_auxiliary(
    au_detector: nn.Module | None,
    au_names: Sequence[str] | None,
    au_threshold: float,
    stats: SourceStats | None,
    input_spec: InputSpec,
) -> tuple[Auxiliary | None, dict[str, bytes]]:
    """The action-unit detector's manifest entry and graph (exported, parity-checked)."""
    auxiliary = None
    aux_files: dict[str, bytes] = {}
    if au_detector is not None:
        detector = au_detector_spec(au_names, au_threshold)
        freqs = stats.au_frequencies if stats is not None else None
        if freqs is not None and len(freqs[0]) != len(detector.au_names):
            raise ExportError(
                f"source_stats.au_frequencies rows have {len(freqs[0])} values but "
                f"{len(detector.au_names)} au_names were given",
                "the frequencies are counted over the detector's action units",
                "compute them over the detector's outputs, in au_names order",
            )
        height, width = input_spec.size
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(4, input_spec.channels, height, width, generator=gen)
        au_detector_outputs(au_detector, probe, detector)  # before the slow export
        onnx_bytes = au_detector_to_onnx(au_detector, input_spec, detector)
        check_au_detector_parity(au_detector, onnx_bytes, input_spec, detector)
        auxiliary = Auxiliary(au_detector=detector)
        aux_files[detector.file] = onnx_bytes
    elif au_names is not None:
        raise ExportError(
            "au_names were given without an au_detector",
            "the names describe the detector's outputs",
            "pass au_detector= as well, or leave au_names out",
        )
    return auxiliary, aux_files


def au_detector_spec(au_names: Sequence[str] | None, threshold: float) -> AUDetectorSpec:
    """The manifest entry of an AU detector, checked as the reader checks it (before any export).

    Raises:
        ExportError: no names. PackageError: a bad name, duplicate names or threshold.
    """
    if au_names is None or isinstance(au_names, str) or len(au_names) == 0:
        raise ExportError(
            "an au_detector was given without au_names",
            "the manifest names every output column of the detector",
            "pass au_names=[...] in the detector's output order "
            "(synthetic data: sourcefree.data.synthetic.AU_NAMES)",
        )
    spec = AUDetectorSpec(au_names=tuple(au_names), threshold=float(threshold))
    # Field checks (names, threshold range) by the reader's own parser.
    return AUDetectorSpec.from_dict(spec.to_dict())


def export_classifier(
    classifier: Classifier,
    *,
    architecture: str | ArchitectureSpec,
    labels: Sequence[str],
    input_spec: InputSpec,
    out: str | os.PathLike[str],
    source_stats: SourceStats | None,
    name: str,
    version: str,
    overwrite: bool,
    fp16: bool,
    auxiliary: Auxiliary | None = None,
    auxiliary_files: Mapping[str, bytes] | None = None,
) -> tuple[Package, Parity]:
    """Write a ``kind=source`` package from a Classifier (and its auxiliary graphs)."""
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
            auxiliary=auxiliary,
            auxiliary_files=auxiliary_files,
            overwrite=overwrite,
            fp16=fp16,
        )
