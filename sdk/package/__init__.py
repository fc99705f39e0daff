"""The package format and its verification: strict JSON, manifest, weights, ONNX, signing.

Never imports torch. ``Package`` and ``load_package`` are the public entry points.
"""

from sourcefree.package.loader import Package as Package
from sourcefree.package.loader import load_package as load_package

__all__ = ["Package", "load_package"]
