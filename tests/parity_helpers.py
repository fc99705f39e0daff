"""Parity-check fixtures shared by the runtime, export and adapt tests.

``from tests.parity_helpers import make_large_logit_package, fail_adapted_parity``:
a legitimate package whose logits reach ~1e4 (the parity gates must scale with the
outputs), and an export parity check that fails on purpose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

#: How much the head's weights and bias are multiplied by before export.
HEAD_SCALE = 1e4


def make_large_logit_package(
    out: Path, fp16: bool = False, labels: tuple[str, ...] = ("a", "b", "c")
) -> Path:
    """A smallcnn (32 px, BatchNorm statistics set) whose head is scaled by :data:`HEAD_SCALE`."""
    import torch

    from sourcefree.engine.models import build_classifier
    from sourcefree.export import source_package
    from sourcefree.package.manifest import InputSpec

    torch.manual_seed(0)
    model = build_classifier("smallcnn", len(labels))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.3)
        model.head.weight.mul_(HEAD_SCALE)
        model.head.bias.mul_(HEAD_SCALE)
    source_package(
        model.eval(),
        architecture="smallcnn",
        labels=list(labels),
        input_spec=InputSpec(size=(32, 32)),
        out=out,
        fp16=fp16,
    )
    return out


def fail_adapted_parity(monkeypatch: pytest.MonkeyPatch, times: int = 1) -> list[bool]:
    """Make the next ``times`` package exports fail their parity check, for real.

    Each of those calls runs the real :func:`sourcefree.export.onnx.check_parity`
    with an impossible limit (ATOL -1, RTOL 0), so its own ExportError and message
    come out. Only exports are touched (the load-time agreement check of a source
    package is not). Returns one entry per call: True when it was made to fail.
    """
    import sourcefree.export.onnx as onnx_export
    import sourcefree.export.writer as writer

    real = onnx_export.check_parity
    calls: list[bool] = []

    def check(*args: Any, **kwargs: Any) -> Any:
        failing = len(calls) < times
        calls.append(failing)
        if not failing:
            return real(*args, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(onnx_export, "FP32_ATOL", -1.0)
            m.setattr(onnx_export, "FP32_RTOL", 0.0)
            return real(*args, **kwargs)

    monkeypatch.setattr(writer, "check_parity", check)
    return calls
