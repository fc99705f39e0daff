"""The package format and its verification: strict JSON, manifest, weights, ONNX, signing.

Never imports torch. ``Package``, ``load_package`` and ``sign_package`` are the public entry points.
"""

from sourcefree.package.loader import Package as Package
from sourcefree.package.loader import load_package as load_package
from sourcefree.package.loader import sign_package as sign_package

__all__ = ["Package", "load_package", "sign_package"]
