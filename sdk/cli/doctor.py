"""``sourcefree doctor``: what this machine can run, and what is misconfigured."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import io
import os
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _usable_providers(ort: Any) -> tuple[str, list[str]]:
    """Open a one-node session per provider: listed providers can still fail to start.

    Returns the usable providers and, for each one that fails, its name and
    onnxruntime's reason (only onnxruntime's own errors count as a finding).
    """
    if importlib.util.find_spec("onnx") is None:
        return "not probed (install onnx to probe)", []
    from onnx import TensorProto, helper

    from sourcefree.runtime.predictor import ort_errors, ort_reason

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = model.SerializeToString()
    usable: list[str] = []
    failed: list[str] = []
    for provider in ort.get_available_providers():
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        try:
            # onnxruntime prints provider failures to stdout; keep JSON output clean.
            with contextlib.redirect_stdout(io.StringIO()):
                session = ort.InferenceSession(data, opts, providers=[provider])
        except ort_errors() as exc:
            failed.append(f"{provider} ({ort_reason(exc)})")
            continue
        if session.get_providers()[0] == provider:
            usable.append(provider)
    return ", ".join(usable) or "none", failed


def diagnose() -> dict[str, Any]:
    """Collect versions, devices and providers; never raises for a missing piece."""
    report: dict[str, Any] = {"sourcefree": _version("sourcefree") or "not installed"}
    ort_cpu = _version("onnxruntime")
    ort_gpu = _version("onnxruntime-gpu")
    report["onnxruntime-gpu"] = ort_gpu or "not installed"
    report["onnxruntime (CPU wheel)"] = ort_cpu or "not installed"
    if ort_cpu and ort_gpu:
        report["CONFLICT"] = (
            "both onnxruntime and onnxruntime-gpu are installed; they share one directory "
            "and the CPU wheel hides the GPU providers. Fix: pip uninstall -y onnxruntime "
            "onnxruntime-gpu && pip install onnxruntime-gpu"
        )
    report["telemetry"] = (
        "off (ORT_DISABLE_TELEMETRY=1)"
        if os.environ.get("ORT_DISABLE_TELEMETRY") == "1"
        else "ON: set ORT_DISABLE_TELEMETRY=1 before onnxruntime is imported"
    )
    try:
        from sourcefree.runtime.predictor import import_onnxruntime

        ort = import_onnxruntime()
        report["onnxruntime providers (listed)"] = ", ".join(ort.get_available_providers())
        usable, failed = _usable_providers(ort)
        report["onnxruntime providers (usable)"] = usable
        if failed:
            report["onnxruntime providers (failed)"] = "; ".join(failed)
    except ImportError as exc:
        report["onnxruntime providers"] = f"unavailable ({exc})"
    if importlib.util.find_spec("torch") is None:
        report["torch"] = "not installed (fine for applications; adaptation needs .[adapt])"
    else:
        import torch

        report["torch"] = torch.__version__
        report["torch CUDA build"] = torch.version.cuda or "none (CPU build)"
        available = torch.cuda.is_available()
        report["CUDA available"] = available
        if available:
            report["GPU"] = torch.cuda.get_device_name(0)
        report["torchvision"] = _version("torchvision") or "not installed"
        report["lightly"] = _version("lightly") or "not installed"
        report["onnx"] = _version("onnx") or "not installed"
        report["triton"] = _version("triton") or "not installed"
    return report
