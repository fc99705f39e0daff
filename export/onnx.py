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

from sourcefree.errors import ExportError, PackageError, exception_summary
from sourcefree.package import strictjson
from sourcefree.package.loader import Package
from sourcefree.package.manifest import (
    ONNX_MANIFEST_KEY,
    ONNX_NAME,
    WEIGHTS_NAME,
    AUDetectorSpec,
    InputSpec,
    OnnxSpec,
)

OPSET = 20
IR_VERSION = 10
MAX_BATCH = 65536
#: Parity gate, per output (logits, features) of torch vs onnxruntime:
#: max |onnx - torch| <= ATOL + RTOL * max |torch|, so large-logit models pass too.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-3
#: The same for an fp16 graph against the fp32 torch model (~40x its usual error).
FP16_ATOL = 1e-3
FP16_RTOL = 3e-2
#: fp16 gate: share of random inputs whose top-1 class agrees with fp32 torch.
FP16_MIN_AGREEMENT = 0.95
#: Inputs of the load-time agreement check (:func:`check_package_agreement`).
AGREEMENT_SAMPLES = 4


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
        del item.metadata_props[:]  # torch writes original node names and scopes here


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
            exception_summary(exc),
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
    x = _probe(spec, samples, seed)
    want = au_detector_outputs(model, x, detector)
    session = _cpu_session(onnx_bytes)
    parts = [
        session.run([detector.output], {detector.input: batch.numpy()})[0]
        for batch in (x[:1], x[1:])  # the batch axis is dynamic
    ]
    worst = float(np.abs(np.concatenate(parts) - want).max())
    if not worst <= FP32_ATOL:
        raise ExportError(
            f"onnxruntime disagrees with torch on the AU detector by {worst:.2e} "
            f"(limit {FP32_ATOL:.0e}: its outputs lie in [0, 1])",
            "the exported graph does not compute what the detector computes; plausible "
            "causes: a layer that the exporter translates differently from eager torch (a "
            "custom or non-deterministic module), non-finite weights",
            "nothing was written; check the detector's layers and weights, then export again",
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


def _probe(spec: InputSpec, samples: int, seed: int) -> torch.Tensor:
    """Seeded standard-normal inputs (N, C, H, W): the preprocessed range."""
    height, width = spec.size
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, spec.channels, height, width, generator=gen)


def _cpu_session(onnx_bytes: bytes) -> Any:
    """An onnxruntime CPU session over the just-exported graph (warnings silenced)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def _tolerances(precision: str) -> tuple[float, float]:
    """(ATOL, RTOL) of the parity gate for a graph's precision."""
    return (FP32_ATOL, FP32_RTOL) if precision == "fp32" else (FP16_ATOL, FP16_RTOL)


def _limit(precision: str, ref: np.ndarray) -> float:
    """The allowed max abs difference from the reference output ``ref``."""
    atol, rtol = _tolerances(precision)
    return atol + rtol * float(np.abs(ref).max())


@dataclass(frozen=True)
class _Gap:
    """The worst output of a comparison: its name, difference and allowed difference."""

    output: str
    diff: float
    limit: float
    scale: float
    """max |torch| of that output (the limit is ATOL + RTOL x scale)."""

    @property
    def ok(self) -> bool:
        return self.diff <= self.limit  # False for NaN


def _compare(
    model: torch.nn.Module, run: Any, x: torch.Tensor, onnx_spec: OnnxSpec
) -> tuple[Parity, _Gap]:
    """Torch (as it is: eval mode is the caller's) and ``run(batch) -> [logits, features]``.

    onnxruntime sees batch 1 and then the rest: the batch axis is dynamic.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        ref = [t.float().cpu().numpy() for t in model(x.to(device))]
    parts = [run(batch.numpy()) for batch in (x[:1], x[1:])]
    got = [np.concatenate([np.asarray(p[i], dtype=np.float32) for p in parts]) for i in (0, 1)]
    diffs = [
        float(np.abs(g - r).max()) if g.shape == r.shape else float("inf")
        for g, r in zip(got, ref, strict=True)
    ]
    gaps = [
        _Gap(name, d, _limit(onnx_spec.precision, r), float(np.abs(r).max()))
        for name, d, r in zip(("logits", "features"), diffs, ref, strict=True)
    ]
    parity = Parity(
        max_abs_logits=diffs[0],
        max_abs_features=diffs[1],
        top1_agreement=float((got[0].argmax(1) == ref[0].argmax(1)).mean())
        if got[0].shape == ref[0].shape
        else 0.0,
        samples=x.shape[0],
    )
    return parity, next((g for g in gaps if not g.ok), gaps[0])


def _parity_error(gap: _Gap, precision: str) -> ExportError:
    """The parity failure: the measured error, the limit and how it is made, likely causes."""
    atol, rtol = _tolerances(precision)
    causes = [
        "a layer that the exporter translates differently from eager torch (a custom or "
        "non-deterministic module, an op without an exact ONNX form)",
        "non-finite values (NaN or inf) in the weights or activations",
        "activations so large that float32 rounding alone passes the limit",
    ]
    if precision == "fp16":
        causes.append("fp16 rounding (export in fp32: drop --fp16)")
    return ExportError(
        f"onnxruntime disagrees with torch by {gap.diff:.2e} on {gap.output} "
        f"(limit {gap.limit:.2e} = {atol:g} + {rtol:g} x max|torch| {gap.scale:.3g}, "
        f"{precision}, seeded random inputs)",
        "the exported graph does not compute what the model computes; plausible causes: "
        + "; ".join(causes),
        "nothing was written; check the model's layers and weights",
    )


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

    Per output (logits, features): max abs error <= ATOL + RTOL * max |torch|
    (fp32 1e-4 + 1e-3, fp16 1e-3 + 3e-2). fp16 also needs top-1 agreement
    >= 0.95 with the fp32 torch model.
    """
    session = _cpu_session(onnx_bytes)
    names = [onnx_spec.logits, onnx_spec.features]
    parity, gap = _compare(
        model.eval(),
        lambda batch: session.run(names, {onnx_spec.input: batch}),
        _probe(spec, samples, seed),
        onnx_spec,
    )
    if not gap.ok:
        raise _parity_error(gap, onnx_spec.precision)
    if onnx_spec.precision == "fp16" and not parity.top1_agreement >= FP16_MIN_AGREEMENT:
        raise ExportError(
            f"the fp16 graph agrees with fp32 on {parity.top1_agreement:.0%} of top-1 predictions",
            f"at least {FP16_MIN_AGREEMENT:.0%} is required",
            "nothing was written; export in fp32 (drop --fp16)",
        )
    return parity


def check_package_agreement(pkg: Package, model: torch.nn.Module) -> Parity:
    """Refuse a package whose model.onnx and model.safetensors compute different functions.

    ``model`` is the torch model rebuilt from the package's weights. Both run on
    :data:`AGREEMENT_SAMPLES` seeded standard-normal inputs of the package's
    input shape (torch in eval mode without gradients, onnxruntime on CPU over
    the verified graph bytes); per output, max |onnx - torch| must stay within
    the export's parity gate (:func:`check_parity`). The model's train/eval
    flags are restored and nothing else is touched (BatchNorm statistics are
    only read in eval mode). Run it once per package load.

    Raises:
        PackageError: the two files disagree, or onnxruntime refuses or fails on the graph.
    """
    from sourcefree.runtime.predictor import graph_output, open_session, run_session

    manifest = pkg.manifest
    name, onnx_spec = manifest.name, manifest.onnx
    session, _ = open_session(pkg.onnx_bytes, "cpu", 0, package=name)

    def run(batch: np.ndarray) -> list[np.ndarray]:
        names = [onnx_spec.logits, onnx_spec.features]
        out = run_session(session, names, {onnx_spec.input: batch}, package=name, file=ONNX_NAME)
        n = batch.shape[0]
        return [
            graph_output(out[0], (n, len(manifest.labels)), "logits", package=name),
            graph_output(out[1], (n, manifest.architecture.feature_dim), "features", package=name),
        ]

    modes = [(m, m.training) for m in model.modules()]
    try:
        parity, gap = _compare(
            model.eval(), run, _probe(manifest.input, AGREEMENT_SAMPLES, 0), onnx_spec
        )
    finally:
        for module, mode in modes:
            module.training = mode
    if not gap.ok:
        raise PackageError(
            f"{ONNX_NAME} and {WEIGHTS_NAME} of package {manifest.name!r} compute different "
            f"functions (max difference {gap.diff:.3g} on {gap.output}, limit {gap.limit:.3g})",
            "a package cannot adapt one model and serve another: the adapted weights would "
            "start from a model the vendor's graph does not run",
            "ask the vendor to re-export the package with the SDK",
        )
    return parity
