"""Stage 3 of ``adapt``: the do-no-harm gate decides what is exported (docs/selection.md).

The gate compares the adapted model with the reference source on the seeded
subsample, without labels; when it estimates the adapted model worse, the
source model is exported instead (unless ``force``). With ``--eval-labels`` the
decisions are judged afterwards (:func:`judge_with_labels`); labels never
enter a decision. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sourcefree.errors import TrainingError
from sourcefree.package.loader import Package
from sourcefree.pipeline.prepare import Prepared, fresh_model
from sourcefree.pipeline.report import (
    Accuracy,
    GateMeasure,
    GateReport,
    SampleInfo,
    SelectionReport,
)

if TYPE_CHECKING:
    import numpy as np

    from sourcefree.pipeline import selection
    from sourcefree.pipeline.train import Trained

NOT_TRAINED = "no candidate finished within the budget; the source model is exported"
NOT_TRAINED_NOTE = "no adaptation candidate finished within the budget; source model kept"
GATE_OFF = "the gate was switched off (--no-gate)"


@dataclass(frozen=True)
class Sources:
    """The source models' outputs on the gate's subsample and the reference among them."""

    outputs: list[selection.Outputs]
    ref: int
    """The source the gate compares with (:func:`reference_source`)."""
    calibration: Any
    """The reference's ATC calibration, None when its package has none."""
    scores: selection.Scores | None = None
    """The reference's scores, when computed before the candidates."""

    @property
    def reference(self) -> selection.Outputs:
        return self.outputs[self.ref]

    def reference_scores(self) -> selection.Scores:
        """The reference's label-free scores (against itself)."""
        from sourcefree.pipeline import selection

        if self.scores is not None:
            return self.scores
        return selection.score_outputs(self.reference, self.reference, self.calibration)


def reference_source(outputs: Sequence[selection.Outputs], pkgs: Sequence[Package]) -> int:
    """The best ATC estimate among the calibrated sources, else source 0."""
    from sourcefree.pipeline import selection

    best, ref = -1.0, 0
    for i, (out, pkg) in enumerate(zip(outputs, pkgs, strict=False)):
        stats = pkg.manifest.source_stats
        if stats is None or stats.calibration is None:
            continue
        value = selection.atc_accuracy(out, stats.calibration)
        if value > best:
            best, ref = value, i
    return ref


def gate_outputs(
    model: Any, prep: Prepared, desc: str, *, features: bool = False
) -> selection.Outputs:
    """A model's outputs on the gate's subsample, with the views of ``STABILITY_SAMPLE`` images
    and, with ``features`` (a candidate to rank), the features of ``CLASS_AMI_SAMPLE``."""
    from sourcefree.pipeline import selection

    return selection.model_outputs(
        model,
        prep.data,
        device=prep.dev,
        indices=prep.sample,
        view_images=selection.STABILITY_SAMPLE,
        feature_images=selection.CLASS_AMI_SAMPLE if features else None,
        progress=prep.request.progress,
        desc=desc,
    )


def score_sources(prep: Prepared, *, with_scores: bool = False) -> Sources:
    """Every source's outputs on the subsample (fresh copies: methods may train theirs in place).

    ``with_scores``: also score the reference once (for the candidates to share).
    """
    from sourcefree.pipeline import selection

    outputs = [
        gate_outputs(
            fresh_model(p, prep.dev),
            prep,
            "scoring source" if len(prep.pkgs) == 1 else f"scoring source {i + 1}",
        )
        for i, p in enumerate(prep.pkgs)
    ]
    ref = reference_source(outputs, prep.pkgs)
    stats = prep.pkgs[ref].manifest.source_stats
    cal = stats.calibration if stats is not None else None
    scores = selection.score_outputs(outputs[ref], outputs[ref], cal) if with_scores else None
    return Sources(outputs, ref, cal, scores)


def gate_report(
    *,
    gate: bool,
    force: bool,
    adapted: selection.Outputs | None,
    sources: Sources | None,
    method: str,
    trained: bool,
    sample: SampleInfo,
) -> GateReport:
    """The do-no-harm verdict (``decision``: what is exported); see docs/selection.md."""
    from sourcefree.pipeline import selection

    if not trained:
        return GateReport(gate, "source", "source", False, NOT_TRAINED, NOT_TRAINED_NOTE, sample)
    if not gate or adapted is None or sources is None:
        return GateReport(False, "adapted", None, False, GATE_OFF, None, sample)
    ref, cal = sources.reference, sources.calibration
    src = sources.reference_scores()
    ada = selection.score_outputs(adapted, ref, cal)
    result = selection.gate_decision(src, ada, method=method)
    gain = "" if result.estimated_gain is None else f", estimated gain {result.estimated_gain:+.3f}"
    # Provenance note: short (audit flags free text over 200 characters), no image data.
    note = f"do-no-harm gate kept the source model: {method[:40]} estimated worse"
    note += f" ({result.criterion}{gain})"
    forced = force and result.decision == "source"
    measure = GateMeasure(
        criterion=result.criterion,
        estimated_gain=result.to_dict()["estimated_gain"],
        reference_source=sources.ref,
        calibrated=cal is not None,
        scores={"source": src.to_dict(), "adapted": ada.to_dict()},
        standard_errors={
            "source": selection.standard_errors(ref, ref, cal),
            "adapted": selection.standard_errors(adapted, ref, cal),
            "estimated_gain": result.to_dict()["standard_error"],
        },
    )
    return GateReport(
        enabled=True,
        decision="adapted" if force else result.decision,
        verdict=result.decision,
        forced=forced,
        reason=result.reason + ("; exported anyway (--force)" if forced else ""),
        note=note,
        sample=sample,
        measure=measure,
    )


@dataclass(frozen=True)
class Decision:
    """What is exported: the gate's verdict and the model, sources, method and config."""

    gate: GateReport
    model: Any
    """The exported model, on the CPU in float32, in eval mode."""
    sources: list[Package]
    """The adapted package's sources (the kept source first when the source is exported)."""
    method: str
    config: dict[str, Any]
    architecture: str
    adapted: selection.Outputs | None
    """The adapted model's outputs on the subsample (None when the gate did not score it)."""
    reference: selection.Outputs | None
    """The reference source's outputs on the subsample (None when no source was scored)."""

    @property
    def keep_source(self) -> bool:
        return self.gate.decision == "source"


def decide(prep: Prepared, trained: Trained) -> Decision:
    """Run the gate on the trained model (a single run scores its sources now); pick the export."""
    import torch

    request, instance = prep.request, trained.instance
    model = None if instance is None else instance.export_model()
    sources = trained.sources
    if request.gate and not request.multi:  # after training: under torchrun the ranks are done
        sources = score_sources(prep)
    adapted = trained.adapted
    if model is not None and adapted is None and request.gate:
        adapted = gate_outputs(model, prep, "scoring adapted")
    verdict = gate_report(
        gate=request.gate,
        force=request.force,
        adapted=adapted,
        sources=sources,
        method=trained.method,
        trained=instance is not None,
        sample=prep.sample_info,
    )
    ref = 0 if sources is None else sources.ref
    if verdict.decision == "source":
        model = fresh_model(prep.pkgs[ref], torch.device("cpu"))
        pkgs = [prep.pkgs[ref], *[p for i, p in enumerate(prep.pkgs) if i != ref]]
        method, config = "source", {}
        architecture = prep.pkgs[ref].manifest.architecture.name
    elif model is None or instance is None:
        raise TrainingError(
            "no adapted model to export", "no candidate finished", "report this bug"
        )
    else:
        pkgs, method, config = list(prep.pkgs), trained.method, trained.config
        architecture = instance.export_architecture()
    return Decision(
        gate=verdict,
        model=model.to("cpu", torch.float32).eval(),
        sources=pkgs,
        method=method,
        config=config,
        architecture=architecture,
        adapted=adapted,
        reference=None if sources is None else sources.reference,
    )


def _accuracy(predictions: Any, truth: np.ndarray) -> float | None:
    import numpy as np

    mask = truth >= 0
    if predictions is None or not mask.any():
        return None
    return round(float(np.mean(np.asarray(predictions)[mask] == truth[mask])), 6)


def judge_with_labels(
    decision: Decision,
    selection_report: SelectionReport | None,
    predictions: Sequence[Any],
    *,
    truth: np.ndarray,
    sample: np.ndarray | None,
) -> tuple[GateReport, SelectionReport | None]:
    """True accuracy of every candidate and of both sides of the gate, after the decisions.

    The outputs cover the gate's subsample (``sample``: indices, or None: every
    image), so these accuracies are on it too. ``predictions``: each candidate's
    predictions on it (None for one that did not finish).
    """
    note = "labels were used after the decisions, to judge them; they chose nothing"
    if sample is not None:
        truth = truth[sample]
        note += f"; on the gate's subsample of {len(truth)} images"
    gate = decision.gate
    adapted, source = decision.adapted, decision.reference
    if gate.measure is not None and adapted is not None and source is not None:
        acc = Accuracy(
            _accuracy(source.predictions.numpy(), truth),
            _accuracy(adapted.predictions.numpy(), truth),
            note,
        )
        gate = dataclasses.replace(gate, accuracy=acc)
    if selection_report is not None:
        rows = tuple(
            dataclasses.replace(row, judged=True, accuracy=_accuracy(p, truth))
            for row, p in zip(selection_report.candidates, predictions, strict=True)
        )
        selection_report = dataclasses.replace(selection_report, candidates=rows, note=note)
    return gate, selection_report
