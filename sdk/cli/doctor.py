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


def _usable_providers(ort: Any) -> tuple[list[str] | None, list[dict[str, str]]]:
    """Open a one-node session per provider: listed providers can still fail to start.

    Returns the usable providers (None: not probed, onnx is missing) and, for each
    one that fails, its name and onnxruntime's reason (only onnxruntime's own errors
    count as a finding).
    """
    if importlib.util.find_spec("onnx") is None:
        return None, []
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
    failed: list[dict[str, str]] = []
    # Provider start-up failures are logged by the process-wide logger: they are
    # reported here instead, as findings.
    ort.set_default_logger_severity(4)
    try:
        for provider in ort.get_available_providers():
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            try:
                # onnxruntime prints provider failures to stdout; keep JSON output clean.
                with contextlib.redirect_stdout(io.StringIO()):
                    session = ort.InferenceSession(data, opts, providers=[provider])
            except ort_errors() as exc:
                failed.append({"provider": provider, "reason": ort_reason(exc)})
                continue
            if session.get_providers()[0] == provider:
                usable.append(provider)
    finally:
        ort.set_default_logger_severity(3)
    return usable, failed


CONFLICT = (
    "both onnxruntime and onnxruntime-gpu are installed; they share one directory "
    "and the CPU wheel hides the GPU providers. Fix: pip uninstall -y onnxruntime "
    "onnxruntime-gpu && pip install onnxruntime-gpu"
)


#: Keys about torch and the adapt extra (null without torch).
_TORCH_KEYS = (
    *("torch", "torch_cuda_build", "cuda_available", "gpu", "torchvision", "lightly"),
    *("onnx", "triton"),
)


def diagnose() -> dict[str, Any]:
    """Versions, devices and providers as JSON values; never raises for a missing piece.

    Keys are snake_case and always present (``sourcefree doctor --json``): versions
    are strings or null (not installed); provider lists are lists or null (unknown).
    """
    ort_cpu = _version("onnxruntime")
    ort_gpu = _version("onnxruntime-gpu")
    report: dict[str, Any] = {
        "sourcefree": _version("sourcefree"),
        "onnxruntime_gpu": ort_gpu,
        "onnxruntime_cpu": ort_cpu,
        "conflict": CONFLICT if ort_cpu and ort_gpu else None,
        "telemetry_disabled": os.environ.get("ORT_DISABLE_TELEMETRY") == "1",
        "onnxruntime_error": None,
        "providers_listed": None,
        "providers_usable": None,
        "providers_failed": [],
    }
    try:
        from sourcefree.runtime.predictor import import_onnxruntime

        ort = import_onnxruntime()
        report["providers_listed"] = list(ort.get_available_providers())
        report["providers_usable"], report["providers_failed"] = _usable_providers(ort)
    except ImportError as exc:
        report["onnxruntime_error"] = str(exc)
    report.update({k: None for k in _TORCH_KEYS})
    if importlib.util.find_spec("torch") is not None:
        import torch

        available = torch.cuda.is_available()
        report.update(
            torch=torch.__version__,
            torch_cuda_build=torch.version.cuda,
            cuda_available=available,
            gpu=torch.cuda.get_device_name(0) if available else None,
            **{name: _version(name) for name in ("torchvision", "lightly", "onnx", "triton")},
        )
    return report


def _joined(values: list[str] | None, empty: str) -> str:
    return ", ".join(values) if values else empty


def format_report(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The human table of :func:`diagnose`'s report: (label, text) rows."""
    missing = "not installed"
    rows = [
        ("sourcefree", report["sourcefree"] or missing),
        ("onnxruntime-gpu", report["onnxruntime_gpu"] or missing),
        ("onnxruntime (CPU wheel)", report["onnxruntime_cpu"] or missing),
    ]
    if report["conflict"]:
        rows.append(("CONFLICT", report["conflict"]))
    rows.append(
        (
            "telemetry",
            "off (ORT_DISABLE_TELEMETRY=1)"
            if report["telemetry_disabled"]
            else "ON: set ORT_DISABLE_TELEMETRY=1 before onnxruntime is imported",
        )
    )
    if report["onnxruntime_error"] is not None:
        rows.append(("onnxruntime providers", f"unavailable ({report['onnxruntime_error']})"))
    else:
        rows.append(("onnxruntime providers (listed)", _joined(report["providers_listed"], "")))
        usable = report["providers_usable"]
        text = "not probed (install onnx to probe)" if usable is None else _joined(usable, "none")
        rows.append(("onnxruntime providers (usable)", text))
        failed = [f"{f['provider']} ({f['reason']})" for f in report["providers_failed"]]
        if failed:
            rows.append(("onnxruntime providers (failed)", "; ".join(failed)))
    if report["torch"] is None:
        rows.append(("torch", "not installed (fine for applications; adaptation needs .[adapt])"))
        return rows
    rows += [
        ("torch", report["torch"]),
        ("torch CUDA build", report["torch_cuda_build"] or "none (CPU build)"),
        ("CUDA available", str(report["cuda_available"])),
    ]
    if report["gpu"] is not None:
        rows.append(("GPU", report["gpu"]))
    rows += [(n, report[n] or missing) for n in ("torchvision", "lightly", "onnx", "triton")]
    return rows
