"""The run's plan, shown before training starts: images, phases, steps, estimated time.

:func:`plan_run` builds the method once more, on fresh copies of the source models;
its :class:`~sourcefree.engine.trainer.Trainer` gives the phases, epochs and steps
per epoch that the run's trainer then runs (``Method.phases()`` never depends on
randomness). Unless ``AdaptRequest(plan_probe=False)`` (``--no-plan-probe``), it
then times a few forward/backward passes of a copy of the first source model on
one batch of target images (:data:`PROBE_PASSES` passes, only when they cost at
most :data:`MAX_PROBE_SHARE` of the run's steps) and scales them to every phase's
steps. Nothing the run trains is touched and every random number generator
(torch CPU and CUDA, numpy, ``random``) is restored afterwards, so the results are
bitwise those of a run without a plan.

The estimate counts the phases' steps only (one forward, and a backward when the
phase trains); augmentations, several views per image and the whole-set passes of
epoch hooks make a run longer. ``report.json``'s ``plan`` holds it beside the
measured training time. The plan goes to the ``sourcefree`` logger (INFO: the CLI
prints it on stderr, ``-q`` hides it). Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sourcefree.pipeline.prepare import Prepared, fresh_model

if TYPE_CHECKING:
    import torch

    from sourcefree.engine.method import TargetData
    from sourcefree.engine.models import Classifier
    from sourcefree.engine.trainer import Trainer

LOG = logging.getLogger("sourcefree")
#: Passes of the timing probe: a warm-up and two timed forward/backward passes, one forward.
PROBE_PASSES = 4
#: The probe runs only when its passes are at most this share of the run's steps.
MAX_PROBE_SHARE = 0.02

Json = dict[str, Any]


@dataclass(frozen=True)
class PhasePlan:
    """One phase as the trainer will run it."""

    name: str
    epochs: int
    steps_per_epoch: int
    batch_size: int
    trains: bool
    estimated_s: float | None = None

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class Probe:
    """What the timing probe measured on a copy of the model."""

    batch: int
    """Images per timed pass."""
    train_pass_s: float
    """One forward and backward pass."""
    eval_pass_s: float
    """One forward pass without gradients."""
    seconds: float
    """The probe's own wall time (copy, warm-up and timed passes)."""


@dataclass(frozen=True)
class RunPlan:
    """What the run will do, known before it starts (``report["plan"]``)."""

    method: str
    images: int
    unreadable: int
    device: str
    amp: str
    phases: tuple[PhasePlan, ...]
    probe: Probe | None
    note: str
    """Why there is no estimate, or what it leaves out."""
    candidates: tuple[str, ...] = ()
    """``-m auto`` / ``--select auto``: the candidates, trained one after the other."""

    @property
    def estimated_train_s(self) -> float | None:
        """Estimated seconds of the phases' steps (None: not measured)."""
        times = [p.estimated_s for p in self.phases]
        if not times or any(t is None for t in times):
            return None
        return round(sum(t for t in times if t is not None), 3)

    def to_dict(self, actual_train_s: float | None = None) -> Json:
        """``report["plan"]``; ``actual_train_s``: the training's measured wall time."""
        out: Json = {
            "method": self.method,
            "images": self.images,
            "device": self.device,
            "amp": self.amp,
            "phases": [
                {
                    "name": p.name,
                    "epochs": p.epochs,
                    "steps_per_epoch": p.steps_per_epoch,
                    "batch_size": p.batch_size,
                    "trains": p.trains,
                    "estimated_s": p.estimated_s,
                }
                for p in self.phases
            ],
        }
        if self.candidates:
            out["candidates"] = list(self.candidates)
        probe = self.probe
        out["probe"] = (
            None
            if probe is None
            else {
                "batch": probe.batch,
                "train_pass_s": round(probe.train_pass_s, 6),
                "eval_pass_s": round(probe.eval_pass_s, 6),
                "seconds": round(probe.seconds, 3),
            }
        )
        out["estimated_train_s"] = self.estimated_train_s
        out["actual_train_s"] = actual_train_s
        out["note"] = self.note
        return out

    def lines(self) -> list[str]:
        """The plan as the CLI prints it (one line each)."""
        skipped = f" ({self.unreadable} unreadable skipped)" if self.unreadable else ""
        head = f"plan: {self.method} on {self.images:,} target images{skipped}"
        out = [f"{head}, device {self.device}, amp {self.amp}"]
        if self.candidates:
            out.append(f"  {len(self.candidates)} candidates: " + ", ".join(self.candidates))
        for i, p in enumerate(self.phases, 1):
            epochs = f"{p.epochs} epoch{'s' if p.epochs != 1 else ''}"
            steps = f"{p.steps_per_epoch:,} step{'s' if p.steps_per_epoch != 1 else ''}"
            est = "" if p.estimated_s is None else f", about {_duration(p.estimated_s)}"
            kind = "trains" if p.trains else "no gradients"
            out.append(
                f"  phase {i} {p.name!r}: {epochs} x {steps} of batch {p.batch_size}, {kind}{est}"
            )
        total = self.estimated_train_s
        if total is not None and self.probe is not None:
            out.append(
                f"  estimated training time: about {_duration(total)} "
                f"(one forward+backward pass of {self.probe.batch} images: "
                f"{self.probe.train_pass_s:.3g} s, timed on a copy; {self.note})"
            )
        else:
            out.append(f"  estimated training time: not measured ({self.note})")
        return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def log_plan(plan: RunPlan) -> None:
    """The plan on the ``sourcefree`` logger (INFO), one line per record."""
    for line in plan.lines():
        LOG.info("%s", line)


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Restore torch (CPU and ``device``'s CUDA), numpy and ``random`` states on exit."""
    import numpy as np
    import torch

    devices = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _planning_trainer(prep: Prepared, models: Sequence[Classifier]) -> Trainer:
    """A trainer of the named method built on ``models`` (copies): it is never run."""
    from sourcefree.engine.method import MethodContext, SourceModel
    from sourcefree.engine.trainer import Trainer

    request = prep.request
    context = MethodContext(
        sources=tuple(SourceModel(p, m) for p, m in zip(prep.pkgs, models, strict=True)),
        data=prep.data,
        device=prep.dev,
        seed=request.seed,
    )
    instance = prep.named_method()(prep.cfg, context)
    return Trainer(instance, prep.data, device=prep.dev, seed=request.seed)


def plan_run(prep: Prepared) -> RunPlan:
    """The plan of a prepared run, its estimate timed unless ``plan_probe=False``.

    Raises:
        ConfigError, RequirementError: the method refuses the sources (as training would).
    """
    from sourcefree.engine import distributed

    request = prep.request
    n = len(prep.data)
    common: Json = {
        "images": n,
        "unreadable": int(prep.data.read_summary.get("bad", 0)),
        "device": str(prep.dev),
        "amp": "bf16" if _bf16(prep) else "off",
    }
    if request.multi:
        budget = "" if request.budget_s is None else f" within the {request.budget_s:g} s budget"
        return RunPlan(
            method="-m auto" if request.auto else f"{request.method} --select auto",
            phases=(),
            probe=None,
            note=f"each candidate trains its own phases, one after the other{budget}",
            candidates=tuple(c.label for c in prep.plan),
            **common,
        )
    with rng_preserved(prep.dev), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run's own build warns once, as before
        models = [fresh_model(p, prep.dev) for p in prep.pkgs]
        trainer = _planning_trainer(prep, models)
        phases = tuple(
            PhasePlan(log.name, log.epochs, log.steps_per_epoch, phase.batch_size, log.trains)
            for phase, log in zip(trainer.phases, trainer.logs, strict=True)
        )
        steps = sum(p.steps for p in phases)
        note = "the phases' steps only: augmentations and whole-set passes take longer"
        probe = None
        if not request.plan_probe:
            note = "--no-plan-probe"
        elif distributed.world_size() > 1:
            note = "not timed under torchrun"
        elif steps < PROBE_PASSES / MAX_PROBE_SHARE:
            note = (
                f"a run of {steps:,} steps: timing it would cost more than "
                f"{MAX_PROBE_SHARE:.0%} of it"
            )
        else:
            sizes = [p.batch_size for p in phases if p.trains] or [p.batch_size for p in phases]
            batch = min(n, max(sizes))
            probe = _probe(models[0], prep.data, prep.dev, batch, trainer.bf16)
        del trainer, models
    if probe is not None:
        phases = tuple(_estimated(p, probe, n) for p in phases)
    return RunPlan(
        method=request.method,
        phases=phases,
        probe=probe,
        note=note,
        **common,
    )


def _bf16(prep: Prepared) -> bool:
    """Whether the run's trainer uses bf16 autocast (the policy in force, on its device)."""
    from sourcefree.engine.device import amp_default, resolve_amp

    return resolve_amp(amp_default(), prep.dev)


def _estimated(phase: PhasePlan, probe: Probe, images: int) -> PhasePlan:
    """``phase`` with its estimated seconds: the probe's pass time, scaled by batch size."""
    per_step = min(phase.batch_size, images) / probe.batch
    seconds = probe.train_pass_s if phase.trains else probe.eval_pass_s
    return PhasePlan(
        phase.name,
        phase.epochs,
        phase.steps_per_epoch,
        phase.batch_size,
        phase.trains,
        round(phase.steps * per_step * seconds, 3),
    )


def _probe(model: Classifier, data: TargetData, dev: torch.device, batch: int, bf16: bool) -> Probe:
    """Time forward/backward passes of ``model`` (a copy) on the first ``batch`` images."""
    import torch

    from sourcefree.engine.device import set_memory_format, training_memory_format

    started = time.perf_counter()
    fmt = training_memory_format(dev)
    set_memory_format([model], fmt)
    x = data.tensor(slice(0, batch), device=dev, memory_format=fmt)
    model.train()
    for param in model.parameters():
        param.requires_grad_(True)

    def train_pass() -> None:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)[0]
        logits.float().logsumexp(dim=1).mean().backward()
        model.zero_grad(set_to_none=True)

    def eval_pass() -> None:
        with (
            torch.no_grad(),
            torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            model(x)

    train_pass()  # warm-up: first-call allocations and kernel choices
    train_s = _timed(train_pass, dev, PROBE_PASSES - 2)
    eval_s = _timed(eval_pass, dev, 1)
    return Probe(batch, train_s, eval_s, time.perf_counter() - started)


def _timed(run: Callable[[], None], dev: torch.device, times: int) -> float:
    """Mean seconds of ``times`` calls of ``run`` (CUDA work finished before each clock)."""
    import torch

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    start = time.perf_counter()
    for _ in range(times):
        run()
    sync()
    return (time.perf_counter() - start) / times
