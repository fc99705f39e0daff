"""CluP: cluster-level pseudo-labels + self-supervised warm-up + fine-tune on the selected subset.

[0] Conti, Rota, Wang, Ricci. "Cluster-level pseudo-labelling for source-free
cross-domain facial expression recognition", BMVC 2022, arXiv 2210.05246
(https://arxiv.org/abs/2210.05246).
[1] Caron et al. "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments" (SwAV, DeepCluster-v2), NeurIPS 2020, arXiv 2006.09882.

Phases (run by :class:`sourcefree.engine.trainer.Trainer`):

``pseudo-label`` (no optimiser; work in ``on_epoch_start``). Sec. 3.1: features and
softmax outputs of the frozen source model on the un-augmented target images;
features get a constant 1 appended and are L2-normalised; K-means over-clusters
them (K >> C); each cluster takes its majority source prediction as label and its
purity (eq. 1, ``s_j = |{i in C_j : y_i = y_j}| / |C_j|``) as score; per class,
``selection=samples`` (default, the reference code's ``topk``) keeps the top
``ceil(q n_c)`` members, ``selection=clusters`` (the paper's text) keeps the clusters
at or above the Q-th percentile of the class's cluster purities. All of it is
:func:`sourcefree.ops.pseudo_labels.cluster_pseudo_labels` (``score=confidence`` is the
Table 4 ablation). Selected indices and labels are method state (checkpointed). The
pass's features go into a host :class:`~sourcefree.engine.feature_bank.FeatureBank`
sized by ``--memory-budget``: float32 within it (the path above, unchanged); above it
float16 or a spill file, clustered a chunk at a time
(:func:`sourcefree.ops.pseudo_labels.cluster_pseudo_labels_chunked`).

``warm-up-frozen`` + ``warm-up`` (Sec. 3.2, eq. 2-3): self-supervised training of the
target backbone on all target images. ``ssl.method=swav``: lightly's
``SwaVProjectionHead`` and ``SwaVPrototypes`` (normalised every step, frozen during the
first ``ssl.freeze_prototypes_epochs`` epochs through the module's ``step`` argument,
which is why those epochs are a phase of their own: the prototypes are not trained
there), a lightly ``MemoryBankModule`` queue per high-resolution crop when batches are
small, and the swapped-prediction loss through :func:`sourcefree.kernels.swav_loss`
(log-domain Sinkhorn in fp32: lightly's ``SwaVLoss`` semantics, no fp16 overflow).
``ssl.method=deepclusterv2``: a memory bank of the high-resolution crops' embeddings;
at each epoch start spherical K-means (``sourcefree.ops.clustering.kmeans`` on
L2-normalised embeddings) per head, prototypes set to the normalised centroids and
frozen, and cross-entropy of ``z . c / T`` against the assignments for every crop. The
assignments (:func:`nearest_prototypes`) are computed a block of rows at a time, sized
by ``--memory-budget`` (at most :data:`DC_BLOCK_ROWS` rows), never all N x P scores.
Multi-crop views are batched tensor ops (random resized crop + flip by one
``grid_sample``, colour jitter, grey-scale), sized from the package's input spec.
``ssl.checkpoint``: the backbone starts from a safetensors file of its state dict (an
SSL run done elsewhere, as the reference ships SwAV checkpoints), verified like package
weights (:func:`load_backbone_checkpoint`); only its sha256 reaches the report.

``fine-tune`` (Sec. 3.3, eq. 4): the warmed backbone with a new linear head,
cross-entropy on the selected subset only (via :func:`sourcefree.kernels.margin_ce_im`
without margins or IM terms, the shared CE path; label smoothing eps gives the target
``(1 - eps) onehot + eps / C``; mixup with ``lambda ~ Beta(a, a)`` and a batch
permutation ``j`` trains on ``lambda x_i + (1 - lambda) x_j`` against
``lambda t_i + (1 - lambda) t_j``, :func:`mixup_draw`), SGD + Nesterov with a cosine
schedule, augmentations of the reference code (horizontal flip, RandomAffine(35 deg,
translate 0.15), colour jitter 0.5-1.5 and hue +-0.5) as batched tensor ops. The
trainer iterates over all N target images per epoch; the step maps each drawn index
``i`` to the selected sample ``sel[i mod M]``, so one trainer epoch is about N / M
passes over the subset (balanced, resume-safe); ``finetune.epochs`` counts subset passes.

``bn-stats`` (not in the paper, ``recalibrate``): BatchNorm running statistics
re-estimated on all un-augmented target images, since the exported model runs in
eval mode and the fine-tune statistics come from augmented subset batches.

See docs/methods.md for what follows the paper and what differs (CPU-sized defaults).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from sourcefree.engine.feature_bank import MIN_PRODUCT_ROWS, FeatureBank, MemoryBudget, block_rows
from sourcefree.engine.method import (
    JSON,
    Batch,
    EpochInfo,
    Method,
    MethodContext,
    OptimizerSpec,
    ParamGroup,
    Phase,
    ScheduleSpec,
    StepOutput,
    batchnorm_layers,
)
from sourcefree.engine.models import Classifier, build_classifier, resolve_architecture
from sourcefree.engine.registry import register_method
from sourcefree.errors import ConfigError, IntegrityError, PackageError, TrainingError
from sourcefree.ops.augment import (
    affine_sample,
    color_jitter,
    from_unit,
    random_view,
    to_unit,
    uniform,
)
from sourcefree.ops.clustering import KMeansConfig, kmeans
from sourcefree.ops.pseudo_labels import (
    ClusterPseudoLabelConfig,
    PseudoLabelSelection,
    cluster_pseudo_labels,
    cluster_pseudo_labels_chunked,
    default_n_clusters,
)
from sourcefree.package.manifest import InputSpec

__all__ = [
    "CluP",
    "CluPConfig",
    "FineTuneConfig",
    "SSLConfig",
    "finetune_augment",
    "load_backbone_checkpoint",
    "mixup_draw",
    "multi_crop",
    "nearest_prototypes",
]

#: Most rows whose DeepClusterV2 scores (rows x P float32) exist at once.
DC_BLOCK_ROWS = 4096

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _bad(what: str, why: str, fix: str) -> ConfigError:
    return ConfigError(what, why, fix)


@dataclass(frozen=True)
class SSLConfig:
    """Self-supervised warm-up of the target backbone (paper Sec. 3.2, solo-learn defaults).

    Paper: 1000 epochs (SwAV, 5000 prototypes); CPU default: 8 epochs (see docs/methods.md).
    """

    method: Literal["swav", "deepclusterv2"] = "swav"
    """Warm-up: SwAV (paper's main result) or DeepClusterV2 (Table 1, second row)."""
    init: Literal["source", "scratch"] = "source"
    """Backbone start: the source weights, or random (the paper's SSL starts from scratch)."""
    epochs: int = 8
    """Warm-up epochs (paper 1000 on GPUs; 0 skips it: Table 4's 'Source' backbone)."""
    batch_size: int = 128
    """Images per step (solo-learn 256); each image gives every crop."""
    lr: float = 0.05
    """SGD learning rate (solo-learn uses LARS at 0.6 for batch 256; plain SGD needs less)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-6
    """Weight decay (solo-learn SwAV 1e-6)."""
    prototypes: int | None = None
    """Prototypes per head; None: min(3000, max(10 C, N // 10)) (paper 5000, FB default 3000)."""
    freeze_prototypes_epochs: int = 1
    """Epochs with frozen SwAV prototypes (lightly example 1; solo-learn 2; FB 313 iterations)."""
    temperature: float = 0.1
    """Softmax temperature of the predictions (SwAV and DeepClusterV2: 0.1)."""
    epsilon: float = 0.05
    """Sinkhorn entropic regularisation (SwAV 0.05)."""
    sinkhorn_iterations: int = 3
    """Sinkhorn iterations (SwAV 3)."""
    queue_length: int | None = None
    """SwAV queue rows per global crop; None: 0 if batch >= 256, else min(3840, N // 2)."""
    queue_start_epoch: int = 2
    """First epoch whose codes use the queue (lightly example 2; FB 15 of 800)."""
    hidden_dim: int = 2048
    """Projection head hidden width (reference loader: 512 -> 2048 -> 128)."""
    output_dim: int = 128
    """Projection head output width (SwAV 128)."""
    global_crops: int = 2
    """High-resolution crops at the input size (SwAV 2)."""
    local_crops: int = 4
    """Low-resolution crops (SwAV 6 of 96 px at 224 px; 4 costs ~1 more image on CPU)."""
    local_size_ratio: float = 0.5
    """Local crop side / input side (SwAV 96/224 = 0.43; 16 px at 32 px: 2x2 after 3 pools)."""
    global_scale: tuple[float, float] = (0.25, 1.0)
    """Area range of high-resolution crops (SwAV 0.14-1; higher floor for 32 px faces)."""
    local_scale: tuple[float, float] = (0.08, 0.25)
    """Area range of low-resolution crops (SwAV 0.05-0.14)."""
    color_jitter: float = 0.8
    """Jitter strength s: brightness/contrast/saturation 0.8 s, hue 0.2 s, p 0.8 (SwAV s = 1)."""
    grayscale_prob: float = 0.2
    """Probability of a grey-scale view (SwAV 0.2)."""
    heads: int = 3
    """DeepClusterV2 prototype heads (FB 3 x 3000)."""
    kmeans_iterations: int = 10
    """DeepClusterV2 K-means iterations per epoch (FB 10)."""
    checkpoint: str | None = field(default=None, metadata={"private": True})
    """Safetensors file of the backbone's state dict to start from (replaces init); private."""
    checkpoint_sha256: str | None = None
    """Expected sha256 (64 lowercase hex) of ssl.checkpoint; refused when it differs."""

    def __post_init__(self) -> None:
        if self.method not in ("swav", "deepclusterv2"):
            raise _bad(
                f"ssl.method={self.method!r}", "unknown warm-up", "use swav or deepclusterv2"
            )
        if self.init not in ("source", "scratch"):
            raise _bad(f"ssl.init={self.init!r}", "unknown init", "use source or scratch")
        ints = {
            "epochs": (self.epochs, 0),
            "batch_size": (self.batch_size, 2),
            "freeze_prototypes_epochs": (self.freeze_prototypes_epochs, 0),
            "sinkhorn_iterations": (self.sinkhorn_iterations, 1),
            "queue_start_epoch": (self.queue_start_epoch, 0),
            "hidden_dim": (self.hidden_dim, 1),
            "output_dim": (self.output_dim, 1),
            "global_crops": (self.global_crops, 2),
            "local_crops": (self.local_crops, 0),
            "heads": (self.heads, 1),
            "kmeans_iterations": (self.kmeans_iterations, 1),
        }
        for name, (value, lo) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise _bad(f"ssl.{name}={value!r}", f"it must be an integer >= {lo}", "fix it")
        for name, opt in (("prototypes", self.prototypes), ("queue_length", self.queue_length)):
            if opt is not None and (isinstance(opt, bool) or not isinstance(opt, int) or opt < 0):
                raise _bad(f"ssl.{name}={opt!r}", "it must be a non-negative int or None", "fix it")
        if self.prototypes == 0:
            raise _bad("ssl.prototypes=0", "SwAV needs at least one prototype", "use None or > 0")
        pos: dict[str, float] = {
            "lr": self.lr,
            "temperature": self.temperature,
            "epsilon": self.epsilon,
            "local_size_ratio": self.local_size_ratio,
        }
        for name, v in pos.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise _bad(f"ssl.{name}={v!r}", "it must be a positive number", "fix it")
        if not 0 < self.local_size_ratio <= 1:
            raise _bad(f"ssl.local_size_ratio={self.local_size_ratio}", "in (0, 1]", "fix it")
        for name, (low, high) in (
            ("global_scale", self.global_scale),
            ("local_scale", self.local_scale),
        ):
            if not 0 < low <= high <= 1:
                raise _bad(f"ssl.{name}=({low}, {high})", "need 0 < low <= high <= 1", "fix it")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise _bad("ssl momentum/weight_decay", "momentum in [0, 1), decay >= 0", "fix it")
        if not 0 <= self.color_jitter <= 1 or not 0 <= self.grayscale_prob <= 1:
            raise _bad("ssl color_jitter/grayscale_prob", "both in [0, 1]", "fix them")
        self._check_checkpoint()

    def _check_checkpoint(self) -> None:
        path, digest = self.checkpoint, self.checkpoint_sha256
        if digest is not None and (not isinstance(digest, str) or not _SHA256.fullmatch(digest)):
            raise _bad(
                "ssl.checkpoint_sha256 is not a sha256",
                "it must be 64 lowercase hexadecimal characters",
                "pass the output of `sha256sum CHECKPOINT`",
            )
        if path is None:
            if digest is not None:
                raise _bad(
                    "ssl.checkpoint_sha256 is set without ssl.checkpoint",
                    "there is no checkpoint to compare it with",
                    "set ssl.checkpoint=PATH too, or drop the sha256",
                )
            return
        if not isinstance(path, str) or not path or "\x00" in path:
            raise _bad("ssl.checkpoint is not a file path", "it must be a non-empty path", "fix it")
        if not Path(path).is_file():
            raise _bad(
                f"ssl.checkpoint {Path(path).name!r} is not a readable file",
                "the SSL warm-up starts from that file",
                "check the path, or unset ssl.checkpoint",
            )


@dataclass(frozen=True)
class FineTuneConfig:
    """Fine-tune of backbone + new head on the selected subset (paper Sec. 3.3, eq. 4)."""

    epochs: int = 50
    """Passes over the selected subset (paper and reference code: 50)."""
    lr: float = 0.05
    """SGD learning rate (reference code 0.1 at batch 32)."""
    momentum: float = 0.9
    """SGD momentum (reference 0.9)."""
    nesterov: bool = True
    """Nesterov momentum (reference: yes)."""
    weight_decay: float = 5e-4
    """Weight decay (reference 5e-4)."""
    augment: bool = True
    """Reference-code augmentations: flip, RandomAffine(35 deg, 0.15), colour jitter."""
    degrees: float = 35.0
    """RandomAffine rotation range in degrees (reference 35)."""
    translate: float = 0.15
    """RandomAffine translation as a fraction of the side (reference 0.15)."""
    jitter: float = 0.5
    """Brightness, contrast and saturation factors in [1 - j, 1 + j] (reference 0.5)."""
    hue: float = 0.5
    """Hue shift in [-h, h] turns (reference 0.5)."""
    mixup_alpha: float = 0.2
    """Mixup Beta(alpha, alpha) per batch, 0 disables (reference code 0.2; not in the paper)."""
    label_smoothing: float = 0.1
    """CE label smoothing (not in the reference: bounds logits on a small subset)."""

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise _bad(f"finetune.epochs={self.epochs!r}", "an integer >= 1", "fix it")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise _bad("finetune lr/momentum/weight_decay", "lr > 0, momentum in [0, 1)", "fix")
        if not (0 <= self.jitter < 1 and 0 <= self.hue <= 0.5 and 0 <= self.translate <= 1):
            raise _bad("finetune jitter/hue/translate", "jitter in [0,1), hue <= 0.5", "fix")
        if not (self.mixup_alpha >= 0 and 0 <= self.label_smoothing < 1):
            raise _bad(
                "finetune mixup_alpha/label_smoothing", "alpha >= 0, smoothing in [0,1)", "fix"
            )


@dataclass(frozen=True)
class CluPConfig:
    """CluP settings: paper values where they fit a CPU, CPU-sized otherwise (docs/methods.md)."""

    n_clusters: int | None = None
    """K-means K; None: min(max(N // 30, 10 C), 1000, N // 5) (paper 250/1000)."""
    keep_fraction: float = 0.3
    """q = 1 - Q, fraction of each class kept (paper Q = 0.9/0.9/0.7/0.8, i.e. q 0.1-0.3)."""
    score: Literal["purity", "confidence"] = "purity"
    """Ranking score: cluster purity (eq. 1) or source confidence (Table 4 ablation)."""
    selection: Literal["samples", "clusters"] = "samples"
    """Keep the top ceil(q n_c) samples per class (reference) or whole clusters (paper)."""
    labeler: Literal["adabn", "source"] = "adabn"
    """Labelling model: source with target BN statistics (adabn) or as shipped (source, paper)."""
    kmeans_n_init: int = 10
    """K-means restarts for the pseudo-labels (sklearn 1.1.2 as in the reference: 10)."""
    kmeans_max_iter: int = 300
    """K-means iterations at most (sklearn 1.1.2: 300)."""
    label_batch_size: int = 256
    """Images per forward pass of the source model when labelling (no effect on results)."""
    batch_size: int = 64
    """Fine-tune images per step (reference code 32)."""
    recalibrate: bool = True
    """Re-estimate BN statistics on all target images after fine-tuning (not in the paper)."""
    ssl: SSLConfig = field(default_factory=SSLConfig)
    """Self-supervised warm-up (Sec. 3.2)."""
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    """Fine-tune on the selected subset (Sec. 3.3)."""

    def __post_init__(self) -> None:
        # Reuse the pseudo-label module's validation of K, q and score.
        self.pseudo_label_config()
        if self.labeler not in ("adabn", "source"):
            raise _bad(f"labeler={self.labeler!r}", "unknown labeler", "use adabn or source")
        for name, v, lo in (
            ("kmeans_n_init", self.kmeans_n_init, 1),
            ("kmeans_max_iter", self.kmeans_max_iter, 1),
            ("label_batch_size", self.label_batch_size, 1),
            ("batch_size", self.batch_size, 2),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise _bad(f"{name}={v!r}", f"it must be an integer >= {lo}", "fix it")
        if not isinstance(self.ssl, SSLConfig) or not isinstance(self.finetune, FineTuneConfig):
            raise _bad("ssl/finetune sections", "wrong types", "pass SSLConfig/FineTuneConfig")

    def pseudo_label_config(self, seed: int = 0) -> ClusterPseudoLabelConfig:
        """The :mod:`sourcefree.ops.pseudo_labels` settings of this config."""
        return ClusterPseudoLabelConfig(
            n_clusters=self.n_clusters,
            keep_fraction=self.keep_fraction,
            score=self.score,
            kmeans=KMeansConfig(
                n_init=self.kmeans_n_init, max_iter=self.kmeans_max_iter, seed=seed
            ),
            selection=self.selection,
        )


# --- batched tensor augmentations ----------------------------------------------------------


def _check_local_crops(backbone: nn.Module, ssl: SSLConfig, spec: InputSpec) -> None:
    """Refuse local crops a fixed-input-size model cannot take (a ViT built with img_size).

    One forward of a blank local crop in eval mode (no statistics change, no draw).
    """
    if ssl.local_crops == 0:
        return
    side = max(8, round(spec.size[0] * ssl.local_size_ratio))
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, spec.channels, side, side))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ConfigError(
            f"clup's local crops ({side}x{side} px) do not fit this model",
            f"it takes a fixed input size ({type(exc).__name__}: {str(exc)[:80]})",
            "set ssl.local_crops=0 (global crops only, at the input size)",
        ) from None
    finally:
        backbone.train(was_training)


def multi_crop(
    x: torch.Tensor,
    gen: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: SSLConfig,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SwAV multi-crop views of normalised images ``x`` as batched tensor ops.

    Each crop: random resized crop + horizontal flip (one ``grid_sample``), colour
    jitter with probability 0.8, grey-scale with ``cfg.grayscale_prob``; global crops at
    the input side, local crops at ``round(side * local_size_ratio)``. Gaussian blur
    (PIL in lightly/SwAV) is left out: 32 px faces are already low-pass.

    Returns:
        (high-resolution crops, low-resolution crops), each a list of normalised tensors.
    """
    side = int(x.shape[-1])
    local_side = max(8, round(side * cfg.local_size_ratio))
    unit = to_unit(x, mean, std)

    def view(size: int, scale: tuple[float, float]) -> torch.Tensor:
        s = cfg.color_jitter
        v = random_view(unit, gen, size, scale, 0.8 * s, 0.2 * s, 0.8, cfg.grayscale_prob)
        return from_unit(v, mean, std)

    high = [view(side, cfg.global_scale) for _ in range(cfg.global_crops)]
    low = [view(local_side, cfg.local_scale) for _ in range(cfg.local_crops)]
    return high, low


def finetune_augment(
    x: torch.Tensor,
    gen: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: FineTuneConfig,
) -> torch.Tensor:
    """The reference code's training augmentations as batched tensor ops.

    HorizontalFlip(0.5), RandomAffine(degrees, translate) with black fill, then
    ColorJitter(brightness = contrast = saturation = jitter, hue) in fixed order.
    """
    n, side = x.shape[0], int(x.shape[-1])
    unit = to_unit(x, mean, std)
    angle = uniform(n, -cfg.degrees, cfg.degrees, gen) * math.pi / 180
    tx = uniform(n, -cfg.translate, cfg.translate, gen) * 2
    ty = uniform(n, -cfg.translate, cfg.translate, gen) * 2
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 0, 2] = tx
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 1, 2] = ty
    v = affine_sample(unit, theta, side)
    v = color_jitter(v, gen, cfg.jitter, cfg.hue)
    return from_unit(v, mean, std)


def mixup_draw(n: int, alpha: float, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    """Mixup's random draws for one batch of ``n``: ``lambda ~ Beta(alpha, alpha)`` and a
    permutation of the batch, both from the step's generator (resume-safe).

    Beta comes from numpy (torch has no generator-seeded Beta sampler), seeded by one
    draw of ``gen``. ``alpha = 0`` is no mixup: ``(1.0, identity)``.
    """
    if alpha <= 0:
        return 1.0, torch.arange(n)
    import numpy as np

    rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=gen)))
    lam = float(rng.beta(alpha, alpha))
    return lam, torch.randperm(n, generator=gen)


# --- external SSL checkpoint -----------------------------------------------------------------

_CHECKPOINT_FIX = (
    "save the backbone with safetensors.torch.save_file(model.backbone.state_dict(), PATH)"
)


def _read_checkpoint(path: str, limit: int) -> bytes:
    """The checkpoint's bytes, refusing a missing file or one larger than ``limit``."""
    p = Path(path)
    try:
        size = os.stat(p).st_size
        if size > limit:
            raise PackageError(
                f"ssl.checkpoint {p.name!r} has {size} bytes",
                f"a safetensors file of this backbone holds at most {limit} bytes",
                _CHECKPOINT_FIX,
            )
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read ssl.checkpoint {p.name!r}",
            exc.strerror or str(exc),
            "check the path, or unset ssl.checkpoint",
        ) from None


def load_backbone_checkpoint(backbone: nn.Module, path: str, sha256: str | None = None) -> str:
    """Load a safetensors state dict into ``backbone`` after verifying it; return its sha256.

    The file is read like package weights: a size bound (header limit + the backbone's
    own tensor bytes), then :func:`sourcefree.package.weights.read_header` (pickles and
    zips refused by magic bytes, header size bounded, offsets checked) and the
    safetensors reader (never ``torch.load``). Every tensor name, shape and dtype must
    equal the backbone's ``state_dict()`` exactly and float values must be finite.
    ``sha256``: when given, the file's digest must equal it.

    Raises:
        ConfigError: the file cannot be read.
        IntegrityError: its sha256 differs from ``sha256``.
        PackageError: not safetensors, missing/extra tensors, wrong shape or dtype,
            NaN/Inf values.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from sourcefree.package.weights import MAX_HEADER_BYTES, read_header

    expected = backbone.state_dict()
    limit = 8 + MAX_HEADER_BYTES + sum(t.numel() * t.element_size() for t in expected.values())
    data = _read_checkpoint(path, limit)
    name = Path(path).name
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and not hmac.compare_digest(digest, sha256):
        raise IntegrityError(
            f"ssl.checkpoint {name!r} has sha256 {digest[:12]}...",
            f"the expected ssl.checkpoint_sha256 is {sha256[:12]}...",
            "pass the checkpoint you meant, or correct ssl.checkpoint_sha256",
        )
    try:
        read_header(data, name=f"ssl.checkpoint {name!r}")
        state = load_safetensors(data)
    except (PackageError, SafetensorError) as exc:
        why = exc.why if isinstance(exc, PackageError) else str(exc)
        raise PackageError(
            f"ssl.checkpoint {name!r} is not a usable safetensors file", why, _CHECKPOINT_FIX
        ) from None
    _check_checkpoint_state(state, expected, name)
    backbone.load_state_dict(state, strict=True)
    return digest


def _check_checkpoint_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], name: str
) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise PackageError(
            f"ssl.checkpoint {name!r} does not match the backbone ({len(missing)} missing, "
            f"{len(extra)} unexpected tensors; {first})",
            "the tensor names must be exactly those of the backbone's state_dict()",
            _CHECKPOINT_FIX,
        )
    for key, ref in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            raise PackageError(
                f"ssl.checkpoint {name!r} tensor {key!r} is {t.dtype} {list(t.shape)}",
                f"the backbone's is {ref.dtype} {list(ref.shape)}",
                "save the checkpoint from this architecture (same input channels and "
                "options) without casting it",
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PackageError(
                f"ssl.checkpoint {name!r} tensor {key!r} contains NaN or Inf",
                "a backbone with non-finite weights predicts garbage",
                "use a checkpoint from a run that did not diverge",
            )


# --- the method ------------------------------------------------------------------------------


def _bank_buffers(bank: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """lightly MemoryBankModule's rows and pointer (non-persistent buffers: saved as state)."""
    rows, ptr = bank.bank, bank.bank_ptr
    if not isinstance(rows, torch.Tensor) or not isinstance(ptr, torch.Tensor):
        raise TrainingError("queue buffers are missing", "lightly changed", "report a bug")
    return rows, ptr


def _merge_batch_averages(bns: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
    """Merge per-rank cumulative BatchNorm averages (``momentum=None``) into the global one.

    Each rank averaged its own batches; weighting by ``num_batches_tracked`` gives the
    average over every batch, as one process computes it. No-op for one process.
    """
    from sourcefree.engine import distributed as dist

    if not dist.is_distributed():
        return
    for bn in bns:
        mean, var, count = bn.running_mean, bn.running_var, bn.num_batches_tracked
        if mean is None or var is None or count is None:
            continue
        weight = count.to(mean.dtype)
        total = dist.all_reduce_sum(count.clone()).to(mean.dtype).clamp_min(1)
        mean.copy_(dist.all_reduce_sum(mean * weight) / total)
        var.copy_(dist.all_reduce_sum(var * weight) / total)
        count.copy_(total.to(count.dtype))


def nearest_prototypes(z: torch.Tensor, prototypes: torch.Tensor, rows: int) -> torch.Tensor:
    """``argmax_j z_i . p_j`` per row (int64 (N,); the first on ties), in blocks of rows.

    Only ``b x P`` scores exist at once, ``b = min(N, max(rows, 16))``. Every product
    has ``b`` rows (the last block overlaps the one before): BLAS may round a product
    of a few rows differently, and with this, the scores were bitwise those of one
    ``z @ prototypes.T`` on the CPU BLAS tested (tests/adapters/test_clup.py).
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"rows={rows!r}", "a block has at least 1 row", "pass rows >= 1")
    n = int(z.shape[0])
    out = torch.zeros(n, dtype=torch.int64, device=z.device)
    b = min(n, max(rows, MIN_PRODUCT_ROWS))
    for start in range(0, n, max(b, 1)):
        s = min(start, n - b)
        out[s : s + b] = (z[s : s + b] @ prototypes.T).argmax(dim=1)
    return out


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else v


def _derive(seed: int, tag: int) -> int:
    return (seed * 1_000_003 + tag * 7919) % (2**31 - 1)


@register_method("clup")
class CluP(Method):
    """Cluster-level pseudo-labels, SSL warm-up on the target, fine-tune on the selected subset."""

    description = (
        "CluP: purity-selected cluster pseudo-labels, SwAV/DeepClusterV2 warm-up, "
        "fine-tune (Conti et al. 2022)"
    )
    config_class = CluPConfig
    config: CluPConfig
    #: ``--select auto``: K (default: about 30 images per cluster; 250: the paper's
    #: smaller K) x the kept fraction q = 1 - Q (0.1: the paper's Q = 0.9; 0.3: ours).
    #: Candidates with more clusters than images fail and are reported.
    selection_grid = tuple(
        {"n_clusters": k, "keep_fraction": q} for k in (None, 250) for q in (0.1, 0.3)
    )
    relative_cost = 15.0  # SSL warm-up + fine-tune: the slowest method on a CPU

    def __init__(self, config: CluPConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
        from lightly.models.modules.memory_bank import MemoryBankModule

        ssl = config.ssl
        self.source = context.sources[0].model.eval()
        for p in self.source.parameters():
            p.requires_grad_(False)
        arch = context.sources[0].package.manifest.architecture
        n, c = len(context.data), context.num_classes
        spec = context.data.spec
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        dev = context.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derive(context.seed, 1))
            # The manifest's architecture record (a timm model keeps its options).
            built = resolve_architecture(arch)
            backbone = build_classifier(built, arch.num_classes, arch.in_channels).backbone
            #: sha256 of ``ssl.checkpoint`` (the path itself is never recorded).
            self.checkpoint_sha256: str | None = None
            if ssl.checkpoint is not None:
                self.checkpoint_sha256 = load_backbone_checkpoint(
                    backbone, ssl.checkpoint, ssl.checkpoint_sha256
                )
            elif ssl.init != "scratch":
                backbone.load_state_dict(self.source.backbone.state_dict())
            _check_local_crops(backbone, ssl, spec)
            head = nn.Linear(arch.feature_dim, c)
            self.model = Classifier(backbone, head).to(dev)
            self.projector: nn.Module = SwaVProjectionHead(
                arch.feature_dim, ssl.hidden_dim, ssl.output_dim
            ).to(dev)
            self.n_prototypes = (
                ssl.prototypes if ssl.prototypes is not None else min(3000, max(10 * c, n // 10))
            )
            if ssl.method == "swav":
                self.prototypes: nn.Module = SwaVPrototypes(
                    ssl.output_dim, self.n_prototypes, ssl.freeze_prototypes_epochs
                ).to(dev)
            else:
                if self.n_prototypes > n:
                    raise ConfigError(
                        f"ssl.prototypes={self.n_prototypes} exceeds the {n} target images",
                        "DeepClusterV2 clusters the images into that many groups",
                        "lower ssl.prototypes",
                    )
                heads = [
                    nn.Linear(ssl.output_dim, self.n_prototypes, bias=False)
                    for _ in range(ssl.heads)
                ]
                self.prototypes = nn.ModuleList(heads).to(dev)
                for p in self.prototypes.parameters():
                    p.requires_grad_(False)
            self.queue_length = self._queue_length(n)
            # Under torchrun each rank queues its own slices: queue_length / world rows
            # (SwAV's split); Sinkhorn then runs over every rank's batch and queue.
            from sourcefree.engine import distributed as dist

            rows = self.queue_length // dist.world_size()
            self.banks = nn.ModuleList(
                [
                    MemoryBankModule((rows, ssl.output_dim), feature_dim_first=False)
                    for _ in range(ssl.global_crops if rows > 0 else 0)
                ]
            ).to(dev)
        # Method state (checkpointed through state_tensors).
        self.selected_indices = torch.empty(0, dtype=torch.int64)
        self.selected_labels = torch.empty(0, dtype=torch.int64)
        self.selection_meta: dict[str, JSON] = {}
        self.dc_bank = torch.empty(0)
        self.dc_assignments = torch.empty(0, dtype=torch.int64)
        self.memory = MemoryBudget() if context.memory is None else context.memory

    # --- sizes --------------------------------------------------------------------------------

    def _queue_length(self, n: int) -> int:
        ssl = self.config.ssl
        if ssl.method != "swav":
            return 0
        if ssl.queue_length is not None:
            return ssl.queue_length
        if ssl.batch_size >= 256:
            return 0
        rows = min(3840, n // 2)
        return (rows // ssl.batch_size) * ssl.batch_size

    def _steps_per_epoch(self, batch_size: int) -> int:
        n = len(self.context.data)
        return 1 if n <= batch_size else n // batch_size

    def _finetune_trainer_epochs(self) -> int:
        # One trainer epoch draws N images from the subset of ~q N (+ up to C) samples.
        n, c = len(self.context.data), self.context.num_classes
        expected_m = min(n, math.ceil(self.config.keep_fraction * n) + c)
        return max(1, round(self.config.finetune.epochs * expected_m / max(1, n)))

    # --- pseudo-labels (Sec. 3.1) ---------------------------------------------------------------

    @torch.no_grad()
    def _labeler(self) -> nn.Module:
        """The frozen source model, or a copy with BatchNorm statistics of the target (AdaBN)."""
        if self.config.labeler == "source" or not batchnorm_layers(self.source):
            return self.source.eval()
        import copy

        model = copy.deepcopy(self.source).eval()
        bns = batchnorm_layers(model)
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # exact average over the batches
            bn.train()
        dev = self.context.device
        bs = self.config.label_batch_size
        for start, x in self._label_batches():
            if x.shape[0] < 2 or (start > 0 and x.shape[0] < bs // 2):
                continue  # a tiny last batch would skew the average
            model(x.to(dev))
        if self._sharded_labelling():
            _merge_batch_averages(bns)
        return model.eval()

    def _sharded_labelling(self) -> bool:
        """Under torchrun, whether every rank gets at least one labelling batch to shard."""
        from sourcefree.engine import distributed as dist

        batches = math.ceil(len(self.context.data) / self.config.label_batch_size)
        return dist.is_distributed() and batches >= dist.world_size()

    def _label_rows(self) -> tuple[int, int]:
        """(first, stop): the images of this rank's labelling batches (all with one process).

        One process: every batch of ``label_batch_size`` in dataset order. Under
        torchrun each rank takes a contiguous run of those same batches, so its rows
        are a contiguous shard in rank order and every image sits in the same batch
        as with one process (with fewer batches than ranks every rank takes all).
        """
        from sourcefree.engine import distributed as dist

        n = len(self.context.data)
        bs = self.config.label_batch_size
        first, last = 0, math.ceil(n / bs)
        if self._sharded_labelling():
            first, last = dist.shard_range(last)
        return first * bs, min(n, last * bs)

    def _label_batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, images) of this rank's labelling batches: whole batches, in rank order."""
        first, stop = self._label_rows()
        bs = self.config.label_batch_size
        for start in range(first, stop, bs):
            yield start, self.context.data.tensor(slice(start, min(stop, start + bs)))

    @torch.no_grad()
    def _source_outputs(self) -> tuple[FeatureBank | torch.Tensor, torch.Tensor]:
        """Features and softmax of this rank's shard (every image with one process).

        The features go batch by batch into a host feature bank sized by the run's
        memory budget (float32 within it: the same rows as a tensor); the caller
        closes it. :meth:`_cluster` also takes the features as a tensor.
        """
        labeler = self._labeler()
        first, stop = self._label_rows()
        probs = []
        dev = self.context.device
        bank: FeatureBank | None = None
        try:
            for start, x in self._label_batches():
                logits, f = labeler(x.to(dev))
                probs.append(torch.softmax(logits.float(), dim=1).cpu())
                if bank is None:
                    bank = self.memory.bank(max(0, stop - first), int(f.shape[1]), device="cpu")
                bank.write(start - first, f)
        except BaseException:
            if bank is not None:
                bank.close()
            raise
        if bank is None:
            bank = self.memory.bank(0, 0, device="cpu")
        p = torch.cat(probs) if probs else torch.zeros((0, self.context.num_classes))
        return bank, p

    def compute_pseudo_labels(self) -> PseudoLabelSelection:
        """Run Sec. 3.1 on the whole target set and store the selection in the method state.

        Under torchrun the ranks label their shards and cluster them together
        (``cluster_pseudo_labels(distributed=True)``); every rank gets the same selection.
        Features in a float32 bank take :func:`cluster_pseudo_labels` as they are; a
        float16 or disk bank (over the memory budget) is read a chunk at a time by
        :func:`cluster_pseudo_labels_chunked`.
        """
        feats, probs = self._source_outputs()
        sel = self._cluster(feats, probs)
        self.selected_indices = sel.indices.cpu()
        self.selected_labels = sel.labels.cpu()
        d = sel.diagnostics
        self.selection_meta = {
            "score": d.score,
            "selection": d.selection,
            "clusters_kept": d.clusters_kept,
            "keep_fraction": d.keep_fraction,
            "n_samples": d.n_samples,
            "n_selected": d.n_selected,
            "n_clusters": d.n_clusters,
            "n_empty_clusters": d.n_empty_clusters,
            "clusters_per_class": list(d.clusters_per_class),
            "candidates_per_class": list(sel.candidates_per_class),
            "selected_per_class": list(sel.selected_per_class),
            "thresholds": list(sel.thresholds),
            "empty_classes": list(sel.empty_classes),
            "mean_cluster_purity": None
            if math.isnan(d.mean_cluster_purity)
            else d.mean_cluster_purity,
            "selected_agreement": None
            if math.isnan(d.selected_agreement)
            else d.selected_agreement,
            "kmeans_converged": d.kmeans_converged,
            "histogram": {
                "kind": sel.histogram.kind,
                "bin_edges": list(sel.histogram.bin_edges),
                "sample_counts": list(sel.histogram.sample_counts),
                "cluster_counts": None
                if sel.histogram.cluster_counts is None
                else list(sel.histogram.cluster_counts),
            },
        }
        return sel

    def _cluster(
        self, feats: FeatureBank | torch.Tensor, probs: torch.Tensor
    ) -> PseudoLabelSelection:
        """Sec. 3.1 on this rank's features (a bank, closed here, or a tensor) and softmax."""
        cfg = self.config.pseudo_label_config(seed=_derive(self.context.seed, 2))
        sharded = self._sharded_labelling()
        if isinstance(feats, torch.Tensor):
            return cluster_pseudo_labels(feats, probs, cfg, distributed=sharded)
        with feats:
            if feats.storage == "float32":
                return cluster_pseudo_labels(feats.tensor(), probs, cfg, distributed=sharded)
            return cluster_pseudo_labels_chunked(feats, probs, cfg, distributed=sharded)

    def _ensure_pseudo_labels(self) -> None:
        if not self.selection_meta:
            self.compute_pseudo_labels()

    def _label_epoch(self, info: EpochInfo) -> None:
        self.compute_pseudo_labels()

    def _no_step(self, batch: Batch) -> StepOutput:
        return StepOutput(loss=None)

    # --- warm-up (Sec. 3.2) -------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.projector(self.model.backbone(x))
        return nn.functional.normalize(z.float(), dim=1)

    def _crops(self, batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        dev = batch.x.device
        high, low = multi_crop(
            batch.x.cpu(), batch.generator, self._mean, self._std, self.config.ssl
        )
        return [h.to(dev) for h in high], [v.to(dev) for v in low]

    def _embed_groups(
        self, high: list[torch.Tensor], low: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Same-resolution crops share one forward (SwAV groups crops by size).
        b = high[0].shape[0]
        zh = list(torch.split(self._embed(torch.cat(high)), b))
        zl = list(torch.split(self._embed(torch.cat(low)), b)) if low else []
        return zh, zl

    def _swav_step(self, batch: Batch, epoch_offset: int) -> StepOutput:
        from sourcefree.kernels import swav_loss

        ssl = self.config.ssl
        with torch.no_grad():
            self.prototypes.normalize()  # type: ignore[operator]
        high, low = self._crops(batch)
        zh, zl = self._embed_groups(high, low)
        epoch = epoch_offset + batch.epoch
        p_high = [self.prototypes(z, epoch) for z in zh]
        p_low = [self.prototypes(z, epoch) for z in zl]
        queue: list[torch.Tensor] | None = None
        if len(self.banks) > 0:
            with torch.no_grad():
                rows = []
                for bank, z in zip(self.banks, zh, strict=True):
                    _, old = bank(z.detach(), update=True)
                    rows.append(old)
            if epoch >= ssl.queue_start_epoch:
                with torch.no_grad():
                    queue = [self.prototypes(r.to(z.device, z.dtype), epoch) for r in rows]
        loss = swav_loss(
            p_high,
            p_low,
            queue,
            temperature=ssl.temperature,
            epsilon=ssl.epsilon,
            iterations=ssl.sinkhorn_iterations,
            distributed=True,
        )
        return StepOutput(loss, {"swav": loss.detach()})

    @torch.no_grad()
    def _dc_init_bank(self) -> None:
        ssl = self.config.ssl
        self.model.eval()
        self.projector.eval()
        rows = []
        dev = self.context.device
        for _, x in self.context.data.batches(self.config.label_batch_size):
            rows.append(self._embed(x.to(dev)).cpu())
        z = torch.cat(rows)
        self.dc_bank = z.unsqueeze(0).repeat(ssl.global_crops, 1, 1).contiguous()
        self._train_mode()

    @torch.no_grad()
    def _dc_cluster(self, epoch: int) -> None:
        """Spherical K-means per head on the bank; prototypes := normalised centroids."""
        ssl = self.config.ssl
        if self.dc_bank.numel() == 0:
            self._dc_init_bank()
        assignments = []
        heads: nn.ModuleList = self.prototypes  # type: ignore[assignment]
        rows = block_rows(self.memory.budget_bytes, 4 * self.n_prototypes, DC_BLOCK_ROWS)
        for h, layer in enumerate(heads):
            z = nn.functional.normalize(self.dc_bank[h % self.dc_bank.shape[0]].float(), dim=1)
            km = kmeans(
                z,
                self.n_prototypes,
                KMeansConfig(
                    n_init=1,
                    max_iter=ssl.kmeans_iterations,
                    tol=0.0,
                    seed=_derive(self.context.seed, 1000 + 31 * epoch + h),
                ),
            )
            centroids = nn.functional.normalize(km.centroids, dim=1)
            weight = cast(torch.Tensor, layer.weight)
            weight.copy_(centroids.to(weight.device))
            assignments.append(nearest_prototypes(z, centroids, rows))
        self.dc_assignments = torch.stack(assignments).cpu()

    def _dc_epoch(self, info: EpochInfo) -> None:
        self._dc_cluster(info.epoch)

    def _dc_step(self, batch: Batch) -> StepOutput:
        ssl = self.config.ssl
        if self.dc_assignments.numel() == 0:
            self._dc_cluster(0)
        high, low = self._crops(batch)
        zh, zl = self._embed_groups(high, low)
        idx = batch.index.cpu()
        with torch.no_grad():
            # Under torchrun every rank writes the whole global batch: one replicated bank.
            from sourcefree.engine import distributed as dist

            every = dist.all_gather_cat(idx)
            for j, z in enumerate(zh):
                self.dc_bank[j, every] = dist.all_gather_cat(z.detach().cpu())
        targets = self.dc_assignments[:, idx].to(batch.x.device)
        heads: nn.ModuleList = self.prototypes  # type: ignore[assignment]
        z_all = torch.cat(zh + zl)
        n_views = len(zh) + len(zl)
        total = z_all.new_zeros(())
        for h, layer in enumerate(heads):
            logits = layer(z_all).float() / ssl.temperature
            total = total + nn.functional.cross_entropy(logits, targets[h].repeat(n_views))
        loss = total / len(heads)
        return StepOutput(loss, {"deepclusterv2": loss.detach()})

    def _train_mode(self) -> None:
        self.model.train()
        self.projector.train()

    def _ssl_params(self, with_prototypes: bool) -> list[ParamGroup]:
        params = list(self.model.backbone.parameters()) + list(self.projector.parameters())
        if with_prototypes:
            params += list(self.prototypes.parameters())
        return [ParamGroup(params)]

    # --- fine-tune (Sec. 3.3, eq. 4) ---------------------------------------------------------

    def _ft_enter(self) -> None:
        self._ensure_pseudo_labels()
        if self.selected_indices.numel() == 0:
            raise TrainingError(
                "no target sample was selected for fine-tuning",
                "the pseudo-label phase kept nothing",
                "raise keep_fraction or use score=confidence",
            )
        self.model.train()

    def _ft_end(self) -> None:
        self.model.eval()

    def _ft_step(self, batch: Batch) -> StepOutput:
        from sourcefree.kernels import margin_ce_im

        self._ensure_pseudo_labels()
        m = int(self.selected_indices.numel())
        pos = batch.index.cpu() % m
        idx = self.selected_indices[pos]
        dev = batch.x.device
        x = self.context.data.tensor(idx)
        if self.config.finetune.augment:
            x = finetune_augment(x, batch.generator, self._mean, self._std, self.config.finetune)
        target = self.selected_labels[pos].to(dev)
        ft = self.config.finetune
        lam, perm = mixup_draw(x.shape[0], ft.mixup_alpha, batch.generator)
        if lam < 1.0:
            x = lam * x + (1 - lam) * x[perm]
        logits, _ = self.model(x.to(dev))
        perm = perm.to(dev)
        smooth = ft.label_smoothing
        # CE is linear in the target: this is CE against lam t_i + (1 - lam) t_perm(i).
        loss = lam * margin_ce_im(logits, target, label_smoothing=smooth).ce
        if lam < 1.0:
            loss = loss + (1 - lam) * margin_ce_im(logits, target[perm], label_smoothing=smooth).ce
        acc = (logits.detach().argmax(1) == target).float().mean()
        return StepOutput(loss, {"ce": loss.detach(), "fit": acc})

    # --- declaration -----------------------------------------------------------------------------

    def phases(self) -> Sequence[Phase]:
        cfg, ssl, ft = self.config, self.config.ssl, self.config.finetune
        if cfg.labeler == "adabn" and not batchnorm_layers(self.source):
            self.note_bn_skipped("labeler=adabn")  # _labeler() falls back to the source model
        out = [
            Phase(
                name="pseudo-label",
                epochs=1,
                step=self._no_step,
                batch_size=max(cfg.label_batch_size, 2),
                on_epoch_start=self._label_epoch,
                shuffle=False,
                drop_last=False,
                amp=False,
            )
        ]
        ssl_opt = OptimizerSpec(
            name="sgd", lr=ssl.lr, momentum=ssl.momentum, weight_decay=ssl.weight_decay
        )
        if ssl.epochs > 0:
            spe = self._steps_per_epoch(ssl.batch_size)
            if ssl.method == "swav":
                frozen = min(ssl.freeze_prototypes_epochs, ssl.epochs)
                if frozen > 0:
                    out.append(
                        Phase(
                            name="warm-up-frozen",
                            epochs=frozen,
                            step=lambda b: self._swav_step(b, 0),
                            batch_size=ssl.batch_size,
                            parameters=lambda: self._ssl_params(False),
                            optimizer=ssl_opt,
                            schedule=ScheduleSpec("constant", warmup_steps=frozen * spe),
                            on_enter=self._train_mode,
                            amp=False,
                        )
                    )
                if ssl.epochs > frozen:
                    out.append(
                        Phase(
                            name="warm-up",
                            epochs=ssl.epochs - frozen,
                            step=lambda b: self._swav_step(b, frozen),
                            batch_size=ssl.batch_size,
                            parameters=lambda: self._ssl_params(True),
                            optimizer=ssl_opt,
                            schedule=ScheduleSpec("cosine", final=0.01),
                            on_enter=self._train_mode,
                            amp=False,
                        )
                    )
            else:
                out.append(
                    Phase(
                        name="warm-up",
                        epochs=ssl.epochs,
                        step=self._dc_step,
                        batch_size=ssl.batch_size,
                        parameters=lambda: self._ssl_params(False),
                        optimizer=ssl_opt,
                        schedule=ScheduleSpec("cosine", warmup_steps=spe, final=0.01),
                        on_enter=self._train_mode,
                        on_epoch_start=self._dc_epoch,
                        amp=False,
                    )
                )
        out.append(
            Phase(
                name="fine-tune",
                epochs=self._finetune_trainer_epochs(),
                step=self._ft_step,
                batch_size=cfg.batch_size,
                parameters=lambda: [ParamGroup(list(self.model.parameters()))],
                optimizer=OptimizerSpec(
                    name="sgd",
                    lr=ft.lr,
                    momentum=ft.momentum,
                    nesterov=ft.nesterov,
                    weight_decay=ft.weight_decay,
                ),
                schedule=ScheduleSpec("cosine"),
                on_enter=self._ft_enter,
                on_phase_end=self._ft_end,
            )
        )
        if cfg.recalibrate:
            out += self.bn_statistics_phases(self.model, max(2, cfg.label_batch_size))
        return out

    def modules(self) -> Mapping[str, nn.Module]:
        return {
            "model": self.model,
            "projector": self.projector,
            "prototypes": self.prototypes,
        }

    def export_model(self) -> Classifier:
        return self.model.eval()

    # --- state -------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "selected_indices": self.selected_indices,
            "selected_labels": self.selected_labels,
            "dc_bank": self.dc_bank,
            "dc_assignments": self.dc_assignments,
        }
        from sourcefree.engine import distributed as dist

        for i, bank in enumerate(self.banks):
            # Every rank's queue, in rank order (one process: its own); called on every rank.
            rows, ptr = _bank_buffers(bank)
            out[f"queue{i}"] = dist.all_gather_cat(rows.detach().cpu())
            out[f"queue{i}_ptr"] = dist.all_gather_cat(ptr.detach().cpu())
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    def state_meta(self) -> dict[str, JSON]:
        return {"selection": dict(self.selection_meta)}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, JSON]) -> None:
        self.selected_indices = tensors["selected_indices"].to(torch.int64).clone()
        self.selected_labels = tensors["selected_labels"].to(torch.int64).clone()
        self.dc_bank = tensors["dc_bank"].clone()
        self.dc_assignments = tensors["dc_assignments"].to(torch.int64).clone()
        from sourcefree.engine import distributed as dist

        with torch.no_grad():
            for i, bank in enumerate(self.banks):
                rows, ptr = _bank_buffers(bank)
                saved, ptrs = tensors[f"queue{i}"], tensors[f"queue{i}_ptr"]
                if (
                    ptrs.numel() == dist.world_size()
                    and saved.shape[0] == rows.shape[0] * ptrs.numel()
                ):
                    # Written with this many processes: each rank gets its own queue back.
                    r = dist.rank()
                    rows.copy_(saved[r * rows.shape[0] : (r + 1) * rows.shape[0]])
                    ptr.copy_(ptrs[r : r + 1])
                else:
                    # Another world size: split the saved rows evenly, restart the pointers.
                    start, stop = dist.shard_range(saved.shape[0])
                    part = saved[start:stop][: rows.shape[0]]
                    rows.zero_()[: part.shape[0]].copy_(part)
                    ptr.zero_()
        selection = meta.get("selection", {})
        self.selection_meta = dict(selection) if isinstance(selection, Mapping) else {}

    def pseudo_label_selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The selected subset of Sec. 3.1: dataset indices and their pseudo-labels."""
        if not self.selection_meta:
            return None
        return self.selected_indices.clone(), self.selected_labels.clone()

    def report(self) -> dict[str, JSON]:
        """Aggregate pseudo-label diagnostics for report.json (counts and histograms only)."""
        info: dict[str, Any] = {"pseudo_labels": dict(self.selection_meta)}
        info["ssl"] = {
            "method": self.config.ssl.method,
            "init": "checkpoint" if self.checkpoint_sha256 else self.config.ssl.init,
            "checkpoint_sha256": self.checkpoint_sha256,
            "prototypes": self.n_prototypes,
            "queue_length": self.queue_length,
        }
        if self.config.score == "purity" and self.config.n_clusters is None:
            info["pseudo_labels"]["n_clusters_rule"] = "default_n_clusters(N, C)"
            info["pseudo_labels"]["n_clusters_default"] = default_n_clusters(
                len(self.context.data), self.context.num_classes
            )
        return info
