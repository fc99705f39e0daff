"""Customer side: write the adapted model as a package (same format as a source package).

Provenance names the source package hash(es), the method, its resolved config
and the number of target images; never paths, per-image data, centroids or
feature banks. Parity with onnxruntime is enforced by
:func:`sourcefree.export.writer.write_package`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sourcefree.engine.models import Classifier
from sourcefree.errors import ExportError
from sourcefree.export.onnx import Parity
from sourcefree.export.writer import write_package
from sourcefree.package.loader import Package


def adapted_name(source: Package, method: str) -> str:
    """``<source name>-<method>``, cut to the 64 characters a package name allows."""
    suffix = f"-{method}"
    return source.manifest.name[: 64 - len(suffix)] + suffix


def adapted_package(
    model: Classifier,
    *,
    sources: Sequence[Package],
    method: str,
    config: Mapping[str, Any],
    num_target_images: int,
    architecture: str | None = None,
    out: str | os.PathLike[str],
    name: str | None = None,
    version: str | None = None,
    overwrite: bool = False,
    note: str | None = None,
    progress: bool = False,
) -> tuple[Package, Parity]:
    """Export an adapted classifier as a verified ``kind=adapted`` package at ``out``.

    Labels and input spec are the first source package's (all sources share them).
    ``note`` (at most 256 characters) goes into the provenance: ``adapt`` writes
    the do-no-harm gate's reason there when it exports the source model
    (``method="source"``). ``progress``: an export bar on stderr.

    Raises:
        ExportError: no source, non-finite weights, export or parity failure.

    Examples:
        >>> from sourcefree import load_package
        >>> from sourcefree.export.adapted import adapted_package
        >>> source = load_package("fer-pkg", public_key="vendor.pub")
        >>> pkg, parity = adapted_package(model, sources=[source], method="tent",
        ...     config={"lr": 0.001}, num_target_images=2000, out="adapted-pkg")
    """
    if not sources:
        raise ExportError("no source package given", "an adapted package names its source", "")
    first = sources[0].manifest
    provenance: dict[str, Any] = {
        "source_package_sha256": sources[0].sha256,
        "method": method,
        "config": dict(config),
        "num_target_images": int(num_target_images),
    }
    if len(sources) > 1:
        provenance["source_packages"] = [p.sha256 for p in sources]
    if note is not None:
        provenance["note"] = note
    with torch.no_grad():
        return write_package(
            model,
            kind="adapted",
            name=name or adapted_name(sources[0], method),
            version=version or first.version,
            labels=first.labels,
            input_spec=first.input,
            # The source's record (timm options and version) unless the method names another.
            architecture=(
                first.architecture
                if architecture in (None, first.architecture.name)
                else architecture
            ),
            out=out,
            provenance=provenance,
            overwrite=overwrite,
            progress=progress,
        )
