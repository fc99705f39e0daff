"""``sourcefree.adapt``: adapt source package(s) to unlabelled target images, on site.

The output directory holds the adapted package and an aggregate report::

    OUT/
      package/       the adapted package (same format as a source package)
      report.json    method, resolved config, per-phase loss curves, timings,
                     read counts; source vs adapted metrics with --eval-labels
      report.html    the same as one self-contained page with inline SVG plots

:func:`adapt` takes one :class:`~sourcefree.pipeline.request.AdaptRequest` and
runs named stages: preflight (vendor keys and signatures, evaluation labels) ->
prepare (config, OUT, free disk space, packages, data, device, run directory;
:mod:`~sourcefree.pipeline.prepare`) -> the run's plan, logged before training
(:mod:`~sourcefree.pipeline.runplan`) -> train (:mod:`~sourcefree.pipeline.train`)
-> decide (gate, selection; :mod:`~sourcefree.pipeline.decide`) -> export ->
report (:class:`~sourcefree.pipeline.report.AdaptReport`).

OUT appears atomically (staged beside it, renamed at the end) and is claimed
for the whole run (an fcntl lock on ``.OUT.lock`` beside it): a second run
into the same OUT is refused while this one lives. A signal after training
(export, evaluation, report) removes the staging folder and keeps the run
directory, so ``--resume`` exports again without training again; so does a
typed error after training (a failed export parity check, a full disk), whose
message names the run directory and the ``--resume`` command. Evaluation
labels are read and checked once, before anything starts (a bad row fails in
the first second, not after training), and used only after adaptation finished,
to report; they never enter a decision. Importing this module does not import torch.

The target images are decoded once into a memory-mapped file in the run
directory (:mod:`sourcefree.data.cache`) and read from it in batches; a resumed
run, or any later run with the same run directory, data and decode settings,
reuses it (report.json ``target.cache.reused``).

Under ``torchrun`` (see docs/scaling.md) every rank reads the target images (its
own cache file) and trains its slice of each batch; rank 0 alone holds the run
directory (lock, identity, checkpoints) and writes OUT, while the other ranks
wait at a barrier and then receive the report and the package's bytes from it,
so :func:`adapt` returns the same result on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sourcefree.errors import (
    DistributedError,
    Interrupted,
    RunInterruptedError,
    SourcefreeError,
    WorkdirError,
)
from sourcefree.fsutil import claimed_output, shown, staged_directory, write_errors
from sourcefree.package import strictjson
from sourcefree.package.loader import Package, load_package
from sourcefree.pipeline.decide import Decision, decide, judge_with_labels
from sourcefree.pipeline.prepare import (
    Preflight,
    Prepared,
    default_workdir,
    load_target,
    preflight,
    prepare,
)
from sourcefree.pipeline.report import (
    PACKAGE_DIR,
    REPORT_NAME,
    AdaptReport,
    EvaluationReport,
    ExportReport,
    SourceRef,
    Timings,
)
from sourcefree.pipeline.request import AdaptRequest
from sourcefree.pipeline.runplan import log_plan, plan_run
from sourcefree.pipeline.train import Trained, train, train_one

if TYPE_CHECKING:
    import numpy as np

    from sourcefree.engine.method import Method
    from sourcefree.engine.workdir import Workdir

__all__ = [
    "PACKAGE_DIR",
    "REPORT_NAME",
    "AdaptRequest",
    "AdaptResult",
    "adapt",
    "default_workdir",
    "load_target",
]


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt` produced."""

    out: Path
    package: Package
    """The adapted package, read back and verified from ``out/package``."""
    report: AdaptReport
    """The typed ``out/report.json``: ``report.to_dict()`` is its content, key for key.
    Under torchrun every rank holds rank 0's report (the one written to ``out``)."""
    rank: int = 0
    """This process's rank under torchrun (only rank 0 wrote ``out``)."""


def adapt(request: AdaptRequest) -> AdaptResult:
    """Adapt source package(s) to the images under ``request.data`` and write ``request.out``.

    Stages: prepare -> train -> decide -> export -> report (module docstring);
    every argument is a field of :class:`AdaptRequest`. ``method="auto"`` tries
    every registered method that takes this many packages, cheapest first, and
    keeps the best by label-free score.

    Raises:
        SourcefreeError subclasses: ConfigError, PackageError, DatasetError,
        ResumeError, WorkdirError, CheckpointError, TrainingError, ExportError;
        RunInterruptedError (exit code 75) after SIGINT/SIGTERM and a checkpoint;
        Interrupted (KeyboardInterrupt, 128 + signal) after a signal before any
        checkpoint; WriteError (full disk, read-only folder); SourcefreeError
        when another run holds ``out`` (:func:`sourcefree.fsutil.claimed_output`).

    Examples:
        >>> from sourcefree import AdaptRequest, adapt
        >>> result = adapt(AdaptRequest("vendor-pkg/", "faces/", method="tent", out="adapted/"))
        >>> result.package.manifest.kind, result.report.gate.decision
        ('adapted', 'adapted')
        >>> result.report.timings.total, result.report.to_dict()["timings_s"]["total"]  # seconds
        >>> request = AdaptRequest(
        ...     "vendor-pkg/", "faces/", method="auto", out="auto/", budget_s=1800,
        ...     eval_labels="labels.csv",  # for the report only, after the decisions
        ... )
        >>> report = adapt(request).report
        >>> report.selection.chosen, report.evaluation.adapted["accuracy"]  # a candidate's label
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from sourcefree.engine import distributed
    from sourcefree.engine.device import amp_policy

    # Keys and signatures, then a bad labels CSV, fail before anything starts.
    early = preflight(request)
    started_group = distributed.init_from_env(request.device)
    claim = contextlib.ExitStack()
    try:
        claim.enter_context(amp_policy(request.amp, request.device))  # before anything is written
        if distributed.is_main():  # rank 0 alone writes OUT
            claim.enter_context(claimed_output(request.out))
        return _run(request, early)
    finally:
        claim.close()
        if started_group:
            distributed.shutdown()


def _run(request: AdaptRequest, early: Preflight) -> AdaptResult:
    """The stages on this rank: rank 0 holds the run directory and writes OUT."""
    from sourcefree.engine import distributed

    prep = prepare(request, early)  # rank 0: the run directory is open and checked
    if not distributed.is_main():
        return _other_rank(prep)
    wd = prep.workdir
    if wd is None:  # pragma: no cover - prepare opens it on rank 0
        raise WorkdirError("rank 0 has no run directory", "prepare opens it", "report a bug")
    trained: Trained | None = None
    try:
        plan = plan_run(prep)
        log_plan(plan)  # stderr of the CLI, before training starts
        t_started = time.perf_counter()
        trained = train(prep, wd)
        t_trained = time.perf_counter()
        planned = plan.to_dict(actual_train_s=round(t_trained - t_started, 3))
        report = _export_and_report(prep, trained, decide(prep, trained), t_trained, planned)
    except BaseException as exc:
        wd.close()
        if isinstance(exc, Interrupted) and not request.multi and wd.has_checkpoints():
            raise RunInterruptedError(
                f"the run stopped ({exc.signal_name}) before finishing {shown(prep.target)}",
                "a partial output is never left there; the run directory keeps the last checkpoint",
                f"run the same command again with --resume ({request.command(resume=True)}): "
                "it continues from that checkpoint (after training: only the export and the "
                "report are redone)",
            ) from None
        if trained is not None and isinstance(exc, SourcefreeError):
            raise _after_training(exc, prep, trained, wd) from exc
        raise
    if request.keep_workdir:
        wd.close()
    else:
        wd.remove()
    package = load_package(prep.target / PACKAGE_DIR)
    done = AdaptResult(out=prep.target, package=package, report=report)
    if distributed.is_distributed():
        distributed.barrier()
        return _share_result(prep.target, done)
    return done


def _after_training(
    exc: SourcefreeError, prep: Prepared, trained: Trained, wd: Workdir
) -> SourcefreeError:
    """``exc``, raised after training finished, saying what was kept and how to retry.

    A single run's weights are in its run directory's last checkpoint: ``--resume``
    redoes only the gate, the export and the report. The candidates of ``-m auto``
    / ``--select auto`` lived in memory only: they are lost.
    """
    request = prep.request
    if isinstance(exc, RunInterruptedError):
        return exc
    if not request.multi:
        if not wd.has_checkpoints():
            return exc
        kept = f"training finished; its weights are kept in the run directory {shown(wd.path)}"
        retry = (
            "then retry without training again, with the same command and --resume: "
            f"{request.command(resume=True)} (Python: the same AdaptRequest with resume=True); "
            "only the gate, the export and the report are redone"
        )
    else:
        chosen = next((r.candidate for r in trained.runs if r.chosen), None)
        if chosen is None:
            return exc
        flag = "-m auto" if request.auto else "--select auto"
        kept = (
            f"the trained candidates were held in memory only ({flag} writes no checkpoint "
            "and cannot resume), so their training is lost"
        )
        settings = " and --set KEY=VALUE for each of its settings" if chosen.overrides else ""
        retry = (
            "then run the command again (training runs again), or train the chosen "
            f"candidate {chosen.label} alone: -m {chosen.method}{settings} instead of {flag}; "
            "a single run writes checkpoints and can retry its export with --resume"
        )
    why = f"{exc.why.rstrip('.')}. {kept[:1].upper()}{kept[1:]}" if exc.why else kept
    fix = f"{exc.fix.rstrip('.')}; {retry}" if exc.fix else retry[len("then ") :]
    return type(exc)(exc.what, why, fix)


#: Labelled images turned into model input at a time for ``--eval-labels`` (a multiple
#: of the predictor's batch of 256, so its batches are those of one whole-set call).
EVAL_CHUNK = 4096


def _evaluation(
    prep: Prepared, truth: np.ndarray, adapted: Package, instance: Method | None
) -> EvaluationReport:
    """Source vs adapted metrics on the labelled target images (decoded once, at load).

    The images go through the predictors :data:`EVAL_CHUNK` at a time, so memory
    holds one chunk of float input, never all of them.
    """
    import numpy as np

    from sourcefree.runtime.evaluation import compute_metrics
    from sourcefree.runtime.predictor import Predictor

    labelled = np.flatnonzero(truth >= 0)
    y = truth[labelled]
    packages = [*prep.pkgs, adapted]
    predictors = [Predictor(p, device="cpu", batch_size=256) for p in packages]
    preds: list[list[np.ndarray]] = [[] for _ in packages]
    for start in range(0, len(labelled), EVAL_CHUNK):
        x = prep.data.tensor(labelled[start : start + EVAL_CHUNK]).numpy()
        for out, predictor in zip(preds, predictors, strict=True):
            out.append(predictor.predict_array(x).indices)
    metrics = [
        compute_metrics(y, np.concatenate(p).astype(np.int64), pkg.manifest.labels).to_dict()
        for p, pkg in zip(preds, packages, strict=True)
    ]
    source, adapted_metrics = tuple(metrics[:-1]), metrics[-1]
    selected = None if instance is None else instance.pseudo_label_selection()
    pseudo = None
    if selected is not None:
        pseudo = _pseudo_label_report(selected, truth, prep.pkgs[0].manifest.labels)
        pseudo["source_accuracy"] = source[0]["accuracy"]
    return EvaluationReport(source, adapted_metrics, pseudo)


def _pseudo_label_report(
    selection: tuple[Any, Any], truth: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Precision and coverage of a method's pseudo-labels against evaluation labels."""
    import numpy as np

    from sourcefree.errors import TrainingError
    from sourcefree.runtime.evaluation import pseudo_label_quality

    indices = selection[0].detach().cpu().numpy().astype(np.int64).reshape(-1)
    chosen = selection[1].detach().cpu().numpy().astype(np.int64).reshape(-1)
    if indices.shape != chosen.shape or (
        indices.size and (indices.min() < 0 or indices.max() >= len(truth))
    ):
        raise TrainingError(
            "the method's pseudo_label_selection() is malformed",
            f"{indices.size} indices and {chosen.size} labels for {len(truth)} images",
            "return (dataset indices, labels) of equal length, indices in range",
        )
    return pseudo_label_quality(indices, chosen, truth, labels)


def _export_and_report(
    prep: Prepared, trained: Trained, decision: Decision, t_trained: float, plan: dict[str, Any]
) -> AdaptReport:
    """Export, then report, into a staged OUT (renamed into place when both are written).

    ``plan``: ``report["plan"]``, its measured training time filled in.
    """
    instance = trained.instance
    method_report = instance.diagnostics() if instance is not None else {}
    with staged_directory(prep.target, overwrite=prep.request.overwrite) as stage:
        adapted, export = _export(prep, decision, stage / PACKAGE_DIR)
        marks = (prep.t0, prep.t_loaded, t_trained, time.perf_counter())
        report = _report(prep, trained, decision, adapted, export, method_report, marks, plan)
        _write_report(stage, prep.target, report, prep.pkgs[0].manifest.labels)
    return report


def _export(prep: Prepared, decision: Decision, out: Path) -> tuple[Package, ExportReport]:
    """Write the decided model as the adapted package; its hash and ONNX parity."""
    from sourcefree.export.adapted import adapted_package

    adapted, parity = adapted_package(
        decision.model,
        sources=decision.sources,
        method=decision.method,
        config=decision.config,
        num_target_images=len(prep.data),
        architecture=decision.architecture,
        out=out,
        note=decision.gate.note if decision.keep_source else None,
        progress=prep.request.progress,
    )
    return adapted, ExportReport(
        sha256=adapted.sha256,
        model="source" if decision.keep_source else "adapted",
        parity_max_abs_logits=float(parity.max_abs_logits),
        parity_top1_agreement=float(parity.top1_agreement),
    )


def _report(
    prep: Prepared,
    trained: Trained,
    decision: Decision,
    adapted: Package,
    export: ExportReport,
    method_report: dict[str, Any],
    marks: tuple[float, float, float, float],
    plan: dict[str, Any] | None = None,
) -> AdaptReport:
    """The typed report; with ``--eval-labels`` metrics and judged decisions are added.

    ``marks``: ``time.perf_counter()`` at start, data loaded, trained and exported;
    ``plan``: ``report["plan"]``.
    """
    gate, selection = decision.gate, trained.selection_report(prep)
    evaluation = None
    if prep.truth is not None:
        evaluation = _evaluation(prep, prep.truth, adapted, trained.instance)
        predictions = [r.predictions for r in trained.runs]
        gate, selection = judge_with_labels(
            decision, selection, predictions, truth=prep.truth, sample=prep.sample
        )
    return AdaptReport(
        **_run_fields(prep, trained),
        method_report=method_report,
        gate=gate,
        export=export,
        timings=Timings.between(*marks, time.perf_counter()),
        selection=selection,
        evaluation=evaluation,
        plan=plan,
    )


def _write_report(stage: Path, target: Path, report: AdaptReport, labels: Sequence[str]) -> None:
    """report.json and report.html into the staged OUT (errors name the final paths)."""
    from sourcefree.pipeline.report_html import REPORT_HTML_NAME, render_report

    content = report.to_dict()
    with write_errors(target / REPORT_NAME):
        (stage / REPORT_NAME).write_bytes(strictjson.dumps(content))
    html = render_report(content, labels=labels)
    with write_errors(target / REPORT_HTML_NAME):
        (stage / REPORT_HTML_NAME).write_text(html, encoding="utf-8")


def _run_fields(prep: Prepared, trained: Trained) -> dict[str, Any]:
    """The report's fields about the run: method, config, device, sources, target, training."""
    from sourcefree.engine import distributed

    result = trained.result
    return {
        "method": trained.method,
        "preset": prep.request.preset,
        "config": trained.config,
        "seed": prep.request.seed,
        "device": result.device if result is not None else str(prep.dev),
        "amp": result.amp if result is not None else "off",
        "memory_format": result.memory_format if result is not None else "contiguous",
        "sources": tuple(
            SourceRef(p.manifest.name, p.manifest.version, p.sha256, p.signer) for p in prep.pkgs
        ),
        "target_images": len(prep.data),
        "target_read": dict(prep.data.read_summary),
        "target_cache": None if prep.cache is None else prep.cache.to_dict(),
        "memory": trained.memory_report(),
        "resumed": result is not None and result.resumed_from is not None,
        "world_size": distributed.world_size(),
        "checkpoints_written": result.checkpoints if result is not None else 0,
        "phases": tuple(log.to_dict() for log in result.phases) if result is not None else (),
    }


def _other_rank(prep: Prepared) -> AdaptResult:
    """A rank other than 0: train its slices, write nothing, wait for rank 0's result."""
    from sourcefree.data.cache import discard
    from sourcefree.engine import distributed

    request = prep.request
    train_one(
        prep.named_method(),
        prep.cfg,
        prep,
        prep.models,
        on_step=request.on_step,
        resume=request.resume,
    )
    distributed.barrier()  # rank 0 exports, evaluates and writes OUT meanwhile
    result = _share_result(prep.target, None)
    if prep.cache_file is not None and not request.keep_workdir:
        discard(prep.cache_file)  # this rank's own decoded images (rank 0 removes its own)
    return result


def _share_result(target: Path, result: AdaptResult | None) -> AdaptResult:
    """Rank 0's report and package bytes on every rank (rank 0 passes its result)."""
    from sourcefree.engine import distributed
    from sourcefree.package.manifest import MANIFEST_NAME, Manifest

    head: dict[str, Any] | None = None
    body = b""
    if result is not None:
        files = {REPORT_NAME: strictjson.dumps(result.report.to_dict())}
        files.update({f"{PACKAGE_DIR}/{k}": v for k, v in result.package.blobs.items()})
        files[f"{PACKAGE_DIR}/{MANIFEST_NAME}"] = result.package.manifest_bytes
        head = {name: {"size": len(data)} for name, data in files.items()}
        body = b"".join(files[name] for name in sorted(files))  # the header's (sorted) order
    framed = distributed.broadcast_framed(head, body, what="result")
    if result is not None:
        return result
    if framed is None:
        raise DistributedError("rank 0 sent no result", "it must send its report", "run again")
    sizes, body = framed
    files, offset = {}, 0
    for name, entry in sorted(sizes.items()):
        files[name] = body[offset : offset + entry["size"]]
        offset += entry["size"]
    manifest_bytes = files.pop(f"{PACKAGE_DIR}/{MANIFEST_NAME}")
    report = AdaptReport.from_dict(
        strictjson.loads(files.pop(REPORT_NAME), what=REPORT_NAME, max_bytes=len(body))
    )
    manifest = Manifest.from_dict(
        strictjson.loads(manifest_bytes, what=MANIFEST_NAME, max_bytes=len(manifest_bytes))
    )
    package = Package(
        path=target / PACKAGE_DIR,
        manifest=manifest,
        manifest_bytes=manifest_bytes,
        sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        signed=False,
        signature_verified=False,
        blobs={k[len(PACKAGE_DIR) + 1 :]: v for k, v in files.items()},
    )
    return AdaptResult(out=target, package=package, report=report, rank=distributed.rank())
