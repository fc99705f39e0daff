"""The one adaptation loop: runs a method's phases with checkpoints, resume and signals.

Determinism: every step re-seeds torch, numpy and ``random`` from
``(seed, phase, epoch, step)`` and gets its own CPU generator; each epoch's
order comes from a generator seeded from ``(seed, phase, epoch)``. A run
resumed from any checkpoint therefore replays exactly the same randomness as
an uninterrupted run (bitwise on CPU). Images are held in memory, so there
are no DataLoader workers to seed.

Signals: SIGINT/SIGTERM handlers only set a flag; after the current step the
loop writes a checkpoint and raises :class:`~sourcefree.errors.RunInterruptedError`
(exit code 75, resumable). A second signal restores the default handler and
interrupts at once (atomic writes keep the checkpoints consistent).

Several processes (``torchrun``, :mod:`sourcefree.engine.distributed`): ``batch_size``
is the global batch. Every rank draws the same epoch order and takes its
disjoint slice of each global batch (:func:`sourcefree.engine.distributed.batch_shard`);
after ``backward`` the gradients of the phase's parameters are averaged over
the ranks, weighted by slice size, in one all-reduce (the arithmetic of
DistributedDataParallel, without wrapping: methods call their sub-modules
directly, e.g. ``model.backbone``, which a DDP wrapper would not see). Losses and
metrics are the global-batch means, identical on every rank. BatchNorm running
statistics are averaged over the ranks before each epoch hook and at the end of
each phase. Stop requests
and timer checkpoints are agreed on by all ranks after every step; every rank
builds the checkpoint state (methods may use collectives there) and rank 0
writes it. A resumed run reads the newest checkpoint on rank 0 and broadcasts
it, so a checkpoint written with any number of processes resumes with any other.
Each rank's step generator is seeded from ``(seed, phase, epoch, step, rank)``.

The loop's helpers live beside it, one job each: :mod:`~sourcefree.engine.device`
(device, AMP), :mod:`~sourcefree.engine.reproducibility` (seeds, determinism),
:mod:`~sourcefree.engine.signals` (stop requests),
:mod:`~sourcefree.engine.checkpoint_state` (what a checkpoint holds, checked on
resume), :mod:`~sourcefree.engine.checkpoints` and :mod:`~sourcefree.engine.rundir`
(where it is written).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sourcefree.engine import distributed as dist
from sourcefree.engine.checkpoint_state import (
    RESTORE_ERRORS,
    TRAINER_FORMAT,
    check_trainer_checkpoint,
    damaged_checkpoint,
    flatten_optimizer,
    jsonable,
    rng_state,
    set_rng_state,
    unflatten_optimizer,
    unjson,
)
from sourcefree.engine.checkpoints import Checkpoint, CheckpointStore, broadcast_checkpoint
from sourcefree.engine.device import (
    amp_default,
    resolve_amp,
    set_memory_format,
    training_memory_format,
)
from sourcefree.engine.method import Batch, EpochInfo, Method, ParamGroup, Phase, TargetData
from sourcefree.engine.reproducibility import derive_seed, deterministic, seed_everything
from sourcefree.engine.signals import StopFlag, signal_handlers
from sourcefree.engine.workdir import Workdir
from sourcefree.errors import (
    CheckpointError,
    DistributedError,
    RunInterruptedError,
    SourcefreeError,
    TrainingError,
)

#: Default wall-clock interval between timer checkpoints, in seconds.
CHECKPOINT_EVERY_S = 600.0
_MAX_CURVE = 400


@dataclass
class PhaseLog:
    """Aggregate history of one phase (for report.json)."""

    name: str
    epochs: int
    steps_per_epoch: int
    trains: bool
    epoch_loss: list[float] = field(default_factory=list)
    """Mean loss per finished epoch."""
    loss_curve: list[list[float]] = field(default_factory=list)
    """(global step, loss) pairs, thinned to at most a few hundred points."""
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "trains": self.trains,
            "epoch_loss": self.epoch_loss,
            "loss_curve": self.loss_curve,
            "epoch_metrics": self.epoch_metrics,
            "seconds": round(self.seconds, 3),
            "images": self.images,
            "images_per_s": round(self.images / self.seconds, 1) if self.seconds > 0 else None,
            "done": self.done,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhaseLog:
        return cls(
            name=d["name"],
            epochs=d["epochs"],
            steps_per_epoch=d["steps_per_epoch"],
            trains=d["trains"],
            epoch_loss=list(d["epoch_loss"]),
            loss_curve=[list(p) for p in d["loss_curve"]],
            epoch_metrics=[dict(m) for m in d["epoch_metrics"]],
            seconds=float(d["seconds"]),
            images=int(d["images"]),
            done=bool(d["done"]),
        )


@dataclass(frozen=True)
class StepInfo:
    """Passed to the ``on_step`` callback after every step."""

    phase: str
    phase_index: int
    epoch: int
    step: int
    global_step: int
    loss: float | None
    stop: StopFlag

    def request_stop(self) -> None:
        """Checkpoint after this step and stop (as SIGTERM would)."""
        self.stop.set("stop requested by a callback")


@dataclass
class TrainResult:
    phases: list[PhaseLog]
    resumed_from: int | None
    """Checkpoint sequence the run resumed from, if any."""
    checkpoints: int
    device: str
    amp: str
    memory_format: str = "contiguous"
    """``channels_last`` when conv modules trained in that layout (CUDA and CPU)."""


@dataclass
class _Position:
    phase: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    """Steps done in the current phase (drives the schedule)."""


def steps_per_epoch(phase: Phase, n: int) -> int:
    """Batches per epoch for ``n`` images (one batch when ``n < batch_size``)."""
    if n <= phase.batch_size:
        return 1
    return n // phase.batch_size if phase.drop_last else math.ceil(n / phase.batch_size)


def _groups(phase: Phase) -> list[ParamGroup]:
    if phase.parameters is None:
        return []
    groups = list(phase.parameters())
    for g in groups:
        if not isinstance(g, ParamGroup):
            raise TrainingError(
                f"phase {phase.name!r} returned {type(g).__name__} from parameters()",
                "parameters() returns a list of ParamGroup",
                "wrap parameters: [ParamGroup(list(model.parameters()))]",
            )
    return groups


def build_optimizer(phase: Phase) -> torch.optim.Optimizer | None:
    """The phase's optimiser over its declared parameter groups (None when nothing trains)."""
    groups = _groups(phase)
    if not groups:
        return None
    spec = phase.optimizer
    param_groups: list[dict[str, Any]] = []
    for g in groups:
        entry: dict[str, Any] = {
            "params": list(g.params),
            "lr": spec.lr * g.lr_scale,
            "base_lr": spec.lr * g.lr_scale,
        }
        if g.weight_decay is not None:
            entry["weight_decay"] = g.weight_decay
        param_groups.append(entry)
    if spec.name == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov and spec.momentum > 0,
            weight_decay=spec.weight_decay,
        )
    if spec.name == "adam":
        return torch.optim.Adam(
            param_groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
        )
    if spec.name == "adamw":
        return torch.optim.AdamW(
            param_groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay
        )
    raise TrainingError(f"unknown optimiser {spec.name!r}", "use sgd, adam or adamw", "")


@dataclass
class _PhaseRun:
    """The phase being run: what its epochs and steps share."""

    phase: Phase
    log: PhaseLog
    opt: torch.optim.Optimizer | None
    total: int
    """Steps of the whole phase (drives the schedule)."""
    use_amp: bool
    bar: Any


# -- the loop ---------------------------------------------------------------------------


class Trainer:
    """Run a method's phases on the target data.

    Args:
        method: a built method (its modules already on ``device``).
        data: the target images.
        device: the device the method's modules live on.
        seed: base seed of every step's randomness.
        workdir: an open :class:`~sourcefree.engine.workdir.Workdir`, or the open
            :class:`~sourcefree.engine.checkpoints.CheckpointStore` of a run directory,
            for checkpoints (None: no checkpoints, no resume, signals still stop the run).
        checkpoint_every_s: wall-clock interval of timer checkpoints.
        progress: show tqdm progress bars on stderr.
        on_step: callback after every step (progress hooks, tests).
        amp: bf16 autocast mode (:data:`~sourcefree.engine.device.AMP_MODES`); None:
            the :func:`~sourcefree.engine.device.amp_policy` in force, ``auto`` by default.
    """

    def __init__(
        self,
        method: Method,
        data: TargetData,
        *,
        device: torch.device,
        seed: int = 0,
        workdir: Workdir | CheckpointStore | None = None,
        checkpoint_every_s: float = CHECKPOINT_EVERY_S,
        progress: bool = False,
        on_step: Callable[[StepInfo], None] | None = None,
        amp: str | None = None,
    ) -> None:
        self.method = method
        self.data = data
        self.device = device
        self.seed = seed
        self.workdir = workdir
        self._store = workdir.checkpoints if isinstance(workdir, Workdir) else workdir
        self.checkpoint_every_s = checkpoint_every_s
        self.progress = progress
        self.on_step = on_step
        self.stop = StopFlag()
        self.phases: Sequence[Phase] = list(method.phases())
        names = [p.name for p in self.phases]
        if not self.phases or len(set(names)) != len(names):
            raise TrainingError(
                f"method {method.name!r} declares phases {names}",
                "a method needs at least one phase, each with a unique name",
                "fix the method's phases()",
            )
        self.logs = [
            PhaseLog(p.name, p.epochs, steps_per_epoch(p, len(data)), p.parameters is not None)
            for p in self.phases
        ]
        self.checkpoints = 0
        self._epoch_sums: dict[str, list[float]] = {}
        self._last_checkpoint = time.monotonic()
        self.bf16 = resolve_amp(amp_default() if amp is None else amp, device)
        # Conv modules and batches in NHWC on CUDA and the CPU; uint8 batches go to the
        # GPU before normalisation.
        self.channels_last = training_memory_format(device) == torch.channels_last
        self.world = dist.world_size()
        self.rank = dist.rank()
        self._saves = workdir is not None

    @property
    def _run_dir(self) -> Path | None:
        """The run directory (named in errors), None without checkpoints."""
        return None if self._store is None else self._store.run_dir

    # -- checkpoint state ------------------------------------------------------------

    def _state(
        self, pos: _Position, opt: torch.optim.Optimizer | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Modules, method state, RNG, position, history and optimizer (no pickle)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.method.modules().items():
            for key, value in module.state_dict().items():
                tensors[f"module.{name}.{key}"] = value
        for key, value in self.method.state_tensors().items():
            tensors[f"method.{key}"] = value
        rng_t, rng_meta = rng_state()
        tensors.update(rng_t)
        meta: dict[str, Any] = {
            "format": TRAINER_FORMAT,
            "position": {
                "phase": pos.phase,
                "epoch": pos.epoch,
                "step": pos.step,
                "global_step": pos.global_step,
            },
            "rng": rng_meta,
            "method": jsonable(self.method.state_meta()),
            "history": [log.to_dict() for log in self.logs],
            "optimizer": None,
            "epoch_sums": self._epoch_sums,
        }
        if opt is not None:
            opt_t, opt_meta = flatten_optimizer(opt)
            tensors.update(opt_t)
            meta["optimizer"] = opt_meta
        return tensors, meta

    def _checkpoint(self, pos: _Position, opt: torch.optim.Optimizer | None) -> None:
        """Every rank builds the state (methods may gather per-rank state); rank 0 writes."""
        if not self._saves:
            return
        tensors, meta = self._state(pos, opt)
        if self._store is not None:
            self._store.save(tensors, meta)
        self.checkpoints += 1
        self._last_checkpoint = time.monotonic()

    def _latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint, read on rank 0 and broadcast to every rank."""
        return broadcast_checkpoint(self._store.load_latest() if self._store is not None else None)

    def _check_same_data(self) -> None:
        """Every rank must hold the same decoded images (each rank reads DATA itself)."""
        digest = self.data.digest()
        mine = int.from_bytes(digest[:7], "little")
        seen = dist.all_reduce_max(torch.tensor([mine, -mine], dtype=torch.int64))
        if int(seen[0]) != mine or int(seen[1]) != -mine:
            raise DistributedError(
                f"rank {self.rank} read other target images than another rank",
                "every process reads DATA itself and all must see the same images",
                "put DATA on a file system every node sees, or give every node an identical copy",
            )

    def _agree(self, pos: _Position) -> bool:
        """All ranks agree on stopping and on a timer checkpoint; returns checkpoint-due."""
        due = self._store is not None and (
            time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s
        )
        if self.world == 1:
            return due
        flags = torch.tensor([float(self.stop.requested), float(due and self.rank == 0)])
        dist.all_reduce_max(flags)
        if flags[0] > 0 and not self.stop.requested:
            self.stop.set("stop requested on another rank")
        return bool(flags[1] > 0)

    def _restore_modules(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, module in self.method.modules().items():
            prefix = f"module.{name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(
                    f"the checkpoint does not fit module {name!r}",
                    str(exc).splitlines()[0],
                    "resume with the same method and source package, or start a fresh run",
                ) from None

    def _restore(
        self, ckpt: Checkpoint
    ) -> tuple[_Position, tuple[Mapping[str, torch.Tensor], Any] | None]:
        """Check a checkpoint against this run, then restore it; returns position and optimizer."""
        plan = [(log.name, log.epochs, log.steps_per_epoch) for log in self.logs]
        check_trainer_checkpoint(ckpt, self._run_dir, plan)
        self._restore_modules(ckpt.tensors)
        method_t = {
            k[len("method.") :]: v for k, v in ckpt.tensors.items() if k.startswith("method.")
        }
        try:
            self.method.load_state(method_t, unjson(ckpt.meta.get("method", {})))
            set_rng_state(ckpt.tensors, ckpt.meta["rng"])
        except SourcefreeError:
            raise
        except RESTORE_ERRORS as exc:
            why = f"its method or RNG state does not load ({type(exc).__name__})"
            raise damaged_checkpoint(self._run_dir, why) from None
        p = ckpt.meta["position"]
        pos = _Position(p["phase"], p["epoch"], p["step"], p["global_step"])
        self.logs = [PhaseLog.from_dict(d) for d in ckpt.meta["history"]]
        self._epoch_sums = {
            k: [float(x) for x in v] for k, v in ckpt.meta.get("epoch_sums", {}).items()
        }
        opt = ckpt.meta.get("optimizer")
        return pos, None if opt is None else (ckpt.tensors, opt)

    # -- running -------------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> TrainResult:
        """Run every phase (from the newest checkpoint when ``resume``).

        Raises:
            RunInterruptedError: a signal or ``request_stop`` stopped the run
                after a checkpoint (exit code 75).
            TrainingError: a non-finite loss.
            CheckpointError: a checkpoint could not be written or read.
        """
        pos = _Position()
        resumed_from: int | None = None
        restored_opt: tuple[Mapping[str, torch.Tensor], Any] | None = None
        if self.world > 1:
            self._check_same_data()
            flag = dist.all_reduce_max(torch.tensor([float(self.workdir is not None)]))
            self._saves = bool(flag[0] > 0)
        if resume and self._saves:
            ckpt = self._latest_checkpoint()
            if ckpt is not None:
                resumed_from = ckpt.sequence
                pos, restored_opt = self._restore(ckpt)
        self._last_checkpoint = time.monotonic()
        dist.broadcast_module_state(self.method.modules().values())
        modules = list(self.method.modules().values())
        if self.channels_last:
            set_memory_format(modules, torch.channels_last)
        try:
            with signal_handlers(self.stop), deterministic():
                while pos.phase < len(self.phases):
                    self._run_phase(pos, restored_opt)
                    restored_opt = None
                    pos = _Position(pos.phase + 1)
                    self._checkpoint(pos, None)
        finally:
            if self.channels_last:  # export and callers see the usual layout
                set_memory_format(modules, torch.contiguous_format)
        return TrainResult(
            phases=self.logs,
            resumed_from=resumed_from,
            checkpoints=self.checkpoints,
            device=str(self.device),
            amp="bf16" if self.bf16 else "off",
            memory_format="channels_last" if self.channels_last else "contiguous",
        )

    def _run_phase(
        self, pos: _Position, restored_opt: tuple[Mapping[str, torch.Tensor], Any] | None
    ) -> None:
        """The phase at ``pos`` from there to its end (its epochs, then ``on_phase_end``)."""
        phase = self.phases[pos.phase]
        log = self.logs[pos.phase]
        opt = self._enter_phase(phase, restored_opt)
        total = max(1, phase.epochs * log.steps_per_epoch)
        bar = self._bar(phase, pos, total)
        run = _PhaseRun(phase, log, opt, total, self.bf16 and phase.amp, bar)
        try:
            while pos.epoch < phase.epochs:
                self._run_epoch(run, pos)
            dist.average_batchnorm_statistics(self.method.modules().values())
            if phase.on_phase_end is not None:
                phase.on_phase_end()
            log.done = True
        finally:
            if run.bar is not None:
                run.bar.close()
        self._freeze_all()

    def _enter_phase(
        self, phase: Phase, restored_opt: tuple[Mapping[str, torch.Tensor], Any] | None
    ) -> torch.optim.Optimizer | None:
        """Train only the phase's parameters, with its optimizer (restored on resume)."""
        self._freeze_all()
        opt = build_optimizer(phase)
        if opt is not None:
            for group in opt.param_groups:
                for param in group["params"]:
                    param.requires_grad_(True)
        if restored_opt is not None and opt is not None:
            unflatten_optimizer(opt, restored_opt[0], restored_opt[1], run_dir=self._run_dir)
        if phase.on_enter is not None:
            phase.on_enter()
        return opt

    def _run_epoch(self, run: _PhaseRun, pos: _Position) -> None:
        """The rest of the epoch at ``pos``, step by step; ``pos`` ends at the next one."""
        order = self._start_epoch(run.phase, pos)
        while pos.step < run.log.steps_per_epoch:
            loss_value = self._run_step(run, pos, order)
            self._after_step(run, pos, loss_value)
            if pos.step == 0:
                break

    def _start_epoch(self, phase: Phase, pos: _Position) -> torch.Tensor:
        """The epoch's hook (at its first step only) and its order of the images."""
        if pos.step == 0 and phase.on_epoch_start is not None:
            # Whole-set passes in eval mode then see the same model on every rank.
            dist.average_batchnorm_statistics(self.method.modules().values())
            seed_everything(derive_seed(self.seed, pos.phase, pos.epoch, "epoch"))
            phase.on_epoch_start(EpochInfo(phase.name, pos.epoch, self.data, self.device))
        order_gen = torch.Generator().manual_seed(
            derive_seed(self.seed, pos.phase, pos.epoch, "order")
        )
        n = len(self.data)
        order = torch.randperm(n, generator=order_gen) if phase.shuffle else torch.arange(n)
        if pos.step == 0:
            self._epoch_sums = {}
        return order

    def _run_step(self, run: _PhaseRun, pos: _Position, order: torch.Tensor) -> float | None:
        """One step at ``pos`` (its batch, seeds and update), then ``pos`` moves on."""
        started = time.perf_counter()
        size = run.phase.batch_size
        lo = pos.step * size
        idx = order[lo : lo + size] if len(self.data) > size else order
        mine = dist.batch_shard(idx, self.rank, self.world)
        where: tuple[object, ...] = (pos.phase, pos.epoch, pos.step)
        if self.world > 1:
            where = (*where, f"rank{self.rank}")
        gen = seed_everything(derive_seed(self.seed, *where))
        batch = Batch(
            x=self._batch_images(mine),
            index=mine.to(self.device),
            generator=gen,
            epoch=pos.epoch,
            step=pos.step,
            progress=pos.global_step / run.total,
        )
        loss_value = self._step(run, batch, pos)
        pos.step += 1
        pos.global_step += 1
        run.log.images += int(idx.numel())
        run.log.seconds += time.perf_counter() - started
        return loss_value

    def _after_step(self, run: _PhaseRun, pos: _Position, loss_value: float | None) -> None:
        """Report the step, close a finished epoch, then stop or checkpoint as the ranks agree."""
        self._report_step(run, pos, loss_value)
        if pos.step == run.log.steps_per_epoch:
            self._end_epoch(run.log)
            pos.epoch += 1
            pos.step = 0
        due = self._agree(pos)
        if self.stop.requested:
            self._checkpoint(pos, run.opt)
            dist.barrier()  # rank 0 has written it before any rank exits
            saved = " after a checkpoint" if self._saves else ""
            raise RunInterruptedError(
                f"the run stopped ({self.stop.reason}) in phase {run.phase.name!r}, "
                f"epoch {pos.epoch + 1}, step {pos.step}{saved}",
                "a signal or a stop request interrupts at the next step boundary",
                "run the same command again with --resume to continue"
                if self._saves
                else "run again",
            )
        if due:
            self._checkpoint(pos, run.opt)

    def _report_step(self, run: _PhaseRun, pos: _Position, loss_value: float | None) -> None:
        """Loss curve (thinned to about :data:`_MAX_CURVE` points), progress bar, ``on_step``."""
        log, phase = run.log, run.phase
        if loss_value is not None and (
            run.total <= _MAX_CURVE or pos.global_step % max(1, run.total // _MAX_CURVE) == 0
        ):
            log.loss_curve.append([pos.global_step, loss_value])
        if run.bar is not None:
            run.bar.update(1)
            post = {"ep": f"{pos.epoch + 1}/{phase.epochs}"}
            if loss_value is not None:
                post["loss"] = f"{loss_value:.4f}"
            post["img/s"] = f"{log.images / max(log.seconds, 1e-9):.0f}"
            run.bar.set_postfix(post, refresh=False)
        if self.on_step is not None:
            self.on_step(
                StepInfo(
                    phase.name,
                    pos.phase,
                    pos.epoch,
                    pos.step,
                    pos.global_step,
                    loss_value,
                    self.stop,
                )
            )

    def _batch_images(self, index: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.data.tensor(index, device=self.device, memory_format=fmt)

    def _end_epoch(self, log: PhaseLog) -> None:
        sums = self._epoch_sums
        means = {k: float(sum(v) / len(v)) for k, v in sums.items() if v}
        if "loss" in means:
            log.epoch_loss.append(means.pop("loss"))
        log.epoch_metrics.append(means)
        self._epoch_sums = {}

    def _freeze_all(self) -> None:
        for module in self.method.modules().values():
            for param in module.parameters():
                param.requires_grad_(False)
                param.grad = None

    def _step(self, run: _PhaseRun, batch: Batch, pos: _Position) -> float | None:
        """Forward, loss check and update of one batch; returns the global-batch loss."""
        phase, opt = run.phase, run.opt
        if opt is not None:
            factor = phase.schedule.factor(pos.global_step, run.total)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            opt.zero_grad(set_to_none=True)
        with torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=run.use_amp
        ):
            out = phase.step(batch)
        metrics = {
            key: float(value.detach().float().item())
            if isinstance(value, torch.Tensor)
            else float(value)
            for key, value in out.metrics.items()
        }
        loss = None if out.loss is None else out.loss.float()
        value = math.nan if loss is None else float(loss.detach().item())
        mine = float(batch.index.numel())
        n_global, value, metrics = self._global_means(mine, value, loss is not None, metrics)
        sums = self._epoch_sums
        for key, v in metrics.items():
            sums.setdefault(key, []).append(v)
        if loss is None:
            return None
        if not math.isfinite(value):
            raise TrainingError(
                f"the loss of phase {phase.name!r} is {value} at epoch {pos.epoch + 1}, "
                f"step {pos.step + 1}",
                "training diverged; the weights are no longer usable",
                "lower the learning rate (--set lr=...) and run again; earlier checkpoints "
                "are kept in the run directory",
            )
        sums.setdefault("loss", []).append(value)
        if opt is not None and loss.requires_grad:
            loss.backward()  # type: ignore[no-untyped-call]
            params = [p for g in opt.param_groups for p in g["params"]]
            dist.average_gradients(params, weight=mine, total=n_global)
            if phase.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, phase.max_grad_norm)
            opt.step()
        return value

    def _global_means(
        self, mine: float, value: float, has_loss: bool, metrics: dict[str, float]
    ) -> tuple[float, float, dict[str, float]]:
        """Global batch size, loss and metrics: one all-reduce, the same on every rank."""
        if self.world == 1:
            return mine, value, metrics
        keys = sorted(metrics)
        numbers = [mine, mine * value if has_loss else 0.0]
        numbers += [mine * metrics[k] for k in keys]
        reduced = dist.all_reduce_sum(torch.tensor(numbers, dtype=torch.float64)).tolist()
        n_global = reduced[0]
        return (
            n_global,
            reduced[1] / n_global,
            {k: reduced[2 + i] / n_global for i, k in enumerate(keys)},
        )

    def _bar(self, phase: Phase, pos: _Position, total: int) -> Any:
        from sourcefree.data.progress import progress_bar

        on = self.progress and self.rank == 0
        return progress_bar(total, phase.name, enabled=on, unit="step", initial=pos.global_step)
