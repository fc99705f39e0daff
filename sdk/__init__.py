"""sourcefree: source-free domain adaptation with a privacy story.

Importing this package never imports torch; the torch side loads lazily.
"""

from __future__ import annotations

import os
import sys
import warnings

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
from sourcefree.pipeline.adaptation import adapt as adapt
from sourcefree.pipeline.request import AdaptRequest as AdaptRequest

__all__ = [
    "AdaptRequest",
    "IntegrityError",
    "Package",
    "PackageError",
    "SignatureError",
    "SourcefreeError",
    "__version__",
    "adapt",
    "load_package",
]
