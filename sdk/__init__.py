"""sourcefree: source-free domain adaptation with a privacy story.

Importing this package never imports torch; the torch side loads lazily.
:class:`Predictor` (onnxruntime, numpy, Pillow) and :func:`export_package`
(torch; :func:`sourcefree.export.source_package`) are imported on first use.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

# onnxruntime's official wheels ship telemetry switched on; it must be off
# before onnxruntime is first imported anywhere in the process.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
if "onnxruntime" in sys.modules:
    warnings.warn(
        "onnxruntime was imported before sourcefree, so its telemetry may already be on; "
        "import sourcefree first or set ORT_DISABLE_TELEMETRY=1 in the environment",
        RuntimeWarning,
        stacklevel=2,
    )

from sourcefree._version import __version__ as __version__
from sourcefree.errors import IntegrityError as IntegrityError
from sourcefree.errors import PackageError as PackageError
from sourcefree.errors import SignatureError as SignatureError
from sourcefree.errors import SourcefreeError as SourcefreeError
from sourcefree.package.loader import Package as Package
from sourcefree.package.loader import load_package as load_package
from sourcefree.package.manifest import InputSpec as InputSpec
from sourcefree.pipeline.adaptation import adapt as adapt
from sourcefree.pipeline.request import AdaptRequest as AdaptRequest

if TYPE_CHECKING:
    from sourcefree.export.source import source_package as export_package
    from sourcefree.runtime.predictor import Predictor as Predictor

#: Attributes imported on first use: name -> (module, attribute).
_LAZY = {
    "Predictor": ("sourcefree.runtime.predictor", "Predictor"),
    "export_package": ("sourcefree.export.source", "source_package"),
}

__all__ = [
    "AdaptRequest",
    "InputSpec",
    "IntegrityError",
    "Package",
    "PackageError",
    "Predictor",
    "SignatureError",
    "SourcefreeError",
    "__version__",
    "adapt",
    "export_package",
    "load_package",
]


def __getattr__(name: str) -> Any:
    """``sourcefree.Predictor`` and ``sourcefree.export_package``, imported on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'sourcefree' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
