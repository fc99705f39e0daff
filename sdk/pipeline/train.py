"""Stage 2 of ``adapt``: train the method (one run, the candidates, or this rank's slices).

:func:`train_one` is the one place that builds a method on the sources and the
target and runs its :class:`~sourcefree.engine.trainer.Trainer`: the single run
(with checkpoints), each candidate of ``-m auto`` / ``--select auto`` (without),
and the other ranks under torchrun. Importing this module does not import torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sourcefree.pipeline.decide import Sources, gate_outputs, score_sources
from sourcefree.pipeline.prepare import Prepared, fresh_model
from sourcefree.pipeline.report import CandidateReport, SelectionReport

if TYPE_CHECKING:
    from sourcefree.engine.method import Method
    from sourcefree.engine.models import Classifier
    from sourcefree.engine.trainer import StepInfo, TrainResult
    from sourcefree.engine.workdir import Workdir
    from sourcefree.pipeline import selection


def train_one(
    cls: type[Method],
    cfg: Any,
    prep: Prepared,
    models: Sequence[Classifier],
    *,
    on_step: Callable[[StepInfo], None] | None,
    workdir: Workdir | None = None,
    resume: bool = False,
) -> tuple[Method, TrainResult]:
    """Build ``cls(cfg, context)`` on ``models`` (one per package) and the target; train it.

    The global seed is set right before the method is built, so every run, candidate
    and rank starts from the same state; ``workdir``: checkpoints (the single run).
    """
    from sourcefree.engine.feature_bank import MemoryBudget
    from sourcefree.engine.method import MethodContext, SourceModel
    from sourcefree.engine.reproducibility import seed_everything
    from sourcefree.engine.trainer import Trainer

    request = prep.request
    seed_everything(request.seed)
    context = MethodContext(
        sources=tuple(SourceModel(p, m) for p, m in zip(prep.pkgs, models, strict=True)),
        data=prep.data,
        device=prep.dev,
        seed=request.seed,
        memory=MemoryBudget(request.memory_budget, _spill_dir(prep)),
    )
    instance = cls(cfg, context)
    trainer = Trainer(
        instance,
        prep.data,
        device=prep.dev,
        seed=request.seed,
        workdir=workdir,
        checkpoint_every_s=request.checkpoint_every_s,
        progress=request.progress,
        on_step=on_step,
    )
    return instance, trainer.run(resume=resume)


def _spill_dir(prep: Prepared) -> Path | None:
    """This process's private run directory (where its decoded-image cache is), or None."""
    if prep.workdir is not None:
        return prep.workdir.path
    return None if prep.cache_file is None else prep.cache_file.parent


@dataclass
class CandidateRun:
    """One candidate of ``-m auto`` / ``--select auto`` (predictions stay in memory)."""

    candidate: selection.Candidate
    status: str = "not started"
    detail: str = ""
    seconds: float = 0.0
    scores: selection.Scores | None = None
    value: float | None = None
    passes_gate: bool | None = None
    """Whether the gate passes it (None: the rule did not ask)."""
    predictions: Any = None
    chosen: bool = False

    def report(self) -> CandidateReport:
        """The candidate's row of ``report["selection"]`` (rounded as reported)."""
        return CandidateReport(
            candidate=self.candidate.label,
            method=self.candidate.method,
            overrides=dict(self.candidate.overrides.items()),
            status=self.status,
            seconds=round(self.seconds, 3),
            scores=None if self.scores is None else self.scores.to_dict(),
            value=None if self.value is None else float(f"{self.value:.6g}"),
            chosen=self.chosen,
            detail=self.detail[:300],
            passes_gate=self.passes_gate,
        )


@dataclass(frozen=True)
class Trained:
    """What training left: the method instance (None: no candidate finished) and its records."""

    instance: Method | None
    result: TrainResult | None
    method: str
    """The method trained (the chosen candidate's), or the request's when none finished."""
    config: dict[str, Any]
    adapted: selection.Outputs | None = None
    """The chosen candidate's outputs on the gate's subsample (candidates only)."""
    sources: Sources | None = None
    """The sources scored before the candidates (candidates only)."""
    runs: tuple[CandidateRun, ...] = ()
    ranking: selection.Ranking | None = None

    def memory_report(self) -> dict[str, Any] | None:
        """``report["memory"]``: the budget and the largest feature bank the trained
        method used (:meth:`sourcefree.engine.feature_bank.MemoryBudget.report`); None
        when it used none."""
        memory = None if self.instance is None else self.instance.context.memory
        return None if memory is None else memory.report()

    def selection_report(self, prep: Prepared) -> SelectionReport | None:
        """``report["selection"]`` of ``-m auto`` / ``--select auto`` (None for a single run)."""
        request = prep.request
        if not request.multi:
            return None
        return SelectionReport(
            mode="auto-method" if request.auto else "grid",
            select=request.select,
            criterion=None if self.ranking is None else self.ranking.rule,
            criterion_reason=None if self.ranking is None else self.ranking.reason,
            budget_s=request.budget_s,
            sample=prep.sample_info,
            chosen=next((r.candidate.label for r in self.runs if r.chosen), None),
            candidates=tuple(r.report() for r in self.runs),
        )


def train(prep: Prepared, workdir: Workdir) -> Trained:
    """Train the named method (checkpoints in ``workdir``), or every candidate in turn."""
    from sourcefree.engine.reproducibility import seed_everything

    request = prep.request
    sources = score_sources(prep, with_scores=True) if request.multi else None
    seed_everything(request.seed)
    if sources is not None:
        return _train_candidates(prep, sources)
    instance, result = train_one(
        prep.named_method(),
        prep.cfg,
        prep,
        prep.models,
        on_step=request.on_step,
        workdir=workdir,
        resume=request.resume,
    )
    return Trained(instance, result, request.method, prep.config)


def _train_candidates(prep: Prepared, sources: Sources) -> Trained:
    """Train every candidate in turn (no checkpoints); keep the best by label-free value.

    Every finished candidate stays in memory until all are done, since the values
    of :func:`sourcefree.pipeline.selection.rank_candidates` depend on the whole pool.
    """
    from sourcefree.engine import config as cfgmod
    from sourcefree.pipeline import selection

    budget_s = prep.request.budget_s
    start = time.perf_counter()
    runs: list[CandidateRun] = []
    done: list[tuple[CandidateRun, Method, TrainResult, selection.Outputs, Any]] = []
    for cand in prep.plan:
        run = CandidateRun(cand)
        runs.append(run)
        if budget_s is not None and time.perf_counter() - start >= budget_s:
            run.detail = f"the {budget_s:g} s budget was spent"
            continue
        finished = _train_candidate(prep, run, sources, start)
        if finished is not None:
            done.append((run, *finished))
    if not done:
        return Trained(
            None, None, prep.request.method, prep.config, sources=sources, runs=tuple(runs)
        )
    pool = [(r.scores, o) for r, _, _, o, _ in done if r.scores is not None]
    ranking = selection.rank_candidates(pool, sources.reference_scores())
    for i, (r, *_) in enumerate(done):
        r.value = ranking.values[i]
        r.passes_gate = bool(ranking.passing[i]) if ranking.passing else None
    run, instance, result, outputs, cfg = done[ranking.best()]
    run.chosen = True
    return Trained(
        instance,
        result,
        instance.name,
        cfgmod.public_dict(cfg),
        outputs,
        sources,
        tuple(runs),
        ranking,
    )


def _train_candidate(
    prep: Prepared, run: CandidateRun, sources: Sources, start: float
) -> tuple[Method, TrainResult, selection.Outputs, Any] | None:
    """Train one candidate; record its status, time, scores and predictions in ``run``.

    Returns the instance, train result, outputs on the subsample and config, or None
    when it was skipped, failed or stopped by the budget (a signal stops everything).
    """
    from sourcefree.engine import config as cfgmod
    from sourcefree.engine.registry import get_method
    from sourcefree.errors import RequirementError, RunInterruptedError, SourcefreeError
    from sourcefree.pipeline import selection

    request, cand = prep.request, run.candidate
    budget_s, on_step = request.budget_s, request.on_step
    t = time.perf_counter()
    cls = get_method(cand.method)
    spent = [False]

    def hook(info: StepInfo) -> None:
        if on_step is not None:
            on_step(info)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            spent[0] = True
            info.request_stop()

    try:
        user = cfgmod.load_config(
            cls.config_class, file=request.config_file, overrides=request.overrides, base=prep.base
        )
        cfg = selection.apply_overrides(cls.config_class, cfgmod.to_dict(user), cand.overrides)
        models = [fresh_model(p, prep.dev) for p in prep.pkgs]
        instance, result = train_one(cls, cfg, prep, models, on_step=hook)
        outputs = gate_outputs(
            instance.export_model(), prep, f"scoring {cand.label}", features=True
        )
    except RunInterruptedError:
        if not spent[0]:
            raise  # a signal: stop everything
        run.status, run.detail = "stopped", f"the {budget_s:g} s budget was spent during training"
    except RequirementError as exc:
        # e.g. adafer on a package without an AU detector: not a failure of the run.
        run.status, run.detail = "skipped", f"the package lacks what it needs: {exc.what}"
    except SourcefreeError as exc:
        run.status, run.detail = "failed", f"{type(exc).__name__}: {exc.what}"
    run.seconds = time.perf_counter() - t
    if run.status != "not started":
        return None
    run.status = "done"
    run.scores = selection.score_outputs(outputs, sources.reference, sources.calibration)
    run.predictions = outputs.predictions.numpy()
    return instance, result, outputs, cfg
