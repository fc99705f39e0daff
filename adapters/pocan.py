"""POCAN, source-free: learnable class prototypes, contrastive adaptation, adaptive thresholds.

[0] "A Prototype-Oriented Contrastive Adaption Network For Cross-domain Facial
Expression Recognition" (POCAN), ACCV 2022 (Asian Conference on Computer Vision,
proceedings; no arXiv version, and no DOI was found for it); reference code
``Winter-is-coming-wow/ACCV2022_POCAN`` on GitHub (TensorFlow; read for defaults
only). Equation numbers below are the paper's.

The paper's stage 2 updates four things: encoder ``f``, projection head ``g``,
source prototypes ``M_s`` and target prototypes ``M_t``, in turns (Sec. 3.1 and
3.6): the extractor with the prototypes frozen (eq. 15), then the prototypes with
the extractor frozen (eq. 16). Here, with no source image on site:

- **Embedding.** ``z = f(x) / ||f(x)||``: the L2-normalised features of the vendor's
  backbone. The prototype terms use ``z`` directly (no projection head ``g``): the
  only class knowledge a source-free method has is the vendor's linear head, whose
  rows live in the backbone's feature space (Sec. 3.1: "the neural network weights
  in the classification layer can be interpreted as class prototypes"). The
  instance loss goes through a new SimCLR-style MLP head (``projection_dim``;
  trained with the backbone, not exported), because on ``z`` itself it pulled the
  classes apart on the dev seed (docs/methods.md).
- **Prototypes** (Sec. 3.1). ``M_s`` = the L2-normalised rows of the source head's
  weight, fixed (its eq. 2 loss ``L_sp`` needs source labels). ``M_t`` is learnable
  and initialised to ``M_s``. Similarities are cosines with a temperature:
  ``P_ij = softmax_j(z_i . mu_j / T)`` with ``mu_j`` normalised and ``T =
  prototype_temperature`` (the paper's free prototype norms play that role).
- **Pseudo-labels** (Sec. 3.1, 3.5). At the start of every round, on the
  un-augmented target images in eval mode: ``y_i = argmax_j P^t_ij``,
  ``conf_i = max_j P^t_ij`` from the *target* prototypes (as the reference code);
  the trusted set keeps ``conf_i >= threshold_{y_i}`` with the adaptive per-class
  threshold of eq. 14, ``threshold_c = avgc_c + (maxc_c - avgc_c)(1 - avgc_c^beta)``
  (:func:`adaptive_thresholds`). Class weights are eq. 13,
  ``w_c = 1 - (n_c / sum_j n_j)^2`` over the pseudo-label counts
  (:func:`class_weights`, counts add-one smoothed so a class that takes every
  label is not silenced).
- **Prototype phase** (eq. 16 without its source terms): ``L_tp`` of eq. 3, the
  class-weighted cross-entropy of the trusted samples against ``M_t``; only ``M_t``
  trains; the extractor is frozen, so its features are the cached ones of the
  labelling pass, kept until the phase ends in a
  :class:`~sourcefree.engine.feature_bank.FeatureBank` sized by ``--memory-budget``:
  within it float32 on the training device (the whole-set pass, unchanged); above it
  float16 in memory or in a spill file, filled batch by batch (labels from each
  batch's float32 rows), and then left out of checkpoints: a run resumed inside the
  phase computes them again from the restored (frozen) model.
- **Extractor phase** (eq. 15 without its source terms): ``L_target`` of eq. 5, the
  instance contrastive loss (InfoNCE, eq. 1, over two random views of every image,
  temperature ``tau``) plus ``lambda_t`` times the weighted cross-entropy of the
  trusted samples against ``M_t`` with ``lambda_t = 2 / (1 + exp(-10 p)) - 1``; and
  ``L^{t->s}_cross`` of eq. 8-9, the weighted cross-entropy of the trusted target
  samples against the source prototypes ``M_s`` (the half of eq. 9 that needs no
  source sample). The backbone (and the instance-loss head) train; the source head,
  ``M_s`` and ``M_t`` do not.
- **Dropped** (they need source images): ``L_source`` (eq. 6, SupCon + ``L_sp``), the
  ``s -> t`` half of eq. 9, stage 1 (SupCon pre-training, eq. 4: the vendor's job),
  and the domain-level adversarial loss ``L_ad`` (eq. 10-12), a source-vs-target
  classification that has no signal with one domain (and the paper's smallest
  ablation gain, Table 3).

The alternation is declared as phases: ``prototypes-k`` then ``extractor-k`` for
every round ``k`` (one pass over the target images each, like the iterative
clustering and representation learning the paper compares it to), and a final
``bn-stats`` pass. The exported model is the backbone with the target-prototype
classifier as its linear head (bias 0, rows ``mu^t_j / (T s)`` with ``s`` the mean
target feature norm), so its argmax is exactly ``argmax_j z . mu^t_j``.

See docs/methods.md for every departure and its reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from sourcefree.engine.config import refuse_invalid
from sourcefree.engine.feature_bank import (
    MIN_PRODUCT_ROWS,
    FeatureBank,
    MemoryBudget,
    choose_storage,
)
from sourcefree.engine.method import (
    JSON,
    Batch,
    EpochInfo,
    Method,
    MethodContext,
    OptimizerSpec,
    ParamGroup,
    Phase,
    StepOutput,
    batchnorm_layers,
)
from sourcefree.engine.models import Classifier
from sourcefree.engine.registry import register_method
from sourcefree.errors import ConfigError, InputError, TrainingError
from sourcefree.ops.augment import from_unit, random_view, to_unit

__all__ = [
    "Pocan",
    "PocanConfig",
    "PocanOptimConfig",
    "PocanViewConfig",
    "Prototypes",
    "adaptive_thresholds",
    "class_weights",
    "info_nce",
    "lambda_schedule",
    "trusted_mask",
]


#: Rows a checkpoint's features are copied into a bank in: about 16 MiB of float32.
_CHUNK_BYTES = 1 << 24


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _count(v: object, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


@dataclass(frozen=True)
class PocanOptimConfig:
    """SGD for the two alternating phases (paper Sec. 4.2: momentum 0.9, weight decay 1e-5)."""

    extractor_lr: float = 1e-4
    """Backbone (and projection head) lr (paper 1e-5; chosen on the dev seed: docs/methods.md)."""
    prototype_lr: float = 1e-3
    """Target-prototype lr, 10x the extractor's as in the paper (1e-4 vs 1e-5)."""
    prototype_lr_drop: float = 0.1
    """Factor on the prototype lr from ``prototype_lr_drop_epoch`` on (paper: /10)."""
    prototype_lr_drop_epoch: int | None = None
    """Round from which the prototype lr drops; None: half the rounds (paper ~10 of 20)."""
    momentum: float = 0.9
    """SGD momentum (paper 0.9)."""
    weight_decay: float = 1e-5
    """Backbone weight decay (paper 1e-5); the unit-norm prototypes have none."""

    def __post_init__(self) -> None:
        bad = []
        if not _positive(self.extractor_lr) or not _positive(self.prototype_lr):
            bad.append(
                f"extractor_lr={self.extractor_lr}, prototype_lr={self.prototype_lr} (must be > 0)"
            )
        if not _positive(self.prototype_lr_drop) or self.prototype_lr_drop > 1:
            bad.append(f"prototype_lr_drop={self.prototype_lr_drop} (must be in (0, 1])")
        drop = self.prototype_lr_drop_epoch
        if drop is not None and not _count(drop, 0):
            bad.append(f"prototype_lr_drop_epoch={drop!r} (must be an integer >= 0 or None)")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            bad.append(f"momentum={self.momentum}, weight_decay={self.weight_decay}")
        refuse_invalid(self, bad)


@dataclass(frozen=True)
class PocanViewConfig:
    """The two random views of every image for the instance contrastive loss (eq. 1, 5)."""

    crop_scale: tuple[float, float] = (0.25, 1.0)
    """Area range of the random resized crop (SimCLR 0.08-1; higher floor for 32 px faces)."""
    jitter: float = 0.4
    """Brightness, contrast and saturation factors in [1 - j, 1 + j] (SimCLR 0.8 s, s = 0.5)."""
    hue: float = 0.1
    """Hue shift in [-h, h] turns (SimCLR 0.2 s, s = 0.5)."""
    jitter_prob: float = 0.8
    """Probability of colour jitter per view (SimCLR 0.8)."""
    grayscale_prob: float = 0.2
    """Probability of a grey-scale view (SimCLR 0.2)."""

    def __post_init__(self) -> None:
        bad = []
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            bad.append(f"crop_scale=({low}, {high}) (need 0 < low <= high <= 1)")
        if not 0 <= self.jitter < 1 or not 0 <= self.hue <= 0.5:
            bad.append(f"jitter={self.jitter}, hue={self.hue} (jitter in [0, 1), hue in [0, 0.5])")
        if not 0 <= self.jitter_prob <= 1 or not 0 <= self.grayscale_prob <= 1:
            bad.append(
                f"jitter_prob={self.jitter_prob}, grayscale_prob={self.grayscale_prob} "
                "(probabilities in [0, 1])"
            )
        refuse_invalid(self, bad)


@dataclass(frozen=True)
class PocanConfig:
    """Source-free POCAN settings (paper and reference-code defaults unless noted)."""

    epochs: int = 5
    """Rounds of (prototype phase, extractor phase) (paper: about 20 epochs; see docs)."""
    batch_size: int = 64
    """Images per step (reference code 64); each image gives two views."""
    label_batch_size: int = 256
    """Images per forward pass of the labelling pass (no effect on results)."""
    tau: float = 0.7
    """InfoNCE temperature (eq. 1; reference 0.7, paper Fig. 2a: 0.5-0.7 is best)."""
    prototype_temperature: float = 0.1
    """T in P = softmax(z . mu / T) with unit z and mu (not in the paper; see docs)."""
    beta: float = 2.0
    """Eq. 14 beta: larger is a stricter trusted-sample threshold (reference 2)."""
    class_weighting: bool = True
    """Eq. 13 class weights on the pseudo-label losses (Table 3 'w/o weights' is False)."""
    weight_smoothing: float = 1.0
    """Add-s smoothing of the eq. 13 counts (0: exact; 1 keeps a class with every label > 0)."""
    instance_weight: float = 1.0
    """Weight of the instance contrastive loss in eq. 5 (paper 1)."""
    cross_weight: float = 1.0
    """Weight of the target->source prototype alignment L^{t->s}_cross (eq. 9: 1)."""
    lambda_gamma: float = 10.0
    """lambda_t = 2 / (1 + exp(-gamma p)) - 1 over the run's progress p (eq. 5: 10)."""
    recalibrate_bn: bool = True
    """Re-estimate BatchNorm statistics on the plain target images before each labelling."""
    projection_dim: int = 128
    """InfoNCE on a new MLP head D -> D -> this (SimCLR; 0: on z itself). Not exported."""
    optim: PocanOptimConfig = field(default_factory=PocanOptimConfig)
    """Optimiser of the two phases."""
    views: PocanViewConfig = field(default_factory=PocanViewConfig)
    """Random views for the instance contrastive loss."""

    def __post_init__(self) -> None:
        bad = []
        for name, value, lo in (
            ("epochs", self.epochs, 1),
            ("batch_size", self.batch_size, 2),
            ("label_batch_size", self.label_batch_size, 2),
            ("projection_dim", self.projection_dim, 0),
        ):
            if not _count(value, lo):
                bad.append(f"{name}={value!r} (must be an integer >= {lo})")
        for name, v in (
            ("tau", self.tau),
            ("prototype_temperature", self.prototype_temperature),
            ("beta", self.beta),
        ):
            if not _positive(v):
                bad.append(f"{name}={v!r} (must be > 0)")
        for name, v in (
            ("instance_weight", self.instance_weight),
            ("cross_weight", self.cross_weight),
            ("lambda_gamma", self.lambda_gamma),
            ("weight_smoothing", self.weight_smoothing),
        ):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad.append(f"{name}={v!r} (must be >= 0)")
        if not isinstance(self.optim, PocanOptimConfig) or not isinstance(
            self.views, PocanViewConfig
        ):
            bad.append("optim/views sections have the wrong types")
        refuse_invalid(self, bad)

    def drop_epoch(self) -> int:
        """Round from which the prototype lr is multiplied by ``optim.prototype_lr_drop``."""
        drop = self.optim.prototype_lr_drop_epoch
        return self.epochs // 2 if drop is None else drop


# --- the paper's equations, as plain functions ---------------------------------------------


def class_weights(counts: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 13: ``w_i = 1 - (n_i / sum_j n_j)^2`` (float32, (C,)).

    The paper's form; the reference code uses ``(1 - n_i / sum n)^2`` for the source
    and ``1 - n_i / sum n`` for the target. ``smoothing = s`` uses the add-s
    frequencies ``(n_i + s) / (sum_j n_j + C s)`` instead (0: the paper exactly), so a
    class holding every label keeps a weight above 0. All ones when every count is 0.
    """
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.numel() == 0:
        raise InputError(
            "counts is not a non-empty 1-D tensor",
            "eq. 13 needs one count per class",
            "pass torch.bincount(labels, minlength=C)",
        )
    if not (isinstance(smoothing, (int, float)) and math.isfinite(smoothing) and smoothing >= 0):
        raise ConfigError(f"smoothing={smoothing!r}", "it must be a number >= 0", "use 0 or 1")
    n = counts.to(torch.float64)
    if bool((n < 0).any()):
        raise InputError(
            "counts holds negative values", "they are class sizes", "pass bincount results"
        )
    if float(n.sum()) == 0.0:
        return torch.ones(n.numel(), dtype=torch.float32, device=counts.device)
    n = n + smoothing
    return (1.0 - (n / n.sum()) ** 2).to(torch.float32)


def adaptive_thresholds(
    confidence: torch.Tensor, labels: torch.Tensor, num_classes: int, beta: float
) -> torch.Tensor:
    """Eq. 14: ``threshold_c = avgc_c + (maxc_c - avgc_c) (1 - avgc_c^beta)`` per class.

    ``avgc_c`` and ``maxc_c`` are the mean and the maximum confidence of the samples
    labelled ``c``. Computed in float64 and capped at ``maxc_c``, so the most
    confident sample of every labelled class is always trusted. ``+inf`` for a class
    nobody is labelled as (no sample can pass it).

    Returns:
        (C,) float64 thresholds.
    """
    if confidence.dim() != 1 or labels.shape != confidence.shape:
        raise InputError(
            f"confidence {tuple(confidence.shape)} and labels {tuple(labels.shape)}",
            "both must be 1-D with one entry per sample",
            "pass the max softmax probability and the argmax of every sample",
        )
    if not _positive(beta):
        raise ConfigError(f"beta={beta!r}", "eq. 14's beta must be > 0", "use e.g. 2")
    conf = confidence.detach().to(torch.float64)
    lab = labels.detach().to(torch.int64)
    dev = conf.device
    sums = torch.zeros(num_classes, dtype=torch.float64, device=dev).index_add_(0, lab, conf)
    counts = torch.bincount(lab, minlength=num_classes).to(torch.float64)
    avg = sums / counts  # NaN for empty classes
    maxc = torch.full((num_classes,), -math.inf, dtype=torch.float64, device=dev)
    maxc = maxc.scatter_reduce(0, lab, conf, reduce="amax", include_self=True)
    thr = torch.minimum(avg + (maxc - avg) * (1.0 - avg.pow(beta)), maxc)
    return torch.where(counts > 0, thr, torch.full_like(thr, math.inf))


def trusted_mask(
    confidence: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """``conf_i >= threshold_{y_i}`` (bool, (N,)): the trusted set D_t^trust of Sec. 3.1."""
    thr = thresholds.to(confidence.device, torch.float64)[labels.to(torch.int64)]
    keep: torch.Tensor = confidence.to(torch.float64) >= thr
    return keep


def lambda_schedule(progress: float, gamma: float = 10.0) -> float:
    """``lambda_t = 2 / (1 + exp(-gamma p)) - 1`` (eq. 5's text), 0 at p = 0, ~1 at p = 1."""
    p = min(1.0, max(0.0, float(progress)))
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1 over two views (SimCLR's NT-Xent): the mean over all 2B anchors.

    Anchor ``z1_i`` has positive ``z2_i`` and the other ``2B - 2`` rows as negatives
    (and symmetrically); rows are L2-normalised here, similarities are cosines / T.
    """
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 2:
        raise InputError(
            f"views of shapes {tuple(z1.shape)} and {tuple(z2.shape)}",
            "InfoNCE needs two (B, D) views with B >= 2",
            "pass two views of the same batch",
        )
    b = z1.shape[0]
    z = nn.functional.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    eye = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -math.inf)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return nn.functional.cross_entropy(sim, target)


def _prototype_ce(
    z: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Class-weighted CE of ``softmax(z . mu / T)`` (eq. 3, 5, 8) over the masked rows."""
    from sourcefree.kernels import margin_ce_im

    cos = z.float() @ nn.functional.normalize(prototypes.float(), dim=1).T
    w = weights.to(cos.device)[labels]
    return margin_ce_im(cos, labels, scale=1.0 / temperature, weight=w, mask=mask).ce


class Prototypes(nn.Module):
    """``M_s`` (a buffer: the normalised source head rows) and ``M_t`` (a parameter)."""

    def __init__(self, head_weight: torch.Tensor) -> None:
        super().__init__()
        unit = nn.functional.normalize(head_weight.detach().float(), dim=1)
        self.source: torch.Tensor
        self.register_buffer("source", unit.clone())
        self.target = nn.Parameter(unit.clone())


@torch.no_grad()
def _recalibrate_bn(model: Classifier, method: Pocan) -> None:
    """AdaBN on the plain target images: exact average of the batch statistics."""
    layers = batchnorm_layers(model)
    if not layers:
        return
    model.eval()
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    dev = method.context.device
    for _, x in method.context.data.batches(method.config.label_batch_size):
        if x.shape[0] >= 2:
            model.backbone(x.to(dev))
    for bn, m in zip(layers, momenta, strict=True):
        bn.momentum = m
    model.eval()


@register_method("pocan")
class Pocan(Method):
    """Source-free POCAN: alternating target-prototype and extractor phases."""

    description = (
        "POCAN (source-free): learnable target prototypes from the source head, "
        "adaptive thresholds, prototype + instance contrastive losses"
    )
    config_class = PocanConfig
    config: PocanConfig

    def __init__(self, config: PocanConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.model = context.sources[0].model.to(context.device)
        self.prototypes = Prototypes(self.model.head.weight).to(context.device)
        dim = int(self.model.head.in_features)
        self.projector: nn.Module = (
            nn.Sequential(
                nn.Linear(dim, dim),
                nn.BatchNorm1d(dim),
                nn.ReLU(inplace=True),
                nn.Linear(dim, config.projection_dim),
            )
            if config.projection_dim > 0
            else nn.Identity()
        ).to(context.device)
        spec = context.data.spec
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        c = context.num_classes
        dev = context.device
        self.memory = MemoryBudget() if context.memory is None else context.memory
        # Per-round state (checkpointed): the labelling pass's outputs. ``bank``: the
        # normalised features, through the prototype phase (None: none kept).
        self.bank: FeatureBank | None = None
        self.labels = torch.zeros(0, dtype=torch.int64, device=dev)
        self.trusted = torch.zeros(0, dtype=torch.bool, device=dev)
        self.weights = torch.ones(c, dtype=torch.float32, device=dev)
        self.thresholds = torch.full((c,), math.inf, dtype=torch.float64)
        self.feature_scale = torch.zeros((), dtype=torch.float32)
        self.round_meta: dict[str, Any] = {}

    # --- labelling pass (Sec. 3.1, 3.5) ---------------------------------------------------

    @torch.no_grad()
    def _features_all(self) -> torch.Tensor:
        """Eval-mode backbone features of every un-augmented target image (float32)."""
        self.model.eval()
        dev = self.context.device
        rows = [
            self.model.backbone(x.to(dev)).float()
            for _, x in self.context.data.batches(self.config.label_batch_size)
        ]
        return torch.cat(rows)

    def _unit_prototypes(self) -> torch.Tensor:
        return nn.functional.normalize(self.prototypes.target.float(), dim=1)

    def _unit_batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first row, features, normalised features) of each batch of the plain images."""
        self.model.eval()
        dev = self.context.device
        for idx, x in self.context.data.batches(self.config.label_batch_size):
            f = self.model.backbone(x.to(dev)).float()
            yield int(idx[0]), f, nn.functional.normalize(f, dim=1)

    def _label_whole(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Within the budget: all N rows at once into a float32 bank.

        Returns each image's confidence, label and agreement with the vendor's head.
        """
        f = self._features_all()
        z = nn.functional.normalize(f, dim=1)
        src = self.model.head(f.to(self.model.head.weight.dtype)).argmax(1)
        del f
        bank = self.bank = self.memory.bank(z.shape[0], z.shape[1], device=self.context.device)
        bank.write(0, z)
        del z
        cos = bank.tensor() @ self._unit_prototypes().T
        probs = torch.softmax(cos / self.config.prototype_temperature, dim=1)
        conf, labels = probs.max(dim=1)
        return conf, labels, src == labels

    def _label_batches(self, bank: FeatureBank) -> tuple[torch.Tensor, ...]:
        """Over the budget: each batch's float32 rows give its labels, then go to ``bank``.

        BLAS may round a product of a few rows otherwise than the whole-set one, so a
        batch of fewer than 16 rows is scored together with the 16 rows before it.
        """
        mu, t, head = self._unit_prototypes(), self.config.prototype_temperature, self.model.head
        conf, labels, agree = [], [], []
        f_tail = z_tail = None
        for start, f, z in self._unit_batches():
            bank.write(start, z)
            k = int(z.shape[0])
            if f_tail is not None and z_tail is not None and k < MIN_PRODUCT_ROWS:
                f, z = torch.cat([f_tail, f]), torch.cat([z_tail, z])
            c, y = torch.softmax((z @ mu.T) / t, dim=1).max(dim=1)
            src = head(f.to(head.weight.dtype)).argmax(1)
            conf.append(c[-k:])
            labels.append(y[-k:])
            agree.append(src[-k:] == y[-k:])
            f_tail, z_tail = f[-MIN_PRODUCT_ROWS:], z[-MIN_PRODUCT_ROWS:]
        return torch.cat(conf), torch.cat(labels), torch.cat(agree)

    @torch.no_grad()
    def _refill(self) -> FeatureBank:
        """The round's normalised features again, from the frozen model (a checkpoint
        written over the budget holds none)."""
        n, d = len(self.context.data), int(self.model.head.in_features)
        bank = self.bank = self.memory.bank(n, d, device=self.context.device)
        for start, _, z in self._unit_batches():
            bank.write(start, z)
        return bank

    def _close_bank(self) -> None:
        if self.bank is not None:
            self.bank.close()
            self.bank = None

    @torch.no_grad()
    def label(self, round_index: int = 0) -> None:
        """Pseudo-labels, eq. 14 thresholds, the trusted set and eq. 13 weights, from ``M_t``."""
        cfg = self.config
        if cfg.recalibrate_bn:
            _recalibrate_bn(self.model, self)
        self._close_bank()
        n, d = len(self.context.data), int(self.model.head.in_features)
        spill = self.memory.spill_dir is not None
        if choose_storage(n, d, self.memory.budget_bytes, spill=spill) == "float32":
            conf, labels, agree = self._label_whole()
        else:
            self.bank = self.memory.bank(n, d, device=self.context.device)
            conf, labels, agree = self._label_batches(self.bank)
        c = self.context.num_classes
        thr = adaptive_thresholds(conf, labels, c, cfg.beta)
        trusted = trusted_mask(conf, labels, thr)
        counts = torch.bincount(labels, minlength=c)
        weights = (
            class_weights(counts, cfg.weight_smoothing) if cfg.class_weighting else torch.ones(c)
        )
        self.labels = labels
        self.trusted = trusted
        self.weights = weights.to(labels.device)
        self.thresholds = thr.cpu()
        # Agreement with the vendor's head on the current features: an aggregate diagnostic.
        self.round_meta = {
            "round": round_index,
            "pseudo_label_counts": [int(v) for v in counts.tolist()],
            "trusted_per_class": [
                int(v) for v in torch.bincount(labels[trusted], minlength=c).tolist()
            ],
            "trusted_fraction": float(trusted.float().mean()),
            "thresholds": [float(t) if math.isfinite(t) else None for t in thr.tolist()],
            "class_weights": [float(w) for w in weights.tolist()],
            "mean_confidence": float(conf.mean()),
            "agreement_with_source_head": float(agree.float().mean()),
        }

    def _ensure_labels(self) -> None:
        # A step without a preceding epoch hook (direct calls, tests) labels lazily.
        if self.labels.numel() == 0:
            self.label(0)

    # --- prototype phase (eq. 3, 16) ------------------------------------------------------

    def _prototype_enter(self) -> None:
        self.model.eval()

    def _prototype_step(self, batch: Batch) -> StepOutput:
        self._ensure_labels()
        trusted = torch.nonzero(self.trusted).flatten()
        if trusted.numel() == 0:
            raise TrainingError(
                "no target sample passed the eq. 14 thresholds",
                "the prototype phase trains on trusted samples only",
                "check the source model's outputs on the target images (NaN or constant?)",
            )
        # Every step draws trusted samples only: index i of the epoch maps to trusted[i mod M].
        idx = trusted[batch.index.to(trusted.device) % trusted.numel()]
        bank = self.bank if self.bank is not None else self._refill()
        loss = _prototype_ce(
            bank.take(idx),
            self.prototypes.target,
            self.labels[idx],
            None,
            self.weights,
            self.config.prototype_temperature,
        )
        return StepOutput(loss, {"l_tp": loss.detach()})

    def _prototype_params(self, round_index: int) -> list[ParamGroup]:
        opt = self.config.optim
        scale = opt.prototype_lr_drop if round_index >= self.config.drop_epoch() else 1.0
        return [ParamGroup([self.prototypes.target], lr_scale=scale, weight_decay=0.0)]

    # --- extractor phase (eq. 1, 5, 8-9, 15) ----------------------------------------------

    def _extractor_enter(self) -> None:
        self.model.train()
        self.projector.train()

    def _views(self, batch: Batch) -> torch.Tensor:
        """Two random views of the batch, stacked (2B, C, H, W); a function of the batch."""
        v = self.config.views
        # A fresh generator from the step's seed: the same batch always gets the same views.
        gen = torch.Generator().manual_seed(batch.generator.initial_seed())
        dev = batch.x.device
        mean, std = self._mean.to(dev), self._std.to(dev)
        unit = to_unit(batch.x, mean, std)
        side = int(batch.x.shape[-1])
        views = [
            random_view(
                unit, gen, side, v.crop_scale, v.jitter, v.hue, v.jitter_prob, v.grayscale_prob
            )
            for _ in range(2)
        ]
        return from_unit(torch.cat(views), mean, std)

    def _extractor_step(self, round_index: int, batch: Batch) -> StepOutput:
        self._ensure_labels()
        cfg = self.config
        b = batch.x.shape[0]
        f = self.model.backbone(self._views(batch))
        z = nn.functional.normalize(f.float(), dim=1)
        h = self.projector(f) if cfg.projection_dim > 0 else z
        l_ins = info_nce(h[:b], h[b:], cfg.tau)
        index = batch.index.to(self.labels.device)
        y = self.labels[index].repeat(2)
        mask = self.trusted[index].repeat(2)
        t = cfg.prototype_temperature
        l_tp = _prototype_ce(z, self.prototypes.target.detach(), y, mask, self.weights, t)
        l_cross = _prototype_ce(z, self.prototypes.source, y, mask, self.weights, t)
        lam = lambda_schedule((round_index + batch.progress) / cfg.epochs, cfg.lambda_gamma)
        loss = cfg.instance_weight * l_ins + lam * l_tp + cfg.cross_weight * l_cross
        return StepOutput(
            loss,
            {
                "l_ins": l_ins.detach(),
                "l_tp": l_tp.detach(),
                "l_cross": l_cross.detach(),
                "lambda_t": lam,
            },
        )

    def _extractor_params(self) -> list[ParamGroup]:
        params = list(self.model.backbone.parameters()) + list(self.projector.parameters())
        return [ParamGroup(params)]

    # --- Method -----------------------------------------------------------------------------

    def phases(self) -> Sequence[Phase]:
        cfg, opt = self.config, self.config.optim
        out: list[Phase] = []
        for r in range(cfg.epochs):
            out.append(
                Phase(
                    name=f"prototypes-{r + 1}",
                    epochs=1,
                    step=self._prototype_step,
                    batch_size=cfg.batch_size,
                    parameters=partial(self._prototype_params, r),
                    optimizer=OptimizerSpec(name="sgd", lr=opt.prototype_lr, momentum=opt.momentum),
                    on_enter=self._prototype_enter,
                    on_epoch_start=partial(self._label_epoch, round_index=r),
                    on_phase_end=self._close_bank,
                    amp=False,
                )
            )
            out.append(
                Phase(
                    name=f"extractor-{r + 1}",
                    epochs=1,
                    step=partial(self._extractor_step, r),
                    batch_size=cfg.batch_size,
                    parameters=self._extractor_params,
                    optimizer=OptimizerSpec(
                        name="sgd",
                        lr=opt.extractor_lr,
                        momentum=opt.momentum,
                        weight_decay=opt.weight_decay,
                    ),
                    on_enter=self._extractor_enter,
                    on_phase_end=self._leave,
                )
            )
        if cfg.recalibrate_bn:
            if not batchnorm_layers(self.model):  # _recalibrate_bn before each labelling
                self.note_bn_skipped("recalibrate_bn")
            out += self.bn_statistics_phases(self.model, cfg.label_batch_size)
        return out

    def _label_epoch(self, info: EpochInfo, round_index: int) -> None:
        self.label(round_index)

    def _leave(self) -> None:
        self.model.eval()

    def modules(self) -> Mapping[str, nn.Module]:
        return {"model": self.model, "prototypes": self.prototypes, "projector": self.projector}

    @torch.no_grad()
    def _write_head(self) -> None:
        """Head := target-prototype classifier, ``W = mu^t / (T s)``, ``b = 0`` (eq. 3's P^t)."""
        if float(self.feature_scale) <= 0:
            self.model.eval()
            dev = self.context.device
            norms = [
                self.model.backbone(x.to(dev)).float().norm(dim=1)
                for _, x in self.context.data.batches(self.config.label_batch_size)
            ]
            self.feature_scale = torch.cat(norms).mean().clamp_min(1e-6).cpu()
        unit = nn.functional.normalize(self.prototypes.target.float(), dim=1)
        scale = 1.0 / (self.config.prototype_temperature * float(self.feature_scale))
        head = self.model.head
        head.weight.copy_((unit * scale).to(head.weight))
        if head.bias is not None:
            head.bias.zero_()

    def export_model(self) -> Classifier:
        self._write_head()
        return self.model.eval()

    # --- state ------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The round's state; the features only from a float32 bank (within the budget)."""
        bank = self.bank
        kept = (
            bank.tensor()
            if bank is not None and bank.storage == "float32"
            else torch.zeros(0, dtype=torch.float32)
        )
        return {
            "features": kept.detach().cpu().clone(),
            "labels": self.labels.detach().cpu().clone(),
            "trusted": self.trusted.detach().cpu().clone(),
            "weights": self.weights.detach().cpu().clone(),
            "thresholds": self.thresholds.detach().cpu().clone(),
            "feature_scale": self.feature_scale.detach().cpu().clone(),
        }

    def state_meta(self) -> dict[str, JSON]:
        return {"round": dict(self.round_meta)}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, JSON]) -> None:
        dev = self.context.device
        if "labels" in tensors:
            self._close_bank()
            features = tensors["features"].to(torch.float32)
            if features.dim() == 2 and features.shape[0] > 0:
                self._restore_bank(features)
            self.labels = tensors["labels"].to(dev, torch.int64).clone()
            self.trusted = tensors["trusted"].to(dev, torch.bool).clone()
            self.weights = tensors["weights"].to(dev, torch.float32).clone()
            self.thresholds = tensors["thresholds"].to(torch.float64).clone()
            self.feature_scale = tensors["feature_scale"].to(torch.float32).clone()
        info = meta.get("round", {})
        self.round_meta = dict(info) if isinstance(info, Mapping) else {}

    def _restore_bank(self, features: torch.Tensor) -> None:
        """A bank (sized by this run's budget) holding a checkpoint's float32 features."""
        n, d = int(features.shape[0]), int(features.shape[1])
        bank = self.bank = self.memory.bank(n, d, device=self.context.device)
        rows = max(1, _CHUNK_BYTES // (4 * max(d, 1)))
        for start in range(0, n, rows):
            bank.write(start, features[start : start + rows])

    def pseudo_label_selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last labelling's trusted set (eq. 14) and its labels: what the CE terms used."""
        if self.labels.numel() == 0:
            return None
        idx = torch.nonzero(self.trusted.cpu()).flatten().to(torch.int64)
        return idx, self.labels.detach().cpu().to(torch.int64)[idx]

    def report(self) -> dict[str, JSON]:
        """The last labelling pass in aggregate (counts, thresholds, weights; no per-sample)."""
        return {"last_round": dict(self.round_meta)}
