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
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from sourcefree.engine import distributed as dist
from sourcefree.engine.method import Batch, EpochInfo, Method, ParamGroup, Phase, TargetData
from sourcefree.engine.workdir import (
    Checkpoint,
    Workdir,
    check_optimizer_state,
    check_trainer_checkpoint,
    damaged_checkpoint,
)
from sourcefree.errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    DistributedError,
    RunInterruptedError,
    SourcefreeError,
    TrainingError,
)

DEVICES = ("auto", "cpu", "cuda")
#: bf16 autocast: ``auto`` (on for CUDA GPUs with bf16, off on the CPU), ``bf16``, ``off``.
AMP_MODES = ("auto", "bf16", "off")
_AMP_DEFAULT: contextvars.ContextVar[str] = contextvars.ContextVar("amp", default="auto")
#: Default wall-clock interval between timer checkpoints, in seconds.
CHECKPOINT_EVERY_S = 600.0
_MAX_CURVE = 400


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Raises:
        DeviceError: an unknown name, or ``cuda`` without a usable GPU.
    """
    if name not in DEVICES:
        raise DeviceError(
            f"unknown device {name!r}", f"choose one of {', '.join(DEVICES)}", "use --device auto"
        )
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise DeviceError(
            "device 'cuda' was requested but torch sees no CUDA GPU",
            "adaptation never falls back to the CPU silently",
            "use --device cpu, or install a CUDA build of torch (run `sourcefree doctor`)",
        )
    return torch.device("cpu")


def resolve_amp(mode: str, device: torch.device) -> bool:
    """Whether training steps run under bf16 autocast on ``device`` (see :data:`AMP_MODES`).

    Losses, Sinkhorn and the fused kernels compute in fp32 either way; on the CPU
    ``auto`` is off, so CPU runs stay bitwise what they were.

    Raises:
        ConfigError: an unknown mode, or ``bf16`` where the device has no bf16 autocast.
    """
    if mode not in AMP_MODES:
        raise ConfigError(
            f"--amp {str(mode)[:20]!r} is not known",
            f"choose one of {', '.join(AMP_MODES)}",
            "use --amp auto",
        )
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mode == "bf16" and not supported:
        raise ConfigError(
            f"--amp bf16 was requested on {device.type}",
            "bf16 autocast is used on CUDA GPUs with bf16 support only",
            "use --amp auto (or off) on this device",
        )
    return supported and mode != "off"


@contextlib.contextmanager
def amp_policy(mode: str, device: str | None = None) -> Iterator[None]:
    """Default ``amp`` of every :class:`Trainer` built inside (``adapt(amp=...)`` uses it).

    With ``device`` (a :data:`DEVICES` name) the mode is checked against it on entry,
    before any work, so ``--amp bf16 --device cpu`` fails at once.
    """
    if device is not None:
        resolve_amp(mode, resolve_device(device))
    elif mode not in AMP_MODES:
        resolve_amp(mode, torch.device("cpu"))  # raises the typed error
    token = _AMP_DEFAULT.set(mode)
    try:
        yield
    finally:
        _AMP_DEFAULT.reset(token)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _set_memory_format(modules: Sequence[nn.Module], fmt: torch.memory_format) -> None:
    for module in modules:
        if _has_conv(module):
            module.to(memory_format=fmt)


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and a position (stable across processes)."""
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA), numpy and ``random``; return a CPU generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Deterministic algorithms (warn-only) and no cuDNN benchmarking, restored afterwards."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_bench = torch.backends.cudnn.benchmark
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_bench


class StopFlag:
    """Set by signal handlers, tests and callers; read by the loop after each step."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        self.requested = True
        self.reason = reason


@contextlib.contextmanager
def signal_handlers(flag: StopFlag) -> Iterator[None]:
    """SIGINT/SIGTERM set ``flag``; a second signal interrupts at once. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.requested:
            for sig, old in previous.items():
                signal.signal(sig, old)
            raise KeyboardInterrupt
        flag.set(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
    """``channels_last`` when conv modules trained in that layout (CUDA)."""


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


# -- state flattening (no pickle) ------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(
        f"cannot store a {type(value).__name__} in a checkpoint",
        "checkpoints hold tensors and plain JSON only (no pickle)",
        "report a bug",
    )


def _unjson(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_unjson(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return value


def flatten_optimizer(
    opt: torch.optim.Optimizer, prefix: str = "optim."
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors and JSON (no pickle)."""
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        meta: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{pid}.{key}"] = value
                meta[key] = {"__tensor__": True}
            else:
                meta[key] = _jsonable(value)
        per_param[str(pid)] = meta
    return tensors, {"param_groups": _jsonable(state["param_groups"]), "state": per_param}


def unflatten_optimizer(
    opt: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    prefix: str = "optim.",
    run_dir: Path | None = None,
) -> None:
    """Inverse of :func:`flatten_optimizer`, loaded into ``opt``, then checked.

    Raises:
        CheckpointError: the state is malformed or does not fit ``opt``'s parameters.
    """
    state: dict[int, dict[str, Any]] = {}
    try:
        for pid, entries in meta["state"].items():
            restored: dict[str, Any] = {}
            for key, value in entries.items():
                if value == {"__tensor__": True}:
                    restored[key] = tensors[f"{prefix}{pid}.{key}"]
                else:
                    restored[key] = _unjson(value)
            state[int(pid)] = restored
        opt.load_state_dict({"state": state, "param_groups": _unjson(meta["param_groups"])})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        why = f"its optimizer state does not load ({type(exc).__name__})"
        raise damaged_checkpoint(run_dir, why) from None
    check_optimizer_state(opt, run_dir)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py = random.getstate()
    meta = {
        "numpy": [str(name), int(pos), int(has_gauss), float(gauss)],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    name, pos, has_gauss, gauss = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- the loop ---------------------------------------------------------------------------


class Trainer:
    """Run a method's phases on the target data.

    Args:
        method: a built method (its modules already on ``device``).
        data: the target images.
        device: the device the method's modules live on.
        seed: base seed of every step's randomness.
        workdir: an open :class:`~sourcefree.engine.workdir.Workdir` for checkpoints
            (None: no checkpoints, no resume, signals still stop the run).
        checkpoint_every_s: wall-clock interval of timer checkpoints.
        progress: show tqdm progress bars on stderr.
        on_step: callback after every step (progress hooks, tests).
        identity: JSON identity stored with each checkpoint.
        amp: bf16 autocast mode (:data:`AMP_MODES`); None: the :func:`amp_policy`
            in force, ``auto`` by default.
    """

    def __init__(
        self,
        method: Method,
        data: TargetData,
        *,
        device: torch.device,
        seed: int = 0,
        workdir: Workdir | None = None,
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
            PhaseLog(
                p.name,
                p.epochs,
                steps_per_epoch(p, len(data)),
                p.parameters is not None,
            )
            for p in self.phases
        ]
        self.checkpoints = 0
        self._epoch_sums: dict[str, list[float]] = {}
        self._last_checkpoint = time.monotonic()
        self.bf16 = resolve_amp(_AMP_DEFAULT.get() if amp is None else amp, device)
        # CUDA: conv modules and batches in NHWC (channels_last) for the tensor cores;
        # uint8 batches go to the GPU before normalisation. The CPU path is unchanged.
        self.channels_last = device.type == "cuda"
        self.world = dist.world_size()
        self.rank = dist.rank()
        self._saves = workdir is not None

    # -- checkpoint state ------------------------------------------------------------

    def _state(
        self, pos: _Position, opt: torch.optim.Optimizer | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.method.modules().items():
            for key, value in module.state_dict().items():
                tensors[f"module.{name}.{key}"] = value
        for key, value in self.method.state_tensors().items():
            tensors[f"method.{key}"] = value
        rng_t, rng_meta = _rng_state()
        tensors.update(rng_t)
        meta: dict[str, Any] = {
            "format": "sourcefree-trainer-v1",
            "position": {
                "phase": pos.phase,
                "epoch": pos.epoch,
                "step": pos.step,
                "global_step": pos.global_step,
            },
            "rng": rng_meta,
            "method": _jsonable(self.method.state_meta()),
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
        # Every rank builds the state (methods may gather per-rank state); rank 0 writes.
        if not self._saves:
            return
        tensors, meta = self._state(pos, opt)
        if self.workdir is not None:
            self.workdir.save_checkpoint(tensors, meta)
        self.checkpoints += 1
        self._last_checkpoint = time.monotonic()

    def _latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint, read on rank 0 and broadcast to every rank."""
        ckpt = self.workdir.load_latest() if self.workdir is not None else None
        if self.world == 1:
            return ckpt
        from safetensors.torch import load as load_safetensors
        from safetensors.torch import save as save_safetensors

        sent: dict[str, Any] | None = None
        blob = b""
        if ckpt is not None:
            sent = {"sequence": ckpt.sequence, "meta": ckpt.meta}
            blob = save_safetensors({k: v.contiguous() for k, v in ckpt.tensors.items()})
        framed = dist.broadcast_framed(sent, blob, what="checkpoint")
        if framed is None:
            return None
        head, blob = framed
        return Checkpoint(int(head["sequence"]), load_safetensors(blob), head["meta"])

    def _check_same_data(self) -> None:
        """Every rank must hold the same decoded images (each rank reads DATA itself)."""
        images = np.ascontiguousarray(self.data.images)
        digest = hashlib.sha256(images.data).digest()
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
        due = self.workdir is not None and (
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
        run_dir = None if self.workdir is None else self.workdir.path
        plan = [(log.name, log.epochs, log.steps_per_epoch) for log in self.logs]
        check_trainer_checkpoint(ckpt, run_dir, plan)
        self._restore_modules(ckpt.tensors)
        method_t = {
            k[len("method.") :]: v for k, v in ckpt.tensors.items() if k.startswith("method.")
        }
        try:
            self.method.load_state(method_t, _unjson(ckpt.meta.get("method", {})))
            _set_rng_state(ckpt.tensors, ckpt.meta["rng"])
        except SourcefreeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
            why = f"its method or RNG state does not load ({type(exc).__name__})"
            raise damaged_checkpoint(run_dir, why) from None
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
            _set_memory_format(modules, torch.channels_last)
        try:
            with signal_handlers(self.stop), deterministic():
                while pos.phase < len(self.phases):
                    self._run_phase(pos, restored_opt)
                    restored_opt = None
                    pos = _Position(pos.phase + 1)
                    self._checkpoint(pos, None)
        finally:
            if self.channels_last:  # export and callers see the usual layout
                _set_memory_format(modules, torch.contiguous_format)
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
        phase = self.phases[pos.phase]
        log = self.logs[pos.phase]
        n = len(self.data)
        spe = log.steps_per_epoch
        total = max(1, phase.epochs * spe)
        self._freeze_all()
        opt = build_optimizer(phase)
        if opt is not None:
            for group in opt.param_groups:
                for param in group["params"]:
                    param.requires_grad_(True)
        if restored_opt is not None and opt is not None:
            run_dir = None if self.workdir is None else self.workdir.path
            unflatten_optimizer(opt, restored_opt[0], restored_opt[1], run_dir=run_dir)
        if phase.on_enter is not None:
            phase.on_enter()
        use_amp = self.bf16 and phase.amp
        bar = self._bar(phase, pos, total)
        try:
            while pos.epoch < phase.epochs:
                if pos.step == 0 and phase.on_epoch_start is not None:
                    # Whole-set passes in eval mode then see the same model on every rank.
                    dist.average_batchnorm_statistics(self.method.modules().values())
                    seed_everything(derive_seed(self.seed, pos.phase, pos.epoch, "epoch"))
                    phase.on_epoch_start(EpochInfo(phase.name, pos.epoch, self.data, self.device))
                order_gen = torch.Generator().manual_seed(
                    derive_seed(self.seed, pos.phase, pos.epoch, "order")
                )
                order = torch.randperm(n, generator=order_gen) if phase.shuffle else torch.arange(n)
                if pos.step == 0:
                    self._epoch_sums = {}
                while pos.step < spe:
                    started = time.perf_counter()
                    lo = pos.step * phase.batch_size
                    idx = order[lo : lo + phase.batch_size] if n > phase.batch_size else order
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
                        progress=pos.global_step / total,
                    )
                    loss_value = self._step(phase, opt, batch, pos, total, use_amp)
                    pos.step += 1
                    pos.global_step += 1
                    log.images += int(idx.numel())
                    log.seconds += time.perf_counter() - started
                    if loss_value is not None and (
                        spe * phase.epochs <= _MAX_CURVE
                        or pos.global_step % max(1, total // _MAX_CURVE) == 0
                    ):
                        log.loss_curve.append([pos.global_step, loss_value])
                    if bar is not None:
                        bar.update(1)
                        post = {"ep": f"{pos.epoch + 1}/{phase.epochs}"}
                        if loss_value is not None:
                            post["loss"] = f"{loss_value:.4f}"
                        post["img/s"] = f"{log.images / max(log.seconds, 1e-9):.0f}"
                        bar.set_postfix(post, refresh=False)
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
                    if pos.step == spe:
                        self._end_epoch(log)
                        pos.epoch += 1
                        pos.step = 0
                    due = self._agree(pos)
                    if self.stop.requested:
                        self._checkpoint(pos, opt)
                        dist.barrier()  # rank 0 has written it before any rank exits
                        saved = " after a checkpoint" if self._saves else ""
                        raise RunInterruptedError(
                            f"the run stopped ({self.stop.reason}) in phase {phase.name!r}, "
                            f"epoch {pos.epoch + 1}, step {pos.step}{saved}",
                            "a signal or a stop request interrupts at the next step boundary",
                            "run the same command again with --resume to continue"
                            if self._saves
                            else "run again",
                        )
                    if due:
                        self._checkpoint(pos, opt)
                    if pos.step == 0:
                        break
            dist.average_batchnorm_statistics(self.method.modules().values())
            if phase.on_phase_end is not None:
                phase.on_phase_end()
            log.done = True
        finally:
            if bar is not None:
                bar.close()
        self._freeze_all()

    def _batch_images(self, index: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return self.data.tensor(index)
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

    def _step(
        self,
        phase: Phase,
        opt: torch.optim.Optimizer | None,
        batch: Batch,
        pos: _Position,
        total: int,
        use_amp: bool,
    ) -> float | None:
        if opt is not None:
            factor = phase.schedule.factor(pos.global_step, total)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_amp):
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
        n_global = mine
        if self.world > 1:
            # Global-batch means, the same on every rank: one all-reduce of the step's numbers.
            keys = sorted(metrics)
            numbers = [mine, mine * value if loss is not None else 0.0]
            numbers += [mine * metrics[k] for k in keys]
            reduced = dist.all_reduce_sum(torch.tensor(numbers, dtype=torch.float64)).tolist()
            n_global = reduced[0]
            value = reduced[1] / n_global
            metrics = {k: reduced[2 + i] / n_global for i, k in enumerate(keys)}
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

    def _bar(self, phase: Phase, pos: _Position, total: int) -> Any:
        if not self.progress or self.rank != 0:
            return None
        from tqdm import tqdm  # type: ignore[import-untyped]

        return tqdm(
            total=total,
            initial=pos.global_step,
            desc=f"{phase.name}",
            unit="step",
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
        )
