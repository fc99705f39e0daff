"""The method interface: what an adaptation method declares, and what it is given.

A method (one file in ``adapters/``) subclasses :class:`Method`, is registered
with :func:`sourcefree.engine.registry.register_method`, and declares its work as a
list of :class:`Phase` objects. The trainer (``sourcefree.engine.trainer``) runs the
phases: batching, optimiser and schedule, AMP, progress, checkpoints, resume.

Multi-phase methods declare several phases (CluP: ``pseudo-label`` with no
optimiser, ``warm-up`` for the SSL head and backbone, ``fine-tune``); methods
that recompute something every epoch (SHOT's centroid pseudo-labels) use
``on_epoch_start`` and keep the result in :meth:`Method.state_tensors` so a
resumed run sees the same values; methods with several source packages
(LA-CMFER) set ``max_sources`` and read ``context.sources``.

Methods never see target labels: :class:`TargetData` holds images only.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from sourcefree.data.imaging import normalise
from sourcefree.engine.models import Classifier
from sourcefree.errors import InputError
from sourcefree.package.loader import Package
from sourcefree.package.manifest import InputSpec

if TYPE_CHECKING:
    from sourcefree.engine.feature_bank import MemoryBudget

JSON = Any
"""A value made of dicts, lists, str, int, float, bool and None."""


def pixels_to_tensor(
    pixels: torch.Tensor,
    spec: InputSpec,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (N, H, W, C) on any device -> float32 (N, C, H, W), bitwise :func:`normalise`.

    The torch wrapper of the one preprocessing function: the 256 values a channel
    can take are normalised once by :func:`sourcefree.data.imaging.normalise` and
    looked up on ``pixels``' device, so the result is the numpy result on the CPU
    and on CUDA alike (no device-specific division rounding).

    Raises:
        InputError: not uint8 NHWC, or channels that do not match the spec's colour.
    """
    want = 3 if spec.color == "rgb" else 1
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != want:
        raise InputError(
            f"pixels of dtype {pixels.dtype} and shape {tuple(pixels.shape)} cannot be normalised",
            f"the input spec ({spec.color}) takes uint8 (N, H, W, {want})",
            "load the images with the spec's colour",
        )
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], want, axis=2)
    table = torch.from_numpy(normalise(levels, spec)[:, :, 0]).to(pixels.device)  # (C, 256)
    n, height, width, _ = pixels.shape
    out = torch.empty(
        (n, spec.channels, height, width),
        dtype=torch.float32,
        device=pixels.device,
        memory_format=memory_format,
    )
    for c in range(spec.channels):  # a grey channel is looked up once per output channel
        out[:, c] = table[c][pixels[..., min(c, want - 1)].int()]
    return out


@dataclass(frozen=True)
class TargetData:
    """The customer's unlabelled target images, decoded once, as uint8.

    In ``adapt`` ``images`` is a read-only memory map of the run directory's
    decoded-image cache (:mod:`sourcefree.data.cache`): read it in batches
    (:meth:`tensor` with indices or a slice, :meth:`batches`), never whole.
    """

    images: np.ndarray
    """uint8 (N, H, W, C) at the package's input size (C = 1 for grey input); in memory,
    or memory-mapped read-only."""
    spec: InputSpec
    """The input spec the images are normalised with."""
    fingerprint: str
    """Dataset identity (names, sizes, mtimes): resume refuses a changed dataset."""
    read_summary: Mapping[str, Any] = field(default_factory=dict)
    """Aggregate read counts (ok, bad per reason); never names or ids."""
    pixel_sha256: bytes | None = None
    """sha256 of ``images``' bytes where already known (the decoded-image cache's
    header); None: compute it when needed."""

    def digest(self) -> bytes:
        """sha256 of the images' bytes: the known one, or read through once."""
        if self.pixel_sha256 is not None:
            return self.pixel_sha256
        return hashlib.sha256(np.ascontiguousarray(self.images).data).digest()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensor(
        self,
        index: np.ndarray | torch.Tensor | slice | None = None,
        *,
        device: torch.device | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> torch.Tensor:
        """Normalised float32 NCHW images (all, or the given indices), on the CPU by default.

        Only the rows asked for are read (a memory-mapped cache is never read whole
        unless ``index`` is None). On a CUDA ``device`` the uint8 pixels travel
        (pinned, non-blocking: a quarter of the float32 bytes) and are normalised on
        the GPU; ``memory_format`` is the layout of the result (``torch.channels_last``
        for NHWC convolutions).
        """
        if index is None:
            raw = self.images
        elif isinstance(index, torch.Tensor):
            raw = self.images[index.cpu().numpy()]
        else:
            raw = self.images[index]
        raw = np.ascontiguousarray(raw)
        if not raw.flags.writeable:  # a slice of a read-only map: copy these rows only
            raw = raw.copy()
        pixels = torch.from_numpy(raw)
        dev = torch.device("cpu") if device is None else torch.device(device)
        if dev.type == "cuda":
            pixels = pixels.pin_memory().to(dev, non_blocking=True)
        elif dev.type != "cpu":
            pixels = pixels.to(dev)
        return pixels_to_tensor(pixels, self.spec, memory_format)

    def batches(self, batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(index, images) batches in dataset order (for whole-set passes in hooks)."""
        n = len(self)
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            yield idx, self.tensor(slice(start, start + batch_size))


@dataclass(frozen=True)
class SourceModel:
    """A verified source package and a fresh torch copy of its model (on the run's device)."""

    package: Package
    model: Classifier


@dataclass(frozen=True)
class MethodContext:
    """What a method is built with."""

    sources: tuple[SourceModel, ...]
    data: TargetData
    device: torch.device
    seed: int
    memory: MemoryBudget | None = None
    """The run's budget for N x D feature banks (``--memory-budget``) and the private run
    directory a bank may spill into; None: a quarter of the machine's memory, no spill."""

    @property
    def labels(self) -> tuple[str, ...]:
        return self.sources[0].package.manifest.labels

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Batch:
    """One training batch handed to a phase's step function."""

    x: torch.Tensor
    """Normalised float32 images (B, C, H, W) on the run's device."""
    index: torch.Tensor
    """int64 (B,) dataset indices (look up pseudo-labels with it); on the device."""
    generator: torch.Generator
    """CPU generator seeded for this step: use it for augmentations (resume-safe)."""
    epoch: int
    step: int
    """Step within the epoch."""
    progress: float
    """Fraction of the phase done before this step, in [0, 1) (for schedules in losses)."""


@dataclass(frozen=True)
class StepOutput:
    """A step's result: the loss to minimise (None for no-gradient phases) and metrics."""

    loss: torch.Tensor | None
    metrics: Mapping[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class EpochInfo:
    """Passed to ``Phase.on_epoch_start``."""

    phase: str
    epoch: int
    data: TargetData
    device: torch.device


@dataclass(frozen=True)
class ParamGroup:
    """Parameters that train together, with a learning-rate multiplier."""

    params: Sequence[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: float | None = None
    """Overrides the optimiser's weight decay for this group."""


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimiser of a phase (built by the trainer)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""


@dataclass(frozen=True)
class ScheduleSpec:
    """Learning-rate schedule over the phase's steps: ``lr(t) = lr * factor(t / T)``.

    ``constant``: 1. ``cosine``: ``0.5 (1 + cos(pi p))``, after linear warm-up.
    ``inv``: ``(1 + gamma p) ^ -power`` (SHOT, DANN). ``exp``: ``final ^ p``, an
    exponential decay reaching ``final`` at the end (per-epoch decay ``d`` over
    ``E`` epochs: ``final = d ^ E``, applied continuously).
    """

    name: Literal["constant", "cosine", "inv", "exp"] = "constant"
    warmup_steps: int = 0
    gamma: float = 10.0
    power: float = 0.75
    final: float = 0.0
    """Cosine and exp: final factor."""

    def factor(self, step: int, total: int) -> float:
        """Multiplier of the base learning rate at ``step`` of ``total``."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        p = min(1.0, step / max(1, total))
        if self.name == "cosine":
            return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * p))
        if self.name == "inv":
            return float((1 + self.gamma * p) ** (-self.power))
        if self.name == "exp":
            return float(self.final**p)
        return 1.0


@dataclass(frozen=True)
class Phase:
    """One stage of a method, run by the trainer for ``epochs`` passes over the target data.

    Hooks are called by the trainer: ``on_enter`` every time the phase is
    entered, fresh or resumed (set train/eval modes and non-saved attributes
    there), ``on_epoch_start`` at the start of each epoch (not again when a run
    resumes mid-epoch; keep what it computes in the method's state), and
    ``on_phase_end`` once the last epoch is done.
    """

    name: str
    epochs: int
    step: Callable[[Batch], StepOutput]
    batch_size: int = 64
    parameters: Callable[[], Sequence[ParamGroup]] | None = None
    """What trains; None: no optimiser (statistics passes, pseudo-labelling)."""
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    on_enter: Callable[[], None] | None = None
    on_epoch_start: Callable[[EpochInfo], None] | None = None
    on_phase_end: Callable[[], None] | None = None
    amp: bool = True
    """Allow bf16 autocast on CUDA (never fp16; off on CPU). Losses run in fp32 anyway."""
    drop_last: bool = True
    """Drop the last incomplete batch (BatchNorm dislikes tiny batches)."""
    shuffle: bool = True
    max_grad_norm: float | None = None


class Method(ABC):
    """Base class of adaptation methods.

    Subclasses set ``description`` (one line) and ``config_class`` (a frozen
    dataclass of paper defaults), and implement :meth:`phases`,
    :meth:`modules` and :meth:`export_model`. Everything in :meth:`modules`
    (parameters and buffers) and in :meth:`state_tensors` / :meth:`state_meta`
    is checkpointed; anything else must be rebuilt by ``Phase.on_enter``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[Any]]
    min_sources: ClassVar[int] = 1
    max_sources: ClassVar[int] = 1
    selection_grid: ClassVar[tuple[Mapping[str, Any], ...]] = ()
    """Candidates of ``adapt --select auto``: each a mapping of (dotted) config keys to
    values applied over the user's config; the label-free score picks one
    (``sourcefree.pipeline.selection``). Empty: the method has nothing to tune there."""
    relative_cost: ClassVar[float] = 1.0
    """Rough cost of a default run relative to SHOT's; ``adapt -m auto`` tries the
    cheapest methods first, so a tight ``--budget-s`` still yields a candidate."""

    def __init__(self, config: Any, context: MethodContext) -> None:
        self.config = config
        self.context = context
        self.notes: dict[str, JSON] = {}
        """What the run skipped for this model (e.g. :data:`BN_SKIPPED`); merged into
        :meth:`diagnostics`, empty when nothing was skipped."""

    @abstractmethod
    def phases(self) -> Sequence[Phase]:
        """The phases, in order. Called once per run; must not depend on RNG."""

    @abstractmethod
    def modules(self) -> Mapping[str, nn.Module]:
        """Every module whose state must be checkpointed, by a stable name."""

    @abstractmethod
    def export_model(self) -> Classifier:
        """The model to export as the adapted package (eval mode)."""

    def export_architecture(self) -> str:
        """Registry name of :meth:`export_model`'s architecture."""
        return self.context.sources[0].package.manifest.architecture.name

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Extra tensors to checkpoint (pseudo-labels, centroids, queues)."""
        return {}

    def state_meta(self) -> dict[str, JSON]:
        """Extra JSON state to checkpoint."""
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, JSON]) -> None:  # noqa: B027 (optional hook; the default keeps nothing)
        """Restore what :meth:`state_tensors` and :meth:`state_meta` returned."""

    def report(self) -> dict[str, JSON]:
        """Aggregate diagnostics for ``report.json`` after the run (counts, histograms).

        Never per-sample data (indices, file names, images). Default: nothing.
        """
        return {}

    def diagnostics(self) -> dict[str, JSON]:
        """:meth:`report` plus :attr:`notes`: the ``method_report`` of ``report.json``."""
        return {**self.report(), **self.notes}

    def bn_statistics_phases(
        self, model: nn.Module, batch_size: int, epochs: int = 1, name: str = "bn-stats"
    ) -> list[Phase]:
        """``[bn_statistics_phase(...)]``, or ``[]`` and a note when ``model`` has no BatchNorm.

        A model normalised only by LayerNorm / GroupNorm has no running statistics
        to re-estimate: the step is skipped and :meth:`diagnostics` says so.
        """
        if batchnorm_layers(model):
            return [bn_statistics_phase(model, batch_size, epochs, name)]
        self.note_bn_skipped(name)
        return []

    def note_bn_skipped(self, step: str) -> None:
        """Note that the BatchNorm step ``step`` was skipped: the model has no BatchNorm layers."""
        self.notes["bn_statistics"] = BN_SKIPPED
        steps = self.notes.setdefault("bn_statistics_skipped", [])
        if step not in steps:
            steps.append(step)

    def pseudo_label_selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pseudo-labels the method trained on: (dataset indices, labels), int64, CPU.

        Read once after the run, only to report their precision and coverage
        against evaluation labels (``adapt --eval-labels``); never written out.
        Default: None (the method has no pseudo-labels).
        """
        return None


# --- helpers shared by several methods -------------------------------------------------


BN_SKIPPED = "no BatchNorm layers: skipped"
"""The ``bn_statistics`` note of a method whose BatchNorm step found no BatchNorm layer."""

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
"""Normalisation layer types (subclasses included, e.g. timm's LayerNorm2d, GroupNorm1)."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm, LayerNorm and GroupNorm layer of ``model`` (:data:`NORM_LAYERS`), in
    module order: on a BatchNorm-only model, the layers of :func:`batchnorm_layers`."""
    return [m for m in model.modules() if isinstance(m, NORM_LAYERS)]


def bn_statistics_phase(
    model: nn.Module, batch_size: int, epochs: int = 1, name: str = "bn-stats"
) -> Phase:
    """A no-gradient phase that re-estimates BatchNorm statistics on the target data.

    AdaBN (Li et al., 2016): running mean and variance are reset, then
    accumulated as an exact average over the target batches (``momentum=None``),
    with every other layer in eval mode. The counters live in the BN buffers,
    so a resumed run continues the same average.
    """

    def enter() -> None:
        model.eval()
        for bn in batchnorm_layers(model):
            bn.train()
            bn.momentum = None

    def epoch_start(info: EpochInfo) -> None:
        if info.epoch == 0:
            for bn in batchnorm_layers(model):
                bn.reset_running_stats()

    def step(batch: Batch) -> StepOutput:
        with torch.no_grad():
            model(batch.x)
        return StepOutput(loss=None)

    def end() -> None:
        for bn in batchnorm_layers(model):
            bn.momentum = 0.1
        model.eval()

    return Phase(
        name=name,
        epochs=epochs,
        step=step,
        batch_size=batch_size,
        on_enter=enter,
        on_epoch_start=epoch_start,
        on_phase_end=end,
        shuffle=False,
        amp=False,
    )


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy ``H(p) = -sum_c p_c log p_c`` of ``softmax(logits)``, fp32."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)
