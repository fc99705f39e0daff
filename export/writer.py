"""Write a package directory atomically: weights, ONNX graph, manifest, then verify."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from sourcefree._version import __version__
from sourcefree.data.progress import progress_bar
from sourcefree.engine.models import Classifier
from sourcefree.errors import ExportError
from sourcefree.export.onnx import IR_VERSION, OPSET, Parity, check_parity, to_onnx
from sourcefree.package.loader import Package, publish_package
from sourcefree.package.manifest import (
    NAME_RE,
    ONNX_NAME,
    WEIGHTS_NAME,
    ArchitectureSpec,
    Auxiliary,
    InputSpec,
    Manifest,
    OnnxSpec,
    SourceStats,
)


def _weights_bytes(model: Classifier) -> bytes:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ExportError(
                f"model tensor {key!r} contains NaN or Inf",
                "a package must hold a finite model",
                "nothing was written; fix training (lower the learning rate?) and export again",
            )
    return save_safetensors(state, metadata={"format": "pt"})


def write_package(
    model: Classifier,
    *,
    kind: str,
    name: str,
    version: str,
    labels: list[str] | tuple[str, ...],
    input_spec: InputSpec,
    architecture: str | ArchitectureSpec,
    out: str | os.PathLike[str],
    provenance: dict[str, Any] | None = None,
    source_stats: SourceStats | None = None,
    auxiliary: Auxiliary | None = None,
    auxiliary_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    fp16: bool = False,
    progress: bool = False,
) -> tuple[Package, Parity]:
    """Export ``model`` as a package at ``out``; verify it before it appears there.

    ``auxiliary`` describes auxiliary models (an action-unit detector) whose
    already exported graphs are ``auxiliary_files`` (file name -> bytes); they are
    listed in ``files`` with size and sha256 like the model files. ``progress``: an
    ``export`` bar on stderr over its four steps (weights, ONNX graph, parity
    check, write and read back; :mod:`sourcefree.data.progress`).

    Raises:
        ExportError: export, checker or parity failure, non-finite weights.
        WriteError: ``out`` cannot be written (full disk, read-only folder).
        Interrupted: SIGINT/SIGTERM while writing; nothing is left at ``out``.
        SourcefreeError: ``out`` exists and is not empty (without ``overwrite``).
        PackageError: an invalid field (names the field).
    """
    if not NAME_RE.match(name):
        raise ExportError(
            f"package name {name!r} is not allowed",
            "names use letters, digits, '.', '_' and '-' (at most 64)",
            "pass another --name",
        )
    model = model.eval().to("cpu", torch.float32)
    arch = dataclasses.replace(
        ArchitectureSpec(architecture, 0, 0) if isinstance(architecture, str) else architecture,
        num_classes=len(labels),
        feature_dim=model.head.in_features,
        in_channels=input_spec.channels,
    )
    if model.head.out_features != len(labels):
        raise ExportError(
            f"the model has {model.head.out_features} outputs but {len(labels)} labels were given",
            "every output needs a label name, in output order",
            "pass the labels the model was trained with (--labels a,b,c)",
        )
    onnx_spec = OnnxSpec(opset=OPSET, ir_version=IR_VERSION, precision="fp16" if fp16 else "fp32")
    prov: dict[str, Any] = {
        "sdk_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **(provenance or {}),
    }
    manifest = Manifest(
        kind=kind,
        name=name,
        version=version,
        labels=tuple(labels),
        input=input_spec,
        architecture=arch,
        onnx=onnx_spec,
        provenance=prov,
        source_stats=source_stats,
        auxiliary=auxiliary,
    )
    extra = dict(auxiliary_files or {})
    wanted = set(auxiliary.files()) if auxiliary is not None else set()
    if set(extra) != wanted:
        raise ExportError(
            f"auxiliary files {sorted(extra)} do not match the manifest's {sorted(wanted)}",
            "every auxiliary model needs exactly its own file",
            "report a bug",
        )
    # Validate every field through the same parser that readers use.
    Manifest.from_dict(
        {**manifest.to_dict(with_files=False), "files": _placeholder_files(*sorted(extra))}
    )
    with progress_bar(4, "export", enabled=progress, unit="step") as bar:
        weights = _weights_bytes(model)
        bar.update()
        onnx_bytes = to_onnx(model, input_spec, onnx_spec, manifest.to_dict(with_files=False))
        bar.update()
        parity = check_parity(model, onnx_bytes, input_spec, onnx_spec, samples=64 if fp16 else 16)
        bar.update()
        blobs = {WEIGHTS_NAME: weights, ONNX_NAME: onnx_bytes, **extra}
        pkg = publish_package(blobs, manifest, out, overwrite=overwrite)
        bar.update()
    return pkg, parity


def _placeholder_files(*extra: str) -> dict[str, dict[str, Any]]:
    return {n: {"size": 0, "sha256": "0" * 64} for n in (WEIGHTS_NAME, ONNX_NAME, *extra)}
