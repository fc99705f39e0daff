"""AdaFER, source-free: action-unit-guided pseudo-labels and triplets.

[0] Wang, Gu, Peng, Zhang, Sun, Li. "AU-Guided Unsupervised Domain Adaptive Facial
Expression Recognition" (AdaFER), preprint 2020; journal version: Applied Sciences
12(9) 4366, 2022, DOI 10.3390/app12094366. Equation numbers below are the
preprint's.

The paper detects facial action units (AUs) on source and target images with a
pre-trained AU detector, then (AGA, Sec. 3.3) gives target images the labels of
source images with the same AU code (eq. 1-2) and (AGT, Sec. 3.4) trains with
cross-domain triplets whose positives share the anchor's AU code (eq. 4). On site
there is no source image; the vendor's package carries instead (docs/methods.md):

- an **AU detector** (manifest ``auxiliary.au_detector``, a plain ONNX graph run
  with onnxruntime through :class:`sourcefree.runtime.predictor.AUDetector`), run once over
  the un-augmented target images. Its outputs ``s_i`` in [0, 1] give the AU code
  ``E_i = [s_i >= threshold]`` (the package's threshold);
- **per-class AU frequencies** ``F[c][a]`` (``source_stats.au_frequencies``): the
  fraction of the vendor's class-``c`` training images with AU ``a`` active.

What stands in for the source images, exactly:

- **Retrieval by AU code.** A source image of class ``c`` has code ``E`` with
  probability ``P(E | c) = prod_a F_ca^E_a (1 - F_ca)^(1 - E_a)`` when AUs are
  independent given the class (the only joint law the per-class frequencies
  determine). Frequencies are clipped to ``[floor, 1 - floor]`` so no class is
  ruled out by one AU.
- **T-soft** (Sec. 3.3, the KL target of eq. 3). The label distribution of the
  source images retrieved by a target code ``E_t`` (eq. 2) is, in expectation,
  ``q_c ∝ N_c P(E_t | c)``: the posterior with the source class counts ``N_c``
  (``source_stats.class_counts``; uniform, with a warning, when absent).
- **T-hard** (eq. 2). ``argmax_c q_c``: the most frequent label among the retrieved
  images.
- **S-hard** (eq. 1, the paper's default hard labels). A source image of class
  ``c`` queries the target images with its code; the stand-in query is the class's
  *modal code* ``m_c = [F_c > 0.5]``, the code a class-``c`` source image most
  likely has under the same model. A target image whose code equals ``m_c``
  exactly (eq. 1's ``≡``) takes label ``c``; when several classes share a modal
  code, the one with the larger ``q_c``. Other images have no S-hard label.
- **L_c** (eq. 3): ``CE(P_s, Y_s) + beta (CE(P_t, Y_S-hard) + KL(Y_T-soft || P_t))``,
  beta 1. ``CE(P_s, Y_s)`` is the supervised source term; without source images it
  becomes ``source_weight * CE(P_t, P_src)``, the cross-entropy of the model's
  target predictions against the source model's (with target BatchNorm
  statistics, computed once before training): the term that keeps the source
  hypothesis, as the source loss does in the paper. ``KL`` is PyTorch's
  ``KLDivLoss(log P_t, Y)``, i.e. ``KL(Y || P_t)``.
- **Triplets** (Sec. 3.4, eq. 4): only target images, so only target anchors.
  For every anchor (each epoch, offline: from the AU outputs, never from
  features): a random positive among the *other* target images with the same AU
  code, and a random negative among the images with a different code whose AU
  similarity (cosine of the AU output vectors) exceeds ``negative_threshold`` 0.5
  (the paper's hard-negative mining); without such an image, the most similar
  image with a different code. An anchor whose code nobody else has has no
  triplet. ``L_tri = max(0, gamma - (||F_a - F_n|| - ||F_a - F_p||))`` on the
  L2-normalised backbone features ("the last pooling layer"), margin gamma 0.5.
- **Objective**: ``L_all = L_c + epsilon L_tri``, epsilon 1; every image in the
  batch (anchors, positives, negatives: all target images with pseudo-labels)
  enters ``L_c``, as in the paper ("all the images are optimized by
  Cross-Entropy loss, KLDiv loss and AU-Guided Triplet Loss").
- **Optimisation** (Sec. 3.5): the whole network is fine-tuned from the source
  weights with Adam, lr 1e-3, exponential decay 0.9 per epoch (applied
  continuously: the engine's ``exp`` schedule). 10 epochs instead of 40 (CPU).

Dropped: the source-anchored triplets ``(X_s^a, X_t^p, X_t^n)`` and the source
positives/negatives of ``(X_t^a, X_s^p, X_s^n)`` (source images), and the source
term's labels (replaced as above).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from sourcefree.engine.config import refuse_invalid
from sourcefree.engine.feature_bank import MIN_PRODUCT_ROWS, MemoryBudget, block_rows
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
)
from sourcefree.engine.models import Classifier
from sourcefree.engine.registry import register_method
from sourcefree.errors import ConfigError, RequirementError
from sourcefree.kernels import margin_ce_im
from sourcefree.package.manifest import AUDetectorSpec

__all__ = [
    "AdaFER",
    "AdaFERConfig",
    "AdamExpConfig",
    "au_codes",
    "au_posterior",
    "au_similarity",
    "modal_codes",
    "s_hard_labels",
    "sample_triplets",
    "soft_cross_entropy",
    "soft_kl",
    "t_hard_labels",
    "triplet_loss",
]

#: The triplet draw's tile: at most this many anchors per block (256 x N pairs).
TRIPLET_TILE = 256
#: Bytes one (anchor, image) pair takes in a block of the draw: float64 similarity and
#: draw, a float64 masked copy and its fill, and bool masks.
TRIPLET_PAIR_BYTES = 35


# --- equations ----------------------------------------------------------------------------


def au_codes(aus: torch.Tensor, threshold: float) -> torch.Tensor:
    """Binary AU codes ``E = [s >= threshold]`` (bool, same shape as ``aus``)."""
    return aus >= threshold


def au_posterior(
    codes: torch.Tensor,
    frequencies: torch.Tensor,
    prior: torch.Tensor,
    floor: float = 1e-3,
) -> torch.Tensor:
    """T-soft labels (eq. 2 retrieval, expected): ``q_ic ∝ prior_c P(E_i | c)``, float64.

    ``P(E | c) = prod_a F_ca^E_a (1 - F_ca)^(1 - E_a)`` with ``F`` clipped to
    ``[floor, 1 - floor]``; ``prior`` is the source class distribution (class
    counts, any positive scale).

    Args:
        codes: (N, A) bool AU codes of the target images.
        frequencies: (C, A) per-class AU frequencies in [0, 1].
        prior: (C,) non-negative class weights (counts or probabilities).
        floor: clip of the frequencies.

    Returns:
        (N, C) rows summing to 1.
    """
    f = frequencies.to(torch.float64).clamp(floor, 1.0 - floor)
    e = codes.to(torch.float64)
    log_prior = torch.log(prior.to(torch.float64).clamp_min(1e-300))
    ll = e @ torch.log(f).T + (1.0 - e) @ torch.log1p(-f).T + log_prior
    return torch.softmax(ll, dim=1)


def t_hard_labels(posterior: torch.Tensor) -> torch.Tensor:
    """T-hard labels (eq. 2): the most frequent label among the retrieved source images."""
    return posterior.argmax(dim=1)


def modal_codes(frequencies: torch.Tensor) -> torch.Tensor:
    """(C, A) bool: each class's most probable AU code ``[F_c > 0.5]`` (S-hard's query)."""
    return frequencies > 0.5


def s_hard_labels(
    codes: torch.Tensor, frequencies: torch.Tensor, posterior: torch.Tensor
) -> torch.Tensor:
    """S-hard labels (eq. 1): class ``c`` where the code equals ``c``'s modal code, else -1.

    Classes sharing a modal code: the one with the larger posterior (T-soft) wins.
    """
    modes = modal_codes(frequencies).to(codes.device)
    match = (codes.unsqueeze(1) == modes.unsqueeze(0)).all(dim=2)  # (N, C)
    score = torch.where(match, posterior.to(torch.float64), torch.full_like(posterior, -1.0))
    labels = score.argmax(dim=1)
    return torch.where(match.any(dim=1), labels, torch.full_like(labels, -1))


def au_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(Na, Nb) cosine similarity of AU output vectors (an all-zero vector is similar to none)."""
    na = nn.functional.normalize(a.to(torch.float64), dim=1, eps=1e-12)
    nb = nn.functional.normalize(b.to(torch.float64), dim=1, eps=1e-12)
    return na @ nb.T


def _similarity_rows(
    unit: torch.Tensor, aus: torch.Tensor, start: int, k: int, tile: tuple[int, int]
) -> torch.Tensor:
    """``au_similarity(aus[start:start+k], aus)``, from a product of at least 16 rows.

    ``unit``: the normalised ``aus``; ``tile``: the 256-anchor tile (first row, rows)
    holding the block. BLAS may round a product of a few rows differently, so a block
    of fewer than 16 anchors takes its rows from a 16-row window of its tile (the whole
    tile when it is smaller): every row comes from a product the size of the 256-anchor
    draw's or of at least 16 rows, which gave bitwise the same values on the CPU BLAS
    tested (tests/adapters/test_adafer.py).
    """
    first, rows = tile
    w = min(rows, max(k, MIN_PRODUCT_ROWS))
    lo = max(first, min(start, first + rows - w))
    anchors = nn.functional.normalize(aus[lo : lo + w].to(torch.float64), dim=1, eps=1e-12)
    return (anchors @ unit.T)[start - lo : start - lo + k]


def sample_triplets(
    aus: torch.Tensor,
    codes: torch.Tensor,
    negative_threshold: float,
    generator: torch.Generator,
    chunk: int = TRIPLET_TILE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offline triplet selection among target images (Sec. 3.4), one per anchor.

    Positive: uniformly among the other images with the same AU code. Negative:
    uniformly among the images with another code whose AU similarity with the
    anchor exceeds ``negative_threshold`` (hard negatives); when there is none,
    the most similar image with another code.

    Args:
        aus: (N, A) AU outputs in [0, 1] (CPU).
        codes: (N, A) bool AU codes.
        negative_threshold: tau_n (0.5 in the paper).
        generator: CPU generator (the draws are a function of it).
        chunk: anchors per block, 1 to :data:`TRIPLET_TILE` (memory about ``chunk x N x``
            :data:`TRIPLET_PAIR_BYTES` bytes, and at least 16 x N float64
            similarities). The triplets do not depend on it: the draws are taken
            from ``generator`` in anchor order, and the similarities as
            :func:`_similarity_rows` says.

    Returns:
        ``(positives, negatives, hard)``: int64 (N,) indices, -1 where the anchor
        has no triplet; bool (N,) whether the negative passed the threshold.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk={chunk!r}", "a block has at least 1 anchor", "pass chunk >= 1")
    n = aus.shape[0]
    _, ids = torch.unique(codes.to(torch.uint8), dim=0, return_inverse=True)
    positives = torch.full((n,), -1, dtype=torch.int64)
    negatives = torch.full((n,), -1, dtype=torch.int64)
    hard = torch.zeros(n, dtype=torch.bool)
    everyone = torch.arange(n)
    unit = nn.functional.normalize(aus.to(torch.float64), dim=1, eps=1e-12)
    size = min(chunk, TRIPLET_TILE)
    for first in range(0, n, TRIPLET_TILE):  # the blocks never straddle a tile
        tile = (first, min(TRIPLET_TILE, n - first))
        for start in range(first, first + tile[1], size):
            rows = everyone[start : min(start + size, first + tile[1])]
            k = rows.numel()
            same = ids[rows].unsqueeze(1) == ids.unsqueeze(0)  # (k, N)
            same[torch.arange(k), rows] = False  # not itself
            sim = _similarity_rows(unit, aus, start, k, tile)
            draws = torch.rand(k, n, generator=generator, dtype=torch.float64)
            other = ~same
            other[torch.arange(k), rows] = False
            hard_pool = other & (sim > negative_threshold)
            pos = torch.where(same, draws, torch.full_like(draws, -1.0)).argmax(dim=1)
            neg_hard = torch.where(hard_pool, draws, torch.full_like(draws, -1.0)).argmax(dim=1)
            neg_easy = torch.where(other, sim, torch.full_like(sim, -math.inf)).argmax(dim=1)
            has_hard = hard_pool.any(dim=1)
            neg = torch.where(has_hard, neg_hard, neg_easy)
            ok = same.any(dim=1) & other.any(dim=1)
            positives[rows] = torch.where(ok, pos, torch.full_like(pos, -1))
            negatives[rows] = torch.where(ok, neg, torch.full_like(neg, -1))
            hard[rows] = ok & has_hard
    return positives, negatives, hard


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> torch.Tensor:
    """Eq. 4: ``mean max(0, gamma - (||F_a - F_n|| - ||F_a - F_p||))`` on L2-normalised features.

    The inputs are raw features (B, D); they are normalised here. An empty batch gives 0.
    """
    if anchor.shape[0] == 0:
        return anchor.sum() * 0.0
    fa = nn.functional.normalize(anchor.float(), dim=1)
    fp = nn.functional.normalize(positive.float(), dim=1)
    fn = nn.functional.normalize(negative.float(), dim=1)
    d_ap = (fa - fp).norm(dim=1)
    d_an = (fa - fn).norm(dim=1)
    return torch.relu(margin - (d_an - d_ap)).mean()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_i -sum_c t_ic log softmax(z_i)_c`` (the source term's stand-in in eq. 3)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(target.to(logp.dtype) * logp).sum(dim=1).mean()


def soft_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 3's ``KL(P_t, Y_T-soft)`` as PyTorch's KLDivLoss: ``mean_i sum_c y log(y / p)``."""
    logp = torch.log_softmax(logits.float(), dim=1)
    y = target.to(logp.dtype)
    return (torch.xlogy(y, y) - y * logp).sum(dim=1).mean()


# --- config -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamExpConfig:
    """Adam with an exponential learning-rate decay per epoch (Sec. 3.5)."""

    lr: float = 1e-3
    """Adam learning rate (Sec. 3.5: 0.001)."""
    decay: float = 0.9
    """Learning-rate factor per epoch (Sec. 3.5: exponential, gamma 0.9)."""
    weight_decay: float = 0.0
    """Adam weight decay (the paper states none)."""

    def __post_init__(self) -> None:
        bad = []
        if not self.lr > 0 or not 0 < self.decay <= 1:
            bad.append(f"lr={self.lr}, decay={self.decay} (need lr > 0, 0 < decay <= 1)")
        if not self.weight_decay >= 0:
            bad.append(f"weight_decay={self.weight_decay} (must be >= 0)")
        refuse_invalid(self, bad)


@dataclass(frozen=True)
class AdaFERConfig:
    """AdaFER settings (paper defaults unless noted)."""

    beta: float = 1.0
    """Eq. 3: weight of the pseudo-label terms (Sec. 3.5 and Fig. 7: 1)."""
    epsilon: float = 1.0
    """``L_all = L_c + epsilon L_tri`` (Sec. 3.4, Fig. 7: 1)."""
    margin: float = 0.5
    """Eq. 4: triplet margin gamma (Fig. 6: 0.5)."""
    negative_threshold: float = 0.5
    """Hard negatives: AU similarity above tau_n (Table 4: 0.5)."""
    hard_labels: Literal["s-hard", "t-hard", "none"] = "s-hard"
    """Hard pseudo-labels of eq. 3: S-hard (eq. 1, default), T-hard (eq. 2) or none."""
    soft_labels: bool = True
    """The KL term of eq. 3 with T-soft labels (default: S-hard + T-soft, Fig. 5)."""
    source_weight: float = 1.0
    """Stand-in for CE(P_s, Y_s) of eq. 3: CE against the source model's predictions."""
    frequency_floor: float = 1e-3
    """AU frequencies are clipped to [floor, 1 - floor] in the eq. 1-2 likelihood."""
    class_prior: bool = True
    """Weight the T-soft posterior by the vendor's class counts (the retrieval of eq. 2)."""
    epochs: int = 10
    """Passes over the target images (paper: 40; 10 keeps CPU runs short)."""
    batch_size: int = 64
    """Anchors per step (each brings a positive and a negative; paper: 128 triplets)."""
    label_batch_size: int = 256
    """Images per forward pass of the labelling and BatchNorm passes."""
    optim: AdamExpConfig = field(default_factory=AdamExpConfig)
    """Optimiser and schedule."""
    target_bn_init: bool = True
    """Re-estimate BatchNorm statistics on the target (AdaBN) before the labelling pass."""
    recalibrate: bool = True
    """Re-estimate BatchNorm statistics on the plain target images after training."""

    def __post_init__(self) -> None:
        bad = []
        for key in ("beta", "epsilon", "margin", "source_weight"):
            if not getattr(self, key) >= 0:
                bad.append(f"{key}={getattr(self, key)} (must be >= 0)")
        if not 0 <= self.negative_threshold < 1:
            bad.append(f"negative_threshold={self.negative_threshold} (must be in [0, 1))")
        if not 0 < self.frequency_floor < 0.5:
            bad.append(f"frequency_floor={self.frequency_floor} (must be in (0, 0.5))")
        if self.epochs < 1 or self.batch_size < 2 or self.label_batch_size < 1:
            bad.append(
                f"epochs={self.epochs}, batch_size={self.batch_size}, "
                f"label_batch_size={self.label_batch_size}"
            )
        if self.source_weight == 0 and self.epsilon == 0 and not self._uses_labels():
            bad.append("every loss term has weight 0 (nothing to minimise)")
        refuse_invalid(self, bad)

    def _uses_labels(self) -> bool:
        return self.beta > 0 and (self.hard_labels != "none" or self.soft_labels)


# --- method -------------------------------------------------------------------------------


def _requirements(
    context: MethodContext,
) -> tuple[AUDetectorSpec, tuple[tuple[float, ...], ...]]:
    """The package's AU detector spec and AU frequencies, or a RequirementError."""
    pkg = context.sources[0].package
    name = pkg.manifest.name
    detector = pkg.au_detector
    if detector is None:
        raise RequirementError(
            f"adafer: package {name!r} carries no action-unit detector",
            "AdaFER labels target images by their action units (eq. 1-3), which the "
            "vendor's detector (manifest auxiliary.au_detector) finds on site",
            "ask the vendor for a package exported with "
            "sourcefree.export.source_package(..., au_detector=..., au_names=...), "
            "or pick another method (`sourcefree methods`)",
        )
    stats = pkg.manifest.source_stats
    freqs = stats.au_frequencies if stats is not None else None
    if freqs is None:
        raise RequirementError(
            f"adafer: package {name!r} has no source_stats.au_frequencies",
            "the vendor's per-class action-unit frequencies stand in for the source "
            "images that eq. 1-2 retrieve by AU code",
            "ask the vendor to export source_stats.au_frequencies "
            "(sourcefree.vendor.training.au_frequencies), or pick another method "
            "(`sourcefree methods`)",
        )
    return detector, freqs


@register_method("adafer")
class AdaFER(Method):
    """Source-free AdaFER: AU-guided pseudo-labels (eq. 1-3) and AU-guided triplets (eq. 4)."""

    description = (
        "AdaFER (source-free): the vendor's AU detector + per-class AU frequencies give "
        "S-hard/T-soft pseudo-labels and AU-guided triplets (Wang et al.)"
    )
    config_class = AdaFERConfig
    config: AdaFERConfig
    #: ``--select auto``: the number of epochs (nothing in the paper's 40 is checkable
    #: without labels; the lr decays per epoch, so shorter runs also end hotter).
    selection_grid = ({"epochs": 3}, {"epochs": 6}, {"epochs": 10})
    #: Each step forwards anchors, positives and negatives (about 3x SHOT's images).
    relative_cost = 3.0

    def __init__(self, config: AdaFERConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.detector_spec, freqs = _requirements(context)
        self.frequencies = torch.tensor(freqs, dtype=torch.float64)
        c = context.num_classes
        stats = context.sources[0].package.manifest.source_stats
        counts = stats.class_counts if stats is not None else None
        self.prior_source = "class_counts" if counts is not None else "uniform"
        if counts is None and config.class_prior:
            warnings.warn(
                "adafer: the source package has no source_stats.class_counts; the T-soft "
                "labels assume classes of equal size",
                UserWarning,
                stacklevel=2,
            )
        self.prior = torch.ones(c, dtype=torch.float64)
        if counts is not None and config.class_prior:
            self.prior = torch.tensor([max(int(v), 1) for v in counts], dtype=torch.float64)
        self.model = context.sources[0].model.to(context.device)
        dev = context.device
        # Labelling state (checkpointed): AU outputs, pseudo-labels, source predictions.
        self.aus = torch.zeros(0, len(self.detector_spec.au_names), dtype=torch.float32)
        self.hard = torch.zeros(0, dtype=torch.int64, device=dev)
        self.soft = torch.zeros(0, c, dtype=torch.float32, device=dev)
        self.source_probs = torch.zeros(0, c, dtype=torch.float32, device=dev)
        # Triplets of the current epoch (checkpointed).
        self.positives = torch.zeros(0, dtype=torch.int64)
        self.negatives = torch.zeros(0, dtype=torch.int64)
        self.hard_negative = torch.zeros(0, dtype=torch.bool)
        self.triplet_epoch = -1
        self.label_meta: dict[str, Any] = {}
        self.memory = MemoryBudget() if context.memory is None else context.memory

    # --- labelling (eq. 1-3), once -------------------------------------------------------

    def _detect(self) -> torch.Tensor:
        """AU outputs of every un-augmented target image, from the package's ONNX detector."""
        from sourcefree.runtime.predictor import AUDetector

        pkg = self.context.sources[0].package
        detector = AUDetector(
            pkg,
            "cpu",
            batch_size=self.config.label_batch_size,
            threads=max(1, torch.get_num_threads()),
        )
        parts = [
            detector.detect_array(x.numpy())
            for _, x in self.context.data.batches(self.config.label_batch_size)
        ]
        return torch.from_numpy(np.concatenate(parts))

    @torch.no_grad()
    def _source_predictions(self) -> torch.Tensor:
        """Eval-mode softmax of the current model (the source, target-BN) on plain images."""
        self.model.eval()
        dev = self.context.device
        rows = [
            torch.softmax(self.model(x.to(dev))[0].float(), dim=1).cpu()
            for _, x in self.context.data.batches(self.config.label_batch_size)
        ]
        return torch.cat(rows)

    def label(self) -> None:
        """Detect AUs, compute S-hard / T-hard / T-soft labels and the source predictions."""
        cfg = self.config
        dev = self.context.device
        aus = self._detect()
        codes = au_codes(aus, self.detector_spec.threshold)
        post = au_posterior(codes, self.frequencies, self.prior, cfg.frequency_floor)
        s_hard = s_hard_labels(codes, self.frequencies, post)
        t_hard = t_hard_labels(post)
        hard = {"s-hard": s_hard, "t-hard": t_hard}.get(cfg.hard_labels)
        if hard is None:
            hard = torch.full_like(s_hard, -1)
        probs = self._source_predictions()
        self.aus = aus.float()
        self.hard = hard.to(dev)
        self.soft = post.float().to(dev)
        self.source_probs = probs.to(dev)
        c = self.context.num_classes
        labelled = hard >= 0
        entropy = -(torch.xlogy(post, post)).sum(dim=1)
        src_pred = probs.argmax(dim=1)
        self.label_meta = {
            "au_names": list(self.detector_spec.au_names),
            "au_threshold": self.detector_spec.threshold,
            "active_fraction_per_au": [round(float(v), 4) for v in codes.float().mean(0)],
            "distinct_codes": int(torch.unique(codes.to(torch.uint8), dim=0).shape[0]),
            "prior": self.prior_source if cfg.class_prior else "uniform",
            "hard_labels": cfg.hard_labels,
            "hard_coverage": float(labelled.float().mean()),
            "hard_per_class": [
                int(v) for v in torch.bincount(hard[labelled], minlength=c).tolist()
            ],
            "s_hard_coverage": float((s_hard >= 0).float().mean()),
            "t_soft_mean_entropy": float(entropy.mean()),
            "t_hard_per_class": [int(v) for v in torch.bincount(t_hard, minlength=c).tolist()],
            "t_hard_agreement_with_source": float((t_hard == src_pred).float().mean()),
            "hard_agreement_with_source": (
                float((hard[labelled] == src_pred[labelled]).float().mean())
                if bool(labelled.any())
                else None
            ),
        }

    def _ensure_labels(self) -> None:
        # A step without the labelling phase (direct calls, tests) labels lazily.
        if self.hard.numel() == 0:
            self.label()

    def _label_epoch(self, info: EpochInfo) -> None:
        self.label()

    def _no_step(self, batch: Batch) -> StepOutput:
        return StepOutput(loss=None)

    # --- triplets (Sec. 3.4), every epoch --------------------------------------------------

    def sample(self, epoch: int) -> None:
        """Draw this epoch's triplets (a function of the run's seed and the epoch)."""
        self._ensure_labels()
        gen = torch.Generator().manual_seed(self.context.seed * 1_000_003 + epoch + 17)
        codes = au_codes(self.aus, self.detector_spec.threshold)
        pair_bytes = max(1, int(self.aus.shape[0]) * TRIPLET_PAIR_BYTES)
        chunk = block_rows(self.memory.budget_bytes, pair_bytes, TRIPLET_TILE)
        pos, neg, hard = sample_triplets(
            self.aus, codes, self.config.negative_threshold, gen, chunk
        )
        self.positives, self.negatives, self.hard_negative = pos, neg, hard
        self.triplet_epoch = epoch

    def _ensure_triplets(self) -> None:
        if self.triplet_epoch < 0:
            self.sample(0)

    def _triplet_epoch(self, info: EpochInfo) -> None:
        self.sample(info.epoch)

    # --- training step (eq. 3-4) -----------------------------------------------------------

    def _train_mode(self) -> None:
        self.model.train()

    def _step(self, batch: Batch) -> StepOutput:
        self._ensure_labels()
        self._ensure_triplets()
        cfg = self.config
        dev = batch.x.device
        index = batch.index.cpu()
        pos, neg = self.positives[index], self.negatives[index]
        valid = (
            (pos >= 0) & (neg >= 0) if cfg.epsilon > 0 else torch.zeros_like(pos, dtype=torch.bool)
        )
        k = int(valid.sum())
        rows = torch.cat([index, pos[valid], neg[valid]])
        x = batch.x
        if k > 0:
            x = torch.cat([x, self.context.data.tensor(rows[index.numel() :]).to(dev, x.dtype)])
        logits, feats = self.model(x)
        at = rows.to(self.hard.device)
        terms = {
            "source": soft_cross_entropy(logits, self.source_probs[at]),
            "hard": margin_ce_im(logits, self.hard[at]).ce,
            "soft": soft_kl(logits, self.soft[at]),
        }
        b = index.numel()
        a_idx = torch.nonzero(valid.to(dev)).flatten()
        l_tri = triplet_loss(feats[a_idx], feats[b : b + k], feats[b + k :], cfg.margin)
        l_c = cfg.source_weight * terms["source"]
        if cfg.hard_labels != "none":
            l_c = l_c + cfg.beta * terms["hard"]
        if cfg.soft_labels:
            l_c = l_c + cfg.beta * terms["soft"]
        loss = l_c + cfg.epsilon * l_tri
        return StepOutput(
            loss,
            {
                "l_src": terms["source"].detach(),
                "l_hard": terms["hard"].detach(),
                "l_soft": terms["soft"].detach(),
                "l_tri": l_tri.detach(),
                "triplets": float(k) / max(1, b),
            },
        )

    def _parameters(self) -> list[ParamGroup]:
        return [ParamGroup(list(self.model.parameters()))]

    def _leave(self) -> None:
        self.model.eval()

    # --- Method ----------------------------------------------------------------------------

    def phases(self) -> Sequence[Phase]:
        cfg, opt = self.config, self.config.optim
        out: list[Phase] = []
        if cfg.target_bn_init:
            out += self.bn_statistics_phases(self.model, cfg.label_batch_size, name="target-bn")
        out.append(
            Phase(
                name="pseudo-label",
                epochs=1,
                step=self._no_step,
                batch_size=max(2, cfg.label_batch_size),
                on_epoch_start=self._label_epoch,
                shuffle=False,
                drop_last=False,
                amp=False,
            )
        )
        out.append(
            Phase(
                name="adapt",
                epochs=cfg.epochs,
                step=self._step,
                batch_size=cfg.batch_size,
                parameters=self._parameters,
                optimizer=OptimizerSpec(name="adam", lr=opt.lr, weight_decay=opt.weight_decay),
                schedule=ScheduleSpec(name="exp", final=opt.decay**cfg.epochs),
                on_enter=self._train_mode,
                on_epoch_start=self._triplet_epoch,
                on_phase_end=self._leave,
            )
        )
        if cfg.recalibrate:
            out += self.bn_statistics_phases(self.model, cfg.label_batch_size)
        return out

    def modules(self) -> Mapping[str, nn.Module]:
        return {"model": self.model}

    def export_model(self) -> Classifier:
        return self.model.eval()

    # --- state -----------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "aus": self.aus.detach().cpu().clone(),
            "hard": self.hard.detach().cpu().clone(),
            "soft": self.soft.detach().cpu().clone(),
            "source_probs": self.source_probs.detach().cpu().clone(),
            "positives": self.positives.clone(),
            "negatives": self.negatives.clone(),
            "hard_negative": self.hard_negative.clone(),
            "triplet_epoch": torch.tensor(self.triplet_epoch, dtype=torch.int64),
        }

    def state_meta(self) -> dict[str, JSON]:
        return {"labels": dict(self.label_meta)}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, JSON]) -> None:
        dev = self.context.device
        if "hard" in tensors:
            self.aus = tensors["aus"].to(torch.float32).clone()
            self.hard = tensors["hard"].to(dev, torch.int64).clone()
            self.soft = tensors["soft"].to(dev, torch.float32).clone()
            self.source_probs = tensors["source_probs"].to(dev, torch.float32).clone()
            self.positives = tensors["positives"].to(torch.int64).clone()
            self.negatives = tensors["negatives"].to(torch.int64).clone()
            self.hard_negative = tensors["hard_negative"].to(torch.bool).clone()
            self.triplet_epoch = int(tensors["triplet_epoch"])
        info = meta.get("labels", {})
        self.label_meta = dict(info) if isinstance(info, Mapping) else {}

    def pseudo_label_selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The hard pseudo-labels of eq. 3 (S-hard: the images matching a modal code)."""
        if self.hard.numel() == 0:
            return None
        hard = self.hard.detach().cpu().to(torch.int64)
        idx = torch.nonzero(hard >= 0).flatten()
        if idx.numel() == 0:
            return None
        return idx, hard[idx]

    def report(self) -> dict[str, JSON]:
        """Aggregates of the AU labelling and of the last epoch's triplets (no per-image data)."""
        out: dict[str, Any] = {"labels": dict(self.label_meta)}
        if self.triplet_epoch >= 0 and self.positives.numel():
            ok = self.positives >= 0
            out["triplets"] = {
                "epoch": self.triplet_epoch,
                "anchors_with_triplet": float(ok.float().mean()),
                "hard_negative_fraction": (
                    float(self.hard_negative[ok].float().mean()) if bool(ok.any()) else None
                ),
            }
        return out
