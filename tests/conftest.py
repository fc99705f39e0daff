"""Suite-wide settings: offline, CPU by default, Triton in interpreter mode without a GPU."""

from __future__ import annotations

import os
import shutil

# The Triton interpreter must be chosen before any @triton.jit decorator runs.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
