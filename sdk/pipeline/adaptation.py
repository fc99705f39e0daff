"""``sourcefree.adapt``: adapt source package(s) to unlabelled target images, on site.

The output directory holds the adapted package and an aggregate report::

    OUT/
      package/       the adapted package (same format as a source package)
      report.json    method, resolved config, per-phase loss curves, timings,
                     read counts; source vs adapted metrics with --eval-labels
      report.html    the same as one self-contained page with inline SVG plots

OUT appears atomically (staged beside it, renamed at the end) and is claimed
for the whole run (an fcntl lock on ``.OUT.lock`` beside it): a second run
into the same OUT is refused while this one lives. A signal after training
(export, evaluation, report) removes the staging folder and keeps the run
directory, so ``--resume`` exports again without training again. Evaluation
labels are read and checked once, before anything starts (a bad row fails in
the first second, not after training), and used only after adaptation finished,
to report; they never enter a decision. Importing this module does not import torch.

Under ``torchrun`` (see docs/scaling.md) every rank reads the target images and
trains its slice of each batch; rank 0 alone holds the run directory (lock,
identity, checkpoints) and writes OUT, while the other ranks wait at a barrier
and then receive the report and the package's bytes from it, so :func:`adapt`
returns the same result on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sourcefree._version import __version__
from sourcefree.errors import (
    ConfigError,
    DistributedError,
    Interrupted,
    ResumeError,
    RunInterruptedError,
    WorkdirError,
)
from sourcefree.fsutil import (
    check_output_dir,
    claimed_output,
    shown,
    staged_directory,
    write_errors,
)
from sourcefree.package import strictjson
from sourcefree.package.loader import Package, load_package

if TYPE_CHECKING:
    import numpy as np

    from sourcefree.data.dataset import ImageDataset
    from sourcefree.engine.method import Method, TargetData
    from sourcefree.engine.models import Classifier
    from sourcefree.engine.trainer import StepInfo, TrainResult
    from sourcefree.pipeline import selection

PACKAGE_DIR = "package"
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt` produced."""

    out: Path
    package: Package
    """The adapted package, read back and verified from ``out/package``."""
    report: dict[str, Any]
    """The content of ``out/report.json``."""
    rank: int = 0
    """This process's rank under torchrun (only rank 0 wrote ``out``)."""


def default_workdir(out: str | os.PathLike[str]) -> Path:
    """The run directory used when none is given: ``.<OUT>.work`` beside OUT."""
    target = Path(out).absolute()
    return target.with_name(f".{target.name}.work")


def _packages(
    packages: str | os.PathLike[str] | Package | Sequence[str | os.PathLike[str] | Package],
) -> list[Package]:
    single = isinstance(packages, (str, os.PathLike, Package))
    items: list[Any] = [packages] if single else list(packages)  # type: ignore[arg-type]
    return [p if isinstance(p, Package) else load_package(p) for p in items]


def _check_sources(pkgs: Sequence[Package], method: str, lo: int, hi: int) -> None:
    if not lo <= len(pkgs) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise ConfigError(
            f"method {method!r} takes {want} source package(s), got {len(pkgs)}",
            "each method declares how many source models it adapts",
            "pass the right number of packages before DATA"
            + (" (la-cmfer takes several)" if hi == 1 else ""),
        )
    first = pkgs[0].manifest
    for other in pkgs[1:]:
        m = other.manifest
        if m.labels != first.labels or m.input != first.input:
            raise ConfigError(
                f"source packages {first.name!r} and {m.name!r} do not match",
                "several sources must share labels (same order) and input spec",
                "use packages exported for the same classes and preprocessing",
            )


def load_target(
    data: str | os.PathLike[str],
    spec: Any,
    *,
    max_bad_fraction: float = 0.05,
    strict: bool = False,
) -> TargetData:
    """Read every image under ``data`` (unlabelled) at the package's input size.

    Raises:
        DatasetError: no image, too many unreadable images, or one with ``strict``.
    """
    return _read_target(data, spec, max_bad_fraction=max_bad_fraction, strict=strict)[0]


def _read_target(
    data: str | os.PathLike[str],
    spec: Any,
    *,
    max_bad_fraction: float,
    strict: bool,
) -> tuple[TargetData, list[str]]:
    """:func:`load_target` and the key (path relative to ``data``) of each image kept.

    The keys stay in :func:`adapt` to match evaluation labels after the run;
    they never reach a method or a report.
    """
    from sourcefree.data.readers import read_image_folder
    from sourcefree.engine.method import TargetData

    dataset = read_image_folder(data)
    loaded = dataset.load(
        spec.size,
        spec.color,
        interpolation=spec.interpolation,
        max_bad_fraction=max_bad_fraction,
        strict=strict,
    )
    fp = dataset.fingerprint()
    report = loaded.report
    summary = {
        "total": report.total,
        "ok": report.ok,
        "bad": report.bad,
        "reasons": dict(sorted(report.reasons.items())),
        "ignored": report.ignored,
    }
    target = TargetData(
        images=loaded.images,
        spec=spec,
        fingerprint=strictjson.dumps(
            {"digest": fp.digest, "files": fp.files, "bytes": fp.bytes}
        ).decode(),
        read_summary=summary,
    )
    return target, [dataset.samples[int(i)].key for i in loaded.indices]


def _identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    from sourcefree.data.dataset import Fingerprint
    from sourcefree.engine.config import diff

    out: list[str] = []
    if old.get("method") != new.get("method"):
        out.append(f"the method changed ({old.get('method')} -> {new.get('method')})")
    if old.get("sources") != new.get("sources"):
        before = ", ".join(s[:12] for s in old.get("sources", []))
        after = ", ".join(s[:12] for s in new.get("sources", []))
        out.append(f"the source package changed (sha256 {before}... -> {after}...)")
    if old.get("dataset") != new.get("dataset"):
        a, b = old.get("dataset", {}), new.get("dataset", {})
        try:
            change = Fingerprint(**a).describe_change(Fingerprint(**b))
        except TypeError:
            change = "its fingerprint differs"
        out.append(f"the target dataset changed ({change})")
    if old.get("config") != new.get("config"):
        changes = diff(old.get("config", {}), new.get("config", {}))
        out.append("the config changed (" + "; ".join(changes[:5]) + ")")
    if old.get("seed") != new.get("seed"):
        out.append(f"the seed changed ({old.get('seed')} -> {new.get('seed')})")
    return out


def _pseudo_label_report(
    selection: tuple[Any, Any],
    truth: np.ndarray,
    labels: Sequence[str],
    *,
    source_accuracy: float,
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
    out = pseudo_label_quality(indices, chosen, truth, labels)
    out["source_accuracy"] = source_accuracy
    return out


def _check_multi(
    auto: bool,
    resume: bool,
    config: Any,
    config_file: str | os.PathLike[str] | None,
    overrides: Sequence[str],
) -> None:
    """Refuse what ``-m auto`` / ``--select auto`` cannot honour."""
    from sourcefree.engine import distributed

    flag = "-m auto" if auto else "--select auto"
    if resume:
        raise ResumeError(
            f"{flag} cannot resume",
            "candidates run without checkpoints, one after the other",
            f"run {flag} again without --resume, or resume a run of one method",
        )
    if distributed.is_distributed():
        raise ConfigError(
            f"{flag} does not run under torchrun",
            "candidates are trained one after the other in one process",
            "run it in one process, or name one method and its config",
        )
    if auto and (config is not None or config_file is not None or overrides):
        raise ConfigError(
            "-m auto takes no config",
            "each method runs with its own defaults; --set and --config name one method's keys",
            "drop --set/--config, or name the method",
        )


def _fresh(pkg: Package, dev: Any, *, check: bool = False) -> Classifier:
    """A fresh copy of a package's model on ``dev`` (methods may train theirs in place).

    ``check``: first refuse a package whose model.onnx computes another function
    (done once per package, at its first load; later copies reuse the same bytes).
    """
    from sourcefree.engine.models import load_classifier
    from sourcefree.export.onnx import check_package_agreement

    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    if check:
        check_package_agreement(pkg, model)
    return model.to(dev).eval()


def _reference_source(outputs: Sequence[selection.Outputs], pkgs: Sequence[Package]) -> int:
    """The source the gate compares with: the best ATC estimate among calibrated ones, else 0."""
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


@dataclass
class _Run:
    """One candidate of ``-m auto`` / ``--select auto`` (predictions stay in memory)."""

    candidate: selection.Candidate
    status: str = "not started"
    detail: str = ""
    seconds: float = 0.0
    scores: selection.Scores | None = None
    value: float | None = None
    predictions: Any = None
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "candidate": self.candidate.label,
            "method": self.candidate.method,
            "overrides": {k: v for k, v in self.candidate.overrides.items()},
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "scores": None if self.scores is None else self.scores.to_dict(),
            "value": None if self.value is None else float(f"{self.value:.6g}"),
            "chosen": self.chosen,
        }
        if self.detail:
            out["detail"] = self.detail[:300]
        return out


def _run_candidates(
    plan: Sequence[selection.Candidate],
    *,
    base: Mapping[str, Any] | None,
    config_file: str | os.PathLike[str] | None,
    overrides: Sequence[str],
    pkgs: Sequence[Package],
    target_data: TargetData,
    dev: Any,
    seed: int,
    budget_s: float | None,
    progress: bool,
    on_step: Callable[[StepInfo], None] | None,
    source: selection.Outputs,
    source_scores: selection.Scores,
    calibration: Any,
    runs: list[_Run],
    sample: Any = None,
) -> tuple[Method, TrainResult, selection.Outputs, Any, selection.Ranking] | None:
    """Train every candidate in turn (no checkpoints); keep the best by label-free value.

    Every finished candidate stays in memory until all are done, since the values
    of :func:`sourcefree.pipeline.selection.rank_candidates` depend on the whole pool.
    ``runs`` receives one record per candidate. Returns the chosen candidate's
    method instance, train result, outputs and config, and the ranking, or None
    when none finished. ``sample``: the gate's subsample (indices, or None: all);
    ``source`` holds the source's outputs on it, computed once for all candidates.
    """
    from sourcefree.engine import config as cfgmod
    from sourcefree.engine.method import MethodContext, SourceModel
    from sourcefree.engine.registry import get_method
    from sourcefree.engine.trainer import Trainer, seed_everything
    from sourcefree.errors import RequirementError, RunInterruptedError, SourcefreeError
    from sourcefree.pipeline import selection

    start = time.perf_counter()
    done: list[tuple[_Run, Method, TrainResult, selection.Outputs, Any]] = []
    for cand in plan:
        run = _Run(cand)
        runs.append(run)
        if budget_s is not None and time.perf_counter() - start >= budget_s:
            run.detail = f"the {budget_s:g} s budget was spent"
            continue
        t = time.perf_counter()
        cls = get_method(cand.method)
        spent = [False]

        def hook(info: StepInfo, _spent: list[bool] = spent) -> None:
            if on_step is not None:
                on_step(info)
            if budget_s is not None and time.perf_counter() - start > budget_s:
                _spent[0] = True
                info.request_stop()

        try:
            user = cfgmod.load_config(
                cls.config_class, file=config_file, overrides=overrides, base=base
            )
            cfg = selection.apply_overrides(cls.config_class, cfgmod.to_dict(user), cand.overrides)
            models = tuple(SourceModel(p, _fresh(p, dev)) for p in pkgs)
            seed_everything(seed)
            instance = cls(cfg, MethodContext(models, target_data, dev, seed))
            result = Trainer(
                instance, target_data, device=dev, seed=seed, progress=progress, on_step=hook
            ).run()
            outputs = selection.model_outputs(
                instance.export_model(), target_data, device=dev, indices=sample
            )
        except RunInterruptedError:
            if not spent[0]:
                raise  # a signal: stop everything
            run.status = "stopped"
            run.detail = f"the {budget_s:g} s budget was spent during training"
            run.seconds = time.perf_counter() - t
            continue
        except RequirementError as exc:
            # e.g. adafer on a package without an AU detector: not a failure of the run.
            run.status = "skipped"
            run.detail = f"the package lacks what it needs: {exc.what}"
            run.seconds = time.perf_counter() - t
            continue
        except SourcefreeError as exc:
            run.status = "failed"
            run.detail = f"{type(exc).__name__}: {exc.what}"
            run.seconds = time.perf_counter() - t
            continue
        run.seconds = time.perf_counter() - t
        run.status = "done"
        run.scores = selection.score_outputs(outputs, source, calibration)
        run.predictions = outputs.predictions.numpy()
        done.append((run, instance, result, outputs, cfg))
    if not done:
        return None
    ranking = selection.rank_candidates(
        [(r.scores, o) for r, _, _, o, _ in done if r.scores is not None], source_scores
    )
    for (r, *_), value in zip(done, ranking.values, strict=True):
        r.value = value
    run, instance, result, outputs, cfg = done[ranking.best()]
    run.chosen = True
    return instance, result, outputs, cfg, ranking


def _gate(
    *,
    gate: bool,
    force: bool,
    adapted: selection.Outputs | None,
    sources: Sequence[selection.Outputs],
    ref: int,
    calibration: Any,
    method: str,
    trained: bool,
    source_scores: selection.Scores | None = None,
    sample: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The do-no-harm verdict for ``report["gate"]`` (decision: what is exported).

    ``source_scores``: the reference source's scores when already computed;
    ``sample``: ``sample_size`` and ``target_images`` of the images scored.
    """
    from sourcefree.pipeline import selection

    sampled = dict(sample or {})

    if not trained:
        return {
            "enabled": gate,
            "decision": "source",
            "verdict": "source",
            "forced": False,
            "reason": "no candidate finished within the budget; the source model is exported",
            "note": "no adaptation candidate finished within the budget; source model kept",
            "scores": None,
            **sampled,
        }
    if not gate or adapted is None:
        return {
            "enabled": False,
            "decision": "adapted",
            "verdict": None,
            "forced": False,
            "reason": "the gate was switched off (--no-gate)",
            "scores": None,
            **sampled,
        }
    src = source_scores or selection.score_outputs(sources[ref], sources[ref], calibration)
    ada = selection.score_outputs(adapted, sources[ref], calibration)
    result = selection.gate_decision(src, ada, method=method)
    decision = "adapted" if force else result.decision
    reason = result.reason
    gain = "" if result.estimated_gain is None else f", estimated gain {result.estimated_gain:+.3f}"
    # Provenance note: short (audit flags free text over 200 characters), no image data.
    note = f"do-no-harm gate kept the source model: {method[:40]} estimated worse"
    note += f" ({result.criterion}{gain})"
    if force and result.decision == "source":
        reason += "; exported anyway (--force)"
    return {
        "enabled": True,
        "decision": decision,
        "verdict": result.decision,
        "forced": force and result.decision == "source",
        "criterion": result.criterion,
        "estimated_gain": result.to_dict()["estimated_gain"],
        "reason": reason,
        "note": note,
        "reference_source": ref,
        "calibrated": calibration is not None,
        "scores": {"source": src.to_dict(), "adapted": ada.to_dict()},
        **sampled,
        "standard_errors": {
            "source": selection.standard_errors(sources[ref], sources[ref], calibration),
            "adapted": selection.standard_errors(adapted, sources[ref], calibration),
            "estimated_gain": result.to_dict()["standard_error"],
        },
    }


def _eval_truth(eval_set: ImageDataset, target_data: TargetData, keys: Sequence[str]) -> np.ndarray:
    """Evaluation label of every kept target image (-1: unlabelled), before any training.

    Raises:
        DatasetError: no labelled image was readable (all were skipped at load).
    """
    from sourcefree.errors import DatasetError
    from sourcefree.runtime.evaluation import labels_of

    truth = labels_of(eval_set, keys)
    if not (truth >= 0).any():
        raise DatasetError(
            "no image that the labels CSV labels could be read",
            f"its {len(eval_set)} labelled images were all skipped as unreadable "
            f"({len(target_data)} target images read)",
            "label readable images, or replace the unreadable ones",
        )
    return truth


def _evaluation(
    pkgs: Sequence[Package],
    adapted: Package,
    target_data: TargetData,
    truth: np.ndarray,
    instance: Method | None,
) -> dict[str, Any]:
    """Source vs adapted metrics on the labelled target images (decoded once, at load)."""
    import numpy as np

    from sourcefree.runtime.evaluation import evaluate_inputs

    labelled = np.flatnonzero(truth >= 0)
    x, y = target_data.tensor(labelled).numpy(), truth[labelled]
    evaluation: dict[str, Any] = {
        "note": "labels were checked before adaptation and used after it, for this report only",
        "source": [evaluate_inputs(p, x, y, device="cpu").to_dict() for p in pkgs],
        "adapted": evaluate_inputs(adapted, x, y, device="cpu").to_dict(),
    }
    selected = None if instance is None else instance.pseudo_label_selection()
    if selected is not None:
        evaluation["pseudo_labels"] = _pseudo_label_report(
            selected,
            truth,
            pkgs[0].manifest.labels,
            source_accuracy=evaluation["source"][0]["accuracy"],
        )
    return evaluation


def _accuracy(predictions: Any, truth: Any) -> float | None:
    import numpy as np

    mask = truth >= 0
    if predictions is None or not mask.any():
        return None
    return round(float(np.mean(np.asarray(predictions)[mask] == truth[mask])), 6)


def _judge_with_labels(
    report: dict[str, Any],
    runs: Sequence[_Run],
    adapted: selection.Outputs | None,
    source: selection.Outputs | None,
    *,
    truth: Any,
    sample: Any = None,
) -> None:
    """True accuracy of every candidate and of both sides of the gate, after the decisions.

    The outputs cover the gate's subsample (``sample``: indices, or None: every
    image), so these accuracies are on it too.
    """
    note = "labels were used after the decisions, to judge them; they chose nothing"
    if sample is not None:
        truth = truth[sample]
        note += f"; on the gate's subsample of {len(truth)} images"
    gate = report["gate"]
    if gate.get("scores") is not None and adapted is not None and source is not None:
        gate["accuracy"] = {
            "source": _accuracy(source.predictions.numpy(), truth),
            "adapted": _accuracy(adapted.predictions.numpy(), truth),
            "note": note,
        }
    if "selection" in report:
        for row, run in zip(report["selection"]["candidates"], runs, strict=True):
            row["accuracy"] = _accuracy(run.predictions, truth)
        report["selection"]["note"] = note


def adapt(
    packages: str | os.PathLike[str] | Package | Sequence[str | os.PathLike[str] | Package],
    data: str | os.PathLike[str],
    *,
    method: str,
    out: str | os.PathLike[str],
    config: Any = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    workdir: str | os.PathLike[str] | None = None,
    keep_workdir: bool = False,
    device: str = "auto",
    eval_labels: str | os.PathLike[str] | None = None,
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    checkpoint_every_s: float = 600.0,
    on_step: Callable[[StepInfo], None] | None = None,
    select: str = "none",
    gate: bool = True,
    force: bool = False,
    budget_s: float | None = None,
    amp: str = "auto",
    gate_sample: int | str | None = None,
) -> AdaptResult:
    """Adapt source package(s) to the images under ``data`` and write ``out``.

    Args:
        packages: one source package (or several, for methods that take them).
        data: folder of unlabelled target images (read recursively).
        method: registered method name (``sourcefree methods``).
        out: output directory (package + report); must not exist unless ``overwrite``.
        config: a config instance or a dict of overrides of the method's defaults.
        config_file: YAML file of overrides.
        overrides: ``key=value`` strings (dotted keys for nested sections).
        resume: continue from the newest checkpoint in the run directory.
        workdir: private run directory (default ``.<OUT>.work`` beside OUT).
        keep_workdir: keep the run directory after success.
        device: ``auto``, ``cpu`` or ``cuda``.
        eval_labels: labels CSV for reporting source vs adapted metrics only.
        seed: seed of all randomness.
        max_bad_fraction: tolerated fraction of unreadable images.
        strict: stop at the first unreadable image.
        overwrite: replace an existing ``out``.
        progress: progress bars on stderr.
        checkpoint_every_s: interval of timer checkpoints.
        on_step: callback after each training step (tests, custom progress).
        select: ``none``, or ``auto``: run the method's ``selection_grid`` and keep
            the candidate with the best label-free score (docs/selection.md).
        gate: run the do-no-harm gate: export the source model instead when the
            adapted one is estimated worse without labels (``report["gate"]``).
        force: export the adapted model even when the gate estimates it worse.
        budget_s: wall-clock budget of ``-m auto`` / ``--select auto`` candidates
            (checked before each candidate and after every training step).
        amp: bf16 autocast of the training steps: ``auto`` (on for CUDA GPUs with
            bf16, off on the CPU), ``bf16`` or ``off``; losses stay fp32 (``report["amp"]``).
        gate_sample: how many target images the gate and the label-free scores
            look at (a seeded random subsample, the same for every model of the
            run): a count, ``0`` or ``"all"`` (every image); None: 8,192
            (``selection.GATE_SAMPLE``, docs/selection.md "Cost and subsample").

    ``method="auto"`` tries every registered method that takes this many
    packages, cheapest first, and keeps the best by label-free score.

    Raises:
        SourcefreeError subclasses: ConfigError, PackageError, DatasetError,
        ResumeError, WorkdirError, CheckpointError, TrainingError, ExportError;
        RunInterruptedError (exit code 75) after SIGINT/SIGTERM and a checkpoint;
        Interrupted (KeyboardInterrupt, 128 + signal) after a signal before any
        checkpoint; WriteError (full disk, read-only folder); SourcefreeError
        when another run holds ``out`` (:func:`sourcefree.fsutil.claimed_output`).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from sourcefree.engine import distributed
    from sourcefree.pipeline import selection

    sample_size = selection.gate_sample_size(gate_sample)  # refused before anything starts
    packages, eval_set = _checked_eval_set(packages, data, eval_labels)
    started_group = distributed.init_from_env(device)
    claim = contextlib.ExitStack()
    try:
        from sourcefree.engine.trainer import amp_policy

        claim.enter_context(amp_policy(amp, device))  # checked before anything is written
        if distributed.is_main():  # rank 0 alone writes OUT
            claim.enter_context(claimed_output(out))
        return _adapt(
            packages,
            data,
            method=method,
            out=out,
            config=config,
            config_file=config_file,
            overrides=overrides,
            resume=resume,
            workdir=workdir,
            keep_workdir=keep_workdir,
            device=device,
            eval_set=eval_set,
            seed=seed,
            max_bad_fraction=max_bad_fraction,
            strict=strict,
            overwrite=overwrite,
            progress=progress,
            checkpoint_every_s=checkpoint_every_s,
            on_step=on_step,
            select=select,
            gate=gate,
            force=force,
            budget_s=budget_s,
            sample_size=sample_size,
        )
    finally:
        claim.close()
        if started_group:
            distributed.shutdown()


def _checked_eval_set(
    packages: Any, data: str | os.PathLike[str], eval_labels: str | os.PathLike[str] | None
) -> tuple[Any, ImageDataset | None]:
    """Parse and check ``--eval-labels`` once, before anything starts (packages loaded if so)."""
    if eval_labels is None:
        return packages, None
    from sourcefree.runtime.evaluation import labelled_dataset

    loaded = _packages(packages)
    return loaded, labelled_dataset(data, eval_labels, loaded[0].manifest.labels)


def _share_result(target: Path, result: AdaptResult | None) -> AdaptResult:
    """Rank 0's report and package bytes on every rank (rank 0 passes its result)."""
    from sourcefree.engine import distributed
    from sourcefree.package.manifest import MANIFEST_NAME, Manifest

    head: dict[str, Any] | None = None
    body = b""
    if result is not None:
        files = {REPORT_NAME: strictjson.dumps(result.report)}
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
    report = strictjson.loads(files.pop(REPORT_NAME), what=REPORT_NAME, max_bytes=len(body))
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


def _adapt(
    packages: str | os.PathLike[str] | Package | Sequence[str | os.PathLike[str] | Package],
    data: str | os.PathLike[str],
    *,
    method: str,
    out: str | os.PathLike[str],
    config: Any,
    config_file: str | os.PathLike[str] | None,
    overrides: Sequence[str],
    resume: bool,
    workdir: str | os.PathLike[str] | None,
    keep_workdir: bool,
    device: str,
    eval_set: ImageDataset | None,
    seed: int,
    max_bad_fraction: float,
    strict: bool,
    overwrite: bool,
    progress: bool,
    checkpoint_every_s: float,
    on_step: Callable[[StepInfo], None] | None,
    select: str,
    gate: bool,
    force: bool,
    budget_s: float | None,
    sample_size: int,
) -> AdaptResult:
    import dataclasses

    import torch

    from sourcefree.engine import config as cfgmod
    from sourcefree.engine import distributed
    from sourcefree.engine.method import MethodContext, SourceModel
    from sourcefree.engine.registry import get_method
    from sourcefree.engine.trainer import Trainer, resolve_device, seed_everything
    from sourcefree.engine.workdir import Workdir
    from sourcefree.errors import TrainingError
    from sourcefree.export.adapted import adapted_package
    from sourcefree.pipeline import selection
    from sourcefree.pipeline.report_html import REPORT_HTML_NAME, render_report

    t0 = time.perf_counter()
    if select not in ("none", "auto"):
        raise ConfigError(
            f"--select {select!r} is not known",
            "selection is 'none' (the config as given) or 'auto' (the method's grid)",
            "pass --select auto or leave it out",
        )
    if budget_s is not None and not budget_s > 0:
        raise ConfigError(f"--budget-s {budget_s}", "the budget must be positive", "")
    auto = method == selection.AUTO_METHOD
    multi = auto or select == "auto"
    if multi:
        _check_multi(auto, resume, config, config_file, overrides)
    if config is not None and dataclasses.is_dataclass(config) and not isinstance(config, type):
        base: Mapping[str, Any] | None = cfgmod.to_dict(config)
    else:
        base = config
    cls: type[Method] | None = None
    cfg: Any = None
    config_dict: dict[str, Any] = {}
    if not auto:
        cls = get_method(method)
        cfg = cfgmod.load_config(cls.config_class, file=config_file, overrides=overrides, base=base)
        config_dict = cfgmod.to_dict(cfg)
    target = Path(out).absolute()
    main = distributed.is_main()
    if main:
        check_output_dir(target, overwrite)
    pkgs = _packages(packages)
    if cls is not None:
        _check_sources(pkgs, method, cls.min_sources, cls.max_sources)
    plan: list[selection.Candidate] = []
    if multi:
        names = selection.auto_methods(len(pkgs)) if auto else [method]
        if not names:
            raise ConfigError(
                f"-m auto: no registered method takes {len(pkgs)} source package(s)",
                "every method declares how many source models it adapts",
                "pass one package, or name a method",
            )
        plan = selection.plan_candidates(names, grid=select == "auto")
        if cls is not None:
            for cand in plan:  # a --set of a grid key is refused before any training
                selection.apply_overrides(cls.config_class, config_dict, cand.overrides)
    spec = pkgs[0].manifest.input
    dev = distributed.device_for_rank(resolve_device(device))
    models = [_fresh(p, dev, check=True) for p in pkgs]
    target_data, target_keys = _read_target(
        data, spec, max_bad_fraction=max_bad_fraction, strict=strict
    )
    truth = None if eval_set is None else _eval_truth(eval_set, target_data, target_keys)
    t_loaded = time.perf_counter()
    # The gate's subsample: one for every model and candidate of the run, and for a
    # resumed run (a pure function of N, size and seed; outputs are recomputed).
    sample = selection.sample_indices(len(target_data), sample_size, seed)
    sample_info = {
        "sample_size": len(target_data) if sample is None else len(sample),
        "target_images": len(target_data),
    }

    identity = {
        "format": "sourcefree-run-v1",
        "method": method,
        "config": config_dict,
        "dataset": strictjson.loads(
            target_data.fingerprint.encode(), what="fingerprint", max_bytes=1 << 16
        ),
        "sources": [p.sha256 for p in pkgs],
        "seed": seed,
        "sdk_version": __version__,
    }
    if not main:
        return _other_rank(
            cls, cfg, pkgs, models, target_data, dev, seed, resume, progress, on_step, target
        )
    wd = Workdir(workdir if workdir is not None else default_workdir(target)).open()
    try:
        previous = wd.read_identity()
        if resume:
            if previous is None or not wd.has_checkpoints():
                raise ResumeError(
                    f"nothing to resume in {str(wd.path)!r}",
                    "no checkpoint was written there",
                    "run without --resume (or pass the --workdir of the interrupted run)",
                )
            changes = _identity_diff(previous, identity)
            if changes:
                raise ResumeError(
                    "cannot resume: the inputs differ from the interrupted run",
                    "; ".join(changes),
                    "run again with the original inputs, or start a fresh run without "
                    f"--resume after removing {str(wd.path)!r}",
                )
        else:
            if wd.has_checkpoints():
                raise WorkdirError(
                    f"run directory {str(wd.path)!r} holds checkpoints of an earlier run",
                    "a fresh run would overwrite them",
                    "pass --resume to continue that run, or remove the directory",
                )
            if not multi:
                wd.write_identity(identity)
        calibrations = [p.manifest.source_stats for p in pkgs]
        sources_out: list[selection.Outputs] = []

        def score_sources() -> tuple[int, Any]:
            # Fresh copies: methods may train context.sources[i].model in place.
            sources_out[:] = [
                selection.model_outputs(_fresh(p, dev), target_data, device=dev, indices=sample)
                for p in pkgs
            ]
            ref = _reference_source(sources_out, pkgs)
            stats = calibrations[ref]
            return ref, stats.calibration if stats is not None else None

        ref, ref_cal = 0, None
        src_scores: selection.Scores | None = None
        if multi:  # candidates are scored against the source as they finish
            ref, ref_cal = score_sources()
        seed_everything(seed)
        instance: Method | None = None
        result: TrainResult | None = None
        runs: list[_Run] = []
        adapted_out: selection.Outputs | None = None
        ranking: selection.Ranking | None = None
        if multi:
            src_scores = selection.score_outputs(sources_out[ref], sources_out[ref], ref_cal)
            chosen = _run_candidates(
                plan,
                base=base,
                config_file=config_file,
                overrides=overrides,
                pkgs=pkgs,
                target_data=target_data,
                dev=dev,
                seed=seed,
                budget_s=budget_s,
                progress=progress,
                on_step=on_step,
                source=sources_out[ref],
                source_scores=src_scores,
                calibration=ref_cal,
                runs=runs,
                sample=sample,
            )
            if chosen is not None:
                instance, result, adapted_out, cfg, ranking = chosen
                method = instance.name
                config_dict = cfgmod.to_dict(cfg)
        else:
            single = get_method(method)
            context = MethodContext(
                sources=tuple(SourceModel(p, m) for p, m in zip(pkgs, models, strict=True)),
                data=target_data,
                device=dev,
                seed=seed,
            )
            instance = single(cfg, context)
            trainer = Trainer(
                instance,
                target_data,
                device=dev,
                seed=seed,
                workdir=wd,
                checkpoint_every_s=checkpoint_every_s,
                progress=progress,
                on_step=on_step,
            )
            result = trainer.run(resume=resume)
        t_trained = time.perf_counter()
        model = None if instance is None else instance.export_model()
        if gate and not multi:  # after training: under torchrun the other ranks are done
            ref, ref_cal = score_sources()
        if model is not None and adapted_out is None and gate:
            adapted_out = selection.model_outputs(model, target_data, device=dev, indices=sample)
        verdict = _gate(
            gate=gate,
            force=force,
            adapted=adapted_out,
            sources=sources_out,
            ref=ref,
            calibration=ref_cal,
            method=method,
            trained=instance is not None,
            source_scores=src_scores,
            sample=sample_info,
        )
        keep_source = verdict["decision"] == "source"
        if keep_source:
            export_model = _fresh(pkgs[ref], torch.device("cpu"))
            export_sources = [pkgs[ref], *[p for i, p in enumerate(pkgs) if i != ref]]
            export_method, export_config = "source", {}
            architecture = pkgs[ref].manifest.architecture.name
        else:
            if model is None or instance is None:
                raise TrainingError(
                    "no adapted model to export", "no candidate finished", "report this bug"
                )
            export_model = model
            export_sources = list(pkgs)
            export_method, export_config = method, config_dict
            architecture = instance.export_architecture()
        export_model = export_model.to("cpu", torch.float32).eval()
        report: dict[str, Any] = {
            "format": "sourcefree-adapt-report-v1",
            "method": method,
            "config": config_dict,
            "seed": seed,
            "device": result.device if result is not None else str(dev),
            "amp": result.amp if result is not None else "off",
            "memory_format": result.memory_format if result is not None else "contiguous",
            "sources": [
                {"name": p.manifest.name, "version": p.manifest.version, "sha256": p.sha256}
                for p in pkgs
            ],
            "target": {"images": len(target_data), "read": dict(target_data.read_summary)},
            "resumed": result is not None and result.resumed_from is not None,
            "world_size": distributed.world_size(),
            "checkpoints_written": result.checkpoints if result is not None else 0,
            "phases": [log.to_dict() for log in result.phases] if result is not None else [],
            "method_report": instance.report() if instance is not None else {},
            "package": PACKAGE_DIR,
            "gate": verdict,
        }
        if multi:
            report["selection"] = {
                "mode": "auto-method" if auto else "grid",
                "select": select,
                "criterion": None if ranking is None else ranking.rule,
                "criterion_reason": None if ranking is None else ranking.reason,
                "budget_s": budget_s,
                **sample_info,
                "chosen": next((r.candidate.label for r in runs if r.chosen), None),
                "candidates": [r.to_dict() for r in runs],
            }
        with staged_directory(target, overwrite=overwrite) as stage:
            adapted, parity = adapted_package(
                export_model,
                sources=export_sources,
                method=export_method,
                config=export_config,
                num_target_images=len(target_data),
                architecture=architecture,
                out=stage / PACKAGE_DIR,
                note=verdict["note"] if keep_source else None,
            )
            t_exported = time.perf_counter()
            report["export"] = {
                "sha256": adapted.sha256,
                "model": "source" if keep_source else "adapted",
                "parity_max_abs_logits": float(parity.max_abs_logits),
                "parity_top1_agreement": float(parity.top1_agreement),
            }
            if truth is not None:
                report["evaluation"] = _evaluation(pkgs, adapted, target_data, truth, instance)
                _judge_with_labels(
                    report,
                    runs,
                    adapted_out,
                    sources_out[ref] if sources_out else None,
                    truth=truth,
                    sample=sample,
                )
            t_end = time.perf_counter()
            report["timings_s"] = {
                "load": round(t_loaded - t0, 3),
                "train": round(t_trained - t_loaded, 3),
                "export": round(t_exported - t_trained, 3),
                "evaluate": round(t_end - t_exported, 3),
                "total": round(t_end - t0, 3),
            }
            with write_errors(target / REPORT_NAME):
                (stage / REPORT_NAME).write_bytes(strictjson.dumps(report))
            html = render_report(report, labels=pkgs[0].manifest.labels)
            with write_errors(target / REPORT_HTML_NAME):
                (stage / REPORT_HTML_NAME).write_text(html, encoding="utf-8")
    except BaseException as exc:
        wd.close()
        if isinstance(exc, Interrupted) and not multi and wd.has_checkpoints():
            raise RunInterruptedError(
                f"the run stopped ({exc.signal_name}) before finishing {shown(target)}",
                "a partial output is never left there; the run directory keeps the last checkpoint",
                "run the same command again with --resume: it continues from that "
                "checkpoint (after training: only the export and the report are redone)",
            ) from None
        raise
    if keep_workdir:
        wd.close()
    else:
        wd.remove()
    done = AdaptResult(out=target, package=load_package(target / PACKAGE_DIR), report=report)
    if distributed.is_distributed():
        distributed.barrier()
        return _share_result(target, done)
    return done


def _other_rank(
    cls: Any,
    cfg: Any,
    pkgs: Sequence[Package],
    models: Sequence[Any],
    target_data: TargetData,
    dev: Any,
    seed: int,
    resume: bool,
    progress: bool,
    on_step: Callable[[StepInfo], None] | None,
    target: Path,
) -> AdaptResult:
    """A rank other than 0: train its slices, write nothing, wait for rank 0's result."""
    from sourcefree.engine import distributed
    from sourcefree.engine.method import MethodContext, SourceModel
    from sourcefree.engine.trainer import Trainer, seed_everything

    seed_everything(seed)
    context = MethodContext(
        sources=tuple(SourceModel(p, m) for p, m in zip(pkgs, models, strict=True)),
        data=target_data,
        device=dev,
        seed=seed,
    )
    instance = cls(cfg, context)
    trainer = Trainer(
        instance, target_data, device=dev, seed=seed, progress=progress, on_step=on_step
    )
    trainer.run(resume=resume)
    distributed.barrier()  # rank 0 exports, evaluates and writes OUT meanwhile
    return _share_result(target, None)
