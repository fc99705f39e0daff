"""sourcefree: source-free domain adaptation with a privacy story.

Importing this package never imports torch; the torch side loads lazily.
"""

from __future__ import annotations

import os

# onnxruntime's official wheels ship telemetry switched on; it must be off
# before onnxruntime is first imported anywhere in the process.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"
