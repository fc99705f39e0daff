"""The typed ``report.json`` of :func:`sourcefree.adapt` (aggregates only, no image data).

Every section is a frozen dataclass; :meth:`AdaptReport.to_dict` gives the JSON
object written to ``OUT/report.json`` (the keys and their order are those of
docs/engine.md), and :meth:`AdaptReport.from_dict` reads one back. Metrics,
label-free scores, training phases and the method's own report stay plain
JSON objects (their classes own their ``to_dict``). Importing this module does
not import torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from sourcefree.package.loader import PACKAGE_DIR as PACKAGE_DIR
from sourcefree.package.loader import REPORT_NAME as REPORT_NAME

#: The adapted model passes the calibrated gate when its estimated gain exceeds this
#: many standard errors of the per-image changes (a one-sided test at about 97.7 %).
#: Here (torch-free) so that the gate and report.html read one value.
GATE_Z = 2.0

#: ``stability`` (two extra views per image) is scored on at most this many of the
#: gate's images, every k-th of them: it is reported, never decides, and its views
#: would otherwise triple the gate's cost (docs/selection.md "Cost and subsample").
STABILITY_SAMPLE = 256


def view_stride(scored: int, view_images: int) -> int:
    """Every how many of ``scored`` images the views are scored (1: all; 0 views: all)."""
    if view_images == 0 or scored <= view_images:
        return 1
    return -(-scored // view_images)


def stability_images(scored: int) -> int:
    """How many of ``scored`` images ``adapt`` scores the views of."""
    return -(-scored // view_stride(scored, STABILITY_SAMPLE)) if scored > 0 else 0


REPORT_FORMAT = "sourcefree-adapt-report-v1"
EVALUATION_NOTE = "labels were checked before adaptation and used after it, for this report only"

Json = dict[str, Any]


class _Flat:
    """``to_dict`` of a dataclass whose fields are the JSON object's keys, in order."""

    def to_dict(self) -> Json:
        out: Json = dataclasses.asdict(cast(Any, self))
        return out


@dataclass(frozen=True)
class SampleInfo:
    """The images the gate and the label-free scores looked at (a seeded subsample, or all)."""

    sample_size: int
    target_images: int

    def to_dict(self) -> Json:
        return {
            "sample_size": self.sample_size,
            "target_images": self.target_images,
            "stability_images": stability_images(self.sample_size),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleInfo:
        return cls(d["sample_size"], d["target_images"])


@dataclass(frozen=True)
class GateMeasure:
    """The gate's label-free comparison of the adapted model with the reference source."""

    criterion: str
    estimated_gain: float | None
    reference_source: int
    calibrated: bool
    scores: Json
    """``{"source": Scores.to_dict(), "adapted": Scores.to_dict()}``."""
    standard_errors: Json


@dataclass(frozen=True)
class Accuracy:
    """True accuracy of both sides of the gate, judged with ``--eval-labels`` after it decided."""

    source: float | None
    adapted: float | None
    note: str

    def to_dict(self) -> Json:
        return {"source": self.source, "adapted": self.adapted, "note": self.note}


@dataclass(frozen=True)
class GateReport:
    """The do-no-harm verdict (``report["gate"]``); ``decision`` is what was exported."""

    enabled: bool
    decision: str
    verdict: str | None
    forced: bool
    reason: str
    note: str | None
    """Provenance note of an exported source model; None when the gate did not run."""
    sample: SampleInfo
    measure: GateMeasure | None = None
    """None: the gate was off, or no candidate finished."""
    accuracy: Accuracy | None = None

    def to_dict(self) -> Json:
        m = self.measure
        out: Json = {
            "enabled": self.enabled,
            "decision": self.decision,
            "verdict": self.verdict,
            "forced": self.forced,
        }
        if m is not None:
            out.update(criterion=m.criterion, estimated_gain=m.estimated_gain)
        out["reason"] = self.reason
        if self.note is not None:
            out["note"] = self.note
        if m is not None:
            out.update(reference_source=m.reference_source, calibrated=m.calibrated)
        out["scores"] = None if m is None else m.scores
        out.update(self.sample.to_dict())
        if m is not None:
            out["standard_errors"] = m.standard_errors
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateReport:
        measure = None
        if "criterion" in d:
            keys = ("criterion", "estimated_gain", "reference_source", "calibrated")
            measure = GateMeasure(
                **{k: d[k] for k in keys}, scores=d["scores"], standard_errors=d["standard_errors"]
            )
        acc = d.get("accuracy")
        return cls(
            **{k: d[k] for k in ("enabled", "decision", "verdict", "forced", "reason")},
            note=d.get("note"),
            sample=SampleInfo.from_dict(d),
            measure=measure,
            accuracy=None if acc is None else Accuracy(**acc),
        )


@dataclass(frozen=True)
class CandidateReport:
    """One candidate of ``-m auto`` / ``--select auto`` (values as reported: rounded)."""

    candidate: str
    method: str
    overrides: Json
    status: str
    seconds: float
    scores: Json | None
    value: float | None
    chosen: bool
    detail: str = ""
    judged: bool = False
    """True once ``--eval-labels`` judged it: ``accuracy`` is then reported (maybe None)."""
    accuracy: float | None = None
    passes_gate: bool | None = None
    """Whether the do-no-harm gate passes it, when the ranking rule asked (passing first)."""

    def to_dict(self) -> Json:
        fields = ("candidate", "method", "overrides", "status", "seconds", "scores", "value")
        out: Json = {k: getattr(self, k) for k in (*fields, "chosen")}
        if self.passes_gate is not None:
            out["passes_gate"] = self.passes_gate
        if self.detail:
            out["detail"] = self.detail
        if self.judged:
            out["accuracy"] = self.accuracy
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CandidateReport:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "judged"]
        return cls(**{k: d[k] for k in names if k in d}, judged="accuracy" in d)


@dataclass(frozen=True)
class SelectionReport:
    """``report["selection"]``: the candidates of ``-m auto`` / ``--select auto`` and the pick."""

    mode: str
    select: str
    criterion: str | None
    criterion_reason: str | None
    budget_s: float | None
    sample: SampleInfo
    chosen: str | None
    candidates: tuple[CandidateReport, ...]
    note: str | None = None

    def to_dict(self) -> Json:
        out: Json = {
            "mode": self.mode,
            "select": self.select,
            "criterion": self.criterion,
            "criterion_reason": self.criterion_reason,
            "budget_s": self.budget_s,
            **self.sample.to_dict(),
            "chosen": self.chosen,
            "candidates": [c.to_dict() for c in self.candidates],
        }
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SelectionReport:
        return cls(
            **{k: d[k] for k in ("mode", "select", "criterion", "criterion_reason", "budget_s")},
            sample=SampleInfo.from_dict(d),
            chosen=d["chosen"],
            candidates=tuple(CandidateReport.from_dict(c) for c in d["candidates"]),
            note=d.get("note"),
        )


@dataclass(frozen=True)
class ExportReport(_Flat):
    """The exported package's hash, which model it holds, and its ONNX parity."""

    sha256: str
    model: str
    parity_max_abs_logits: float
    parity_top1_agreement: float


@dataclass(frozen=True)
class EvaluationReport:
    """Source vs adapted metrics with ``--eval-labels`` (``Metrics.to_dict()`` objects)."""

    source: tuple[Json, ...]
    adapted: Json
    pseudo_labels: Json | None = None
    note: str = EVALUATION_NOTE

    @property
    def source_accuracy(self) -> tuple[float, ...]:
        """Top-1 accuracy of each source package on the labelled target images."""
        return tuple(float(m["accuracy"]) for m in self.source)

    @property
    def adapted_accuracy(self) -> float:
        """Top-1 accuracy of the exported package on the labelled target images."""
        return float(self.adapted["accuracy"])

    def to_dict(self) -> Json:
        out: Json = {"note": self.note, "source": list(self.source), "adapted": self.adapted}
        if self.pseudo_labels is not None:
            out["pseudo_labels"] = self.pseudo_labels
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationReport:
        return cls(tuple(d["source"]), d["adapted"], d.get("pseudo_labels"), d["note"])


@dataclass(frozen=True)
class Timings(_Flat):
    """Wall-clock seconds of the stages (rounded to ms)."""

    load: float
    train: float
    export: float
    evaluate: float
    total: float

    @classmethod
    def between(
        cls, t0: float, loaded: float, trained: float, exported: float, end: float
    ) -> Timings:
        """From ``time.perf_counter()`` marks: start, data loaded, trained, exported, end."""
        spans = (loaded - t0, trained - loaded, exported - trained, end - exported, end - t0)
        return cls(*(round(s, 3) for s in spans))


@dataclass(frozen=True)
class SourceRef:
    """A source package by name, version and manifest hash (and the key that verified it)."""

    name: str
    version: str
    sha256: str
    signer: str | None = None
    """Fingerprint of the vendor key that verified its signature (``adapt --key``); never
    a path. Left out of the JSON when no key verified it."""

    def to_dict(self) -> Json:
        out: Json = {"name": self.name, "version": self.version, "sha256": self.sha256}
        if self.signer is not None:
            out["signer"] = self.signer
        return out


@dataclass(frozen=True)
class AdaptReport:
    """The whole ``report.json``: the run, its training, the gate, the export, the timings.

    ``AdaptResult.report`` of :func:`sourcefree.adapt`; :meth:`to_dict` is the
    ``report.json`` object, key for key.

    Examples:
        >>> report = adapt(request).report
        >>> report.gate.decision, report.gate.reason  # "adapted", or "source" when kept
        >>> report.timings.train, report.timings.total  # seconds
        >>> report.evaluation.adapted_accuracy  # with eval_labels (else evaluation is None)
        >>> report.to_dict()["gate"]["decision"]  # the JSON object
    """

    method: str
    config: Json
    seed: int
    device: str
    amp: str
    memory_format: str
    sources: tuple[SourceRef, ...]
    target_images: int
    target_read: Json
    """The read summary of the target images (total, ok, bad, reasons, ignored)."""
    resumed: bool
    world_size: int
    checkpoints_written: int
    phases: tuple[Json, ...]
    method_report: Json
    gate: GateReport
    export: ExportReport
    timings: Timings
    selection: SelectionReport | None = None
    evaluation: EvaluationReport | None = None
    package: str = PACKAGE_DIR
    format: str = REPORT_FORMAT
    plan: Json | None = None
    """The run's plan (``sourcefree.pipeline.runplan.RunPlan.to_dict``): phases, steps,
    the estimated and the measured training seconds."""
    preset: str = "cpu"
    """The config preset the run started from (``--preset``: ``cpu`` or ``paper``)."""
    target_cache: Json | None = None
    """How the decoded-image cache was used (``sourcefree.data.cache.CacheInfo.to_dict``:
    ``reused``, ``bytes``, and ``refused`` when a cache file there was not trusted);
    None: the images were decoded into memory."""
    memory: Json | None = None
    """``{"budget_bytes": B, "features": {"storage", "bytes", "within_budget"}}``: the
    memory budget and the largest feature bank of the method's labelling passes
    (``sourcefree.engine.feature_bank.MemoryBudget.report``); None: it used no bank."""

    def to_dict(self) -> Json:
        out: Json = {
            "format": self.format,
            **{k: getattr(self, k) for k in ("method", "preset", "config", "seed", "device")},
            "amp": self.amp,
            "memory_format": self.memory_format,
            "sources": [s.to_dict() for s in self.sources],
            "target": self._target(),
            "resumed": self.resumed,
            "world_size": self.world_size,
            "checkpoints_written": self.checkpoints_written,
            "phases": list(self.phases),
            "method_report": self.method_report,
            "package": self.package,
            "gate": self.gate.to_dict(),
        }
        if self.selection is not None:
            out["selection"] = self.selection.to_dict()
        out["export"] = self.export.to_dict()
        if self.evaluation is not None:
            out["evaluation"] = self.evaluation.to_dict()
        if self.plan is not None:
            out["plan"] = self.plan
        if self.memory is not None:
            out["memory"] = self.memory
        out["timings_s"] = self.timings.to_dict()
        return out

    def _target(self) -> Json:
        out: Json = {"images": self.target_images, "read": dict(self.target_read)}
        if self.target_cache is not None:
            out["cache"] = dict(self.target_cache)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdaptReport:
        """The report of a ``report.json`` object (KeyError: a key is missing)."""
        plain = ("method", "config", "seed", "device", "amp", "memory_format")
        counts = ("resumed", "world_size", "checkpoints_written")
        selection, evaluation = d.get("selection"), d.get("evaluation")
        return cls(
            **{k: d[k] for k in plain},
            sources=tuple(SourceRef(**s) for s in d["sources"]),
            target_images=d["target"]["images"],
            target_read=d["target"]["read"],
            **{k: d[k] for k in counts},
            phases=tuple(d["phases"]),
            method_report=d["method_report"],
            gate=GateReport.from_dict(d["gate"]),
            export=ExportReport(**d["export"]),
            timings=Timings(**d["timings_s"]),
            selection=None if selection is None else SelectionReport.from_dict(selection),
            evaluation=None if evaluation is None else EvaluationReport.from_dict(evaluation),
            package=d["package"],
            format=d["format"],
            plan=d.get("plan"),
            target_cache=d["target"].get("cache"),
            memory=d.get("memory"),
            preset=d.get("preset", "cpu"),
        )
