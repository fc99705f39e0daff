"""Torch -> ONNX for packages: plain standard ops, no private strings, parity-checked.

The graph takes ``input`` (N, C, H, W) float32 with a dynamic batch and returns
``logits`` and ``features``. Opset and IR version are pinned to what the
supported onnxruntime releases load. Everything the exporter attaches for
debugging (stack traces with file paths, scope names, doc strings) is removed.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sourcefree import strictjson
from sourcefree.errors import ExportError
from sourcefree.manifest import ONNX_MANIFEST_KEY, AUDetectorSpec, InputSpec, OnnxSpec

OPSET = 20
IR_VERSION = 10
MAX_BATCH = 65536
#: fp32 parity gate: max abs difference of logits and features, torch vs onnxruntime.
FP32_ATOL = 1e-4
#: fp16 gate: share of random inputs whose top-1 class agrees with fp32 torch.
FP16_MIN_AGREEMENT = 0.95


@dataclass(frozen=True)
class Parity:
    """Outcome of the torch-vs-onnxruntime check."""

    max_abs_logits: float
    max_abs_features: float
    top1_agreement: float
    samples: int


def _sanitize(model: Any) -> None:
    """Drop exporter metadata that can carry paths or names (stack traces, scopes)."""
    for field in ("doc_string", "producer_version", "domain"):
        model.ClearField(field)
    model.producer_name = "sourcefree"
    del model.metadata_props[:]
    graph = model.graph
    graph.ClearField("doc_string")
    graph.name = "sourcefree"
    del graph.metadata_props[:]
    for node in graph.node:
        node.ClearField("doc_string")
        del node.metadata_props[:]
    for item in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        item.ClearField("doc_string")


def _toposort(graph: Any) -> None:
    """Reorder nodes so each consumes only earlier outputs (fp16 conversion breaks order)."""
    ready = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            raise ExportError("the ONNX graph has a cycle", "after fp16 conversion", "report a bug")
        pending = rest
    copies = [type(n)() for n in ordered]
    for dst, src in zip(copies, ordered, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(copies)


def to_onnx(
    model: torch.nn.Module,
    spec: InputSpec,
    onnx_spec: OnnxSpec,
    embedded_manifest: dict[str, Any],
) -> bytes:
    """Export ``model`` (returning logits, features) to a sanitised ONNX byte string."""
    proto = _export_proto(model, spec, onnx_spec.input, [onnx_spec.logits, onnx_spec.features])
    if onnx_spec.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = convert_float_to_float16(proto, keep_io_types=True)
        _toposort(proto.graph)
        _sanitize(proto)
    entry = proto.metadata_props.add()
    entry.key = ONNX_MANIFEST_KEY
    entry.value = strictjson.dumps(embedded_manifest).decode("utf-8")
    return _checked_bytes(proto)


def _export_proto(
    model: torch.nn.Module, spec: InputSpec, input_name: str, output_names: list[str]
) -> Any:
    """Dynamo export with a dynamic batch, pinned opset and IR version, sanitised."""
    model = model.eval().to("cpu", torch.float32)
    height, width = spec.size
    example = torch.zeros(2, spec.channels, height, width)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                None,
                dynamo=True,
                opset_version=OPSET,
                input_names=[input_name],
                output_names=output_names,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(
            "the model could not be exported to ONNX",
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "use a registered architecture without custom ops",
        ) from exc
    if program is None:
        raise ExportError("the ONNX exporter returned nothing", "", "report a bug")
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    _sanitize(proto)
    return proto


def _checked_bytes(proto: Any) -> bytes:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(
            "the exported ONNX graph fails onnx.checker", str(exc)[:200], "report a bug"
        ) from exc
    data: bytes = proto.SerializeToString()
    return data


def au_detector_to_onnx(model: torch.nn.Module, spec: InputSpec, detector: AUDetectorSpec) -> bytes:
    """Export an action-unit detector (input -> ``(N, num AUs)`` in [0, 1]) to plain ONNX.

    Same exporter, opset, IR version and sanitising as the classifier graph; no
    metadata (the manifest's ``auxiliary.au_detector`` describes it). Always fp32.
    """
    proto = _export_proto(model, spec, detector.input, [detector.output])
    return _checked_bytes(proto)


def check_au_detector_parity(
    model: torch.nn.Module,
    onnx_bytes: bytes,
    spec: InputSpec,
    detector: AUDetectorSpec,
    *,
    samples: int = 16,
    seed: int = 0,
) -> float:
    """Compare torch and onnxruntime on random inputs; return the max abs difference.

    Raises:
        ExportError: the outputs differ by more than 1e-4, have the wrong width, or
            leave [0, 1] (the detector must end in a sigmoid or a clip).
    """
    import onnxruntime as ort

    height, width = spec.size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, spec.channels, height, width, generator=gen)
    want = au_detector_outputs(model, x, detector)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    parts = [
        session.run([detector.output], {detector.input: batch.numpy()})[0]
        for batch in (x[:1], x[1:])  # the batch axis is dynamic
    ]
    worst = float(np.abs(np.concatenate(parts) - want).max())
    if not worst <= FP32_ATOL:
        raise ExportError(
            f"onnxruntime disagrees with torch on the AU detector by {worst:.2e} "
            f"(limit {FP32_ATOL:.0e})",
            "the exported graph does not compute what the detector computes",
            "nothing was written; check for non-deterministic or custom layers",
        )
    return worst


def au_detector_outputs(
    model: torch.nn.Module, x: torch.Tensor, detector: AUDetectorSpec
) -> np.ndarray:
    """The detector's eval-mode outputs on ``x``, checked: one (N, num AUs) tensor in [0, 1].

    Raises:
        ExportError: another type or shape, or values outside [0, 1] or not finite.
    """
    samples = x.shape[0]
    model = model.eval()
    with torch.no_grad():
        ref = model(x)
    if not isinstance(ref, torch.Tensor) or ref.shape != (samples, len(detector.au_names)):
        got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ExportError(
            f"the action-unit detector returns {got}",
            f"one (N, {len(detector.au_names)}) tensor is expected: a column per AU name",
            "return sigmoid probabilities, one column per entry of au_names",
        )
    want: np.ndarray = ref.float().numpy()
    if not bool(np.isfinite(want).all()) or want.min() < 0.0 or want.max() > 1.0:
        raise ExportError(
            "the action-unit detector returns values outside [0, 1]",
            "AU outputs are probabilities or intensities",
            "end the detector with a sigmoid (or clamp to [0, 1])",
        )
    return want


def check_parity(
    model: torch.nn.Module,
    onnx_bytes: bytes,
    spec: InputSpec,
    onnx_spec: OnnxSpec,
    *,
    samples: int = 16,
    seed: int = 0,
) -> Parity:
    """Compare torch and onnxruntime (CPU) on random inputs; raise ExportError on failure.

    fp32: max abs error of logits and features <= 1e-4. fp16: top-1 agreement
    >= 0.95 with the fp32 torch model.
    """
    import onnxruntime as ort

    height, width = spec.size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, spec.channels, height, width, generator=gen)
    model = model.eval()
    with torch.no_grad():
        ref_logits, ref_feats = (t.numpy() for t in model(x))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    logits_parts, feat_parts = [], []
    for batch in (x[:1], x[1:]):  # batch 1 and a larger batch: the batch axis is dynamic
        out = session.run([onnx_spec.logits, onnx_spec.features], {onnx_spec.input: batch.numpy()})
        logits_parts.append(out[0])
        feat_parts.append(out[1])
    logits = np.concatenate(logits_parts)
    feats = np.concatenate(feat_parts)
    parity = Parity(
        max_abs_logits=float(np.abs(logits - ref_logits).max()),
        max_abs_features=float(np.abs(feats - ref_feats).max()),
        top1_agreement=float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        samples=samples,
    )
    if onnx_spec.precision == "fp32":
        worst = max(parity.max_abs_logits, parity.max_abs_features)
        if not worst <= FP32_ATOL:
            raise ExportError(
                f"onnxruntime disagrees with torch by {worst:.2e} (limit {FP32_ATOL:.0e})",
                "the exported graph does not compute what the model computes",
                "nothing was written; check for non-deterministic or custom layers",
            )
    elif not parity.top1_agreement >= FP16_MIN_AGREEMENT:
        raise ExportError(
            f"the fp16 graph agrees with fp32 on {parity.top1_agreement:.0%} of top-1 predictions",
            f"at least {FP16_MIN_AGREEMENT:.0%} is required",
            "nothing was written; export in fp32 (drop --fp16)",
        )
    return parity
