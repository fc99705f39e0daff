"""Writers of source and adapted packages (safetensors, ONNX, manifest)."""

from __future__ import annotations

from sourcefree.export.source import source_package as source_package

__all__ = ["source_package"]
