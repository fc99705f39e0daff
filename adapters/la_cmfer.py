"""LA-CMFER, source-free: global and 2x2-grid local branches over one or several source models.

[0] Yang, Wen, Zeng, Xu, Wu, Zhou, Wang. "Learning with Alignments: Tackling the
Inter- and Intra-domain Shifts for Cross-multidomain Facial Expression Recognition"
(LA-CMFER), ACM MM 2024, arXiv 2407.05688 (https://arxiv.org/abs/2407.05688).
Equation numbers below are the paper's.

The paper trains one network (shared encoder E, global branch A_G + C_G, local
branch A_L + C_L) on N labelled source datasets and the unlabelled target. Here the
customer holds N vendor packages and the target images only. What runs:

- **Branches (Sec. 3.2).** Per source package, the vendor's model is the global
  branch: its backbone up to the last feature map (``trunk``), average pooling and
  its ``neck`` give ``f_G``; its linear head is ``C_G``. The local branch cuts the
  same feature map into a 2x2 grid (top-left, top-right, bottom-left, bottom-right,
  adaptive-pooling cell bounds), average-pools each cell, passes it through the
  neck and a shared ``A_L`` (``relu(W e + b) - 1`` with ``W = I``, ``b = 1`` at
  start, i.e. the identity for features >= -1) and concatenates the four results
  into ``f_L``; ``C_L`` is a new linear layer started as the source head applied to
  the mean of the cells (``[W/4, W/4, W/4, W/4]``, same bias). At the start both
  branches therefore predict what the source model predicts (``local_init=source``;
  ``local_init=random`` starts A_L and C_L as new layers, as the paper's branch).
  The paper's A_L is convolutional on an earlier stage of E; here it acts on the
  last feature map's cells, so the vendor's class means can enter the local branch.
  With ``source`` the branches agree on the argmax for ~98 % of the training images
  (eq. 12's condition (i)), so the vote is mostly the confidence test; ``random``
  makes (i) a real filter. On the development seed both end within 0.003 of each
  other (docs/methods.md, "LA-CMFER"), and ``source`` stays the default.
- **Hardness weights (eq. 3-4).** ``Omega(x) = ||p(x) without its maximum||_2``
  for target images (every entry equal to the maximum is excluded, as eq. 3 is
  written); for a source point the real class is zeroed instead; ``H = Omega /
  sum_batch Omega``. Weights are detached.
- **Sample-level alignment (eq. 5-6), source-free.** The source batch is replaced
  by the vendor's class feature means (``source_stats.class_feature_means``), each
  weighted by its class prior (``class_counts``, uniform without) times its
  eq. 3 hardness under the current head (real class = its class). The weighted
  MMD^2 between them and the hardness-weighted target features is
  :func:`sourcefree.kernels.gaussian_mmd` (DAN's multi-kernel Gaussian MMD with
  per-sample weights: the dispatcher route).
- **Cluster-level alignment (eq. 7-8), source-free.** For every class k with a
  reliable vendor mean, ``MMD^2(mu_k, {target with y_hat = k}) - MMD^2(mu_k,
  {target with y_hat != k})`` with hardness weights on the target side, through the
  same :func:`~sourcefree.kernels.gaussian_mmd` and one set of bandwidths per
  branch and batch (DAN's data-driven ones from the pooled means and features), so
  both terms live in one RKHS; averaged over the classes present on both sides.
  ``y_hat`` is the branch's own prediction. Eq. 9 sums ``(L_sid^G + L_sid^L) +
  lambda (L_cid^G + L_cid^L)`` over the sources. Only samples (and means) whose
  top probability exceeds the reliability threshold ``epsilon`` take part.
  The local branch is aligned in the space of its ``A_L`` outputs: a target image
  by the average of its four projected cells, a vendor mean ``mu_k`` as an image
  whose four cells all equal ``mu_k`` (average pooling is linear, so the means of
  ``f_G`` are also the class means of the cell average, exactly where the neck is
  the identity: smallcnn, ResNets): its feature is ``A_L(mu_k)`` and its
  probabilities, hence its hardness and reliability, are ``C_L`` of the four
  copies, the target cells' path (:meth:`GridBranch.mean_view`). Gradients flow
  through ``A_L`` on both sides, as through ``A_L(E(x_s))`` in the paper.
- **Multi-view clustering consistency (eq. 10-11).** ``MPC = P_G^T P_L`` (K x K)
  over the batch, rows normalised to sum one (the MCC normalisation the paper
  cites, [34]), ``L_mcc = (S(|norm(MPC) - I|) + S(|norm(MPC^T) - I|)) / 2K``.
- **Multi-view voting (eq. 12).** A target image gets the pseudo-label ``argmax``
  when the global and local predictions agree and one of them exceeds ``tau =
  0.9``; ``L_mvv = 1/|B| sum 1[MV] (CE(P_G, y) + CE(P_L, y))`` through
  :func:`sourcefree.kernels.margin_ce_im` (the shared CE path).
- **Objective (eq. 14)** without ``L_sup``: ``alpha L_inter + beta L_mcc + gamma
  L_mvv`` with ``alpha = 0.1`` (0.4 for FER-2013 and AffectNet), ``lambda = 0.02``,
  ``beta = 0.5``, ``gamma = 0.1``, ``epsilon = 0.4``, ``tau = 0.9``.
- **Inference (Sec. 3.5).** The prediction of the more confident branch.

Several sources. The paper's shared encoder cannot exist here: each vendor trained
its own backbone, and each vendor's class means live in that backbone's feature
space. So every source model gets its own global and local branch and is aligned
to its own vendor's means (eq. 9 sums over sources); the sources are coupled by
the voting (eq. 12), which reads the ensemble's global and local predictions (the
mean of the sources' logits per branch), and the per-source losses are summed
(each source's parameters get the single-model gradient). The exported model
holds every adapted source; its global logits are the mean of the sources' global
logits (one linear ``head`` over the concatenated global features), its local
logits the mean of their local logits, and it outputs the logits of the more
confident branch. Its architecture is ``la-cmfer.<source archs>``, registered as
an architecture family so that :func:`sourcefree.engine.models.load_classifier` rebuilds
it from the package.

Replaced because there are no source images: ``L_sup`` (eq. 13) is dropped; the
source hypothesis is kept by starting from the vendor's weights and by freezing
the global heads ``C_G`` (``train_global_head=false``), as SHOT keeps its source
classifier. The source side of eq. 5-8 is the vendor's class means (above). A
package without class means skips its alignment with a warning. Before
adaptation, BatchNorm statistics are re-estimated on the target
(``target_bn_init``; in the paper E sees target batches in train mode from the
first step). Target batches are not augmented by default (``augment.enabled``;
the paper names no augmentation). Training length is CPU-sized (``epochs``; the
paper runs 20,000 iterations of batch 128) and the optimiser is SGD with the
inverse-decay schedule of the DANN family (the paper follows [38] without listing
it).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import nn

from sourcefree.engine.config import refuse_invalid
from sourcefree.engine.method import (
    JSON,
    Batch,
    Method,
    MethodContext,
    ParamGroup,
    Phase,
    StepOutput,
)
from sourcefree.engine.models import (
    Classifier,
    build_classifier,
    feature_map_split,
    register_architecture_family,
)
from sourcefree.engine.registry import register_method
from sourcefree.errors import ConfigError, PackageError
from sourcefree.kernels import gaussian_mmd, margin_ce_im
from sourcefree.kernels.reference import mmd_bandwidths
from sourcefree.ops.augment import FlipShiftConfig, augment_flip_shift
from sourcefree.ops.optim import SgdInvConfig
from sourcefree.package.manifest import NAME_RE, ArchitectureSpec, Manifest, SourceStats

__all__ = [
    "FAMILY",
    "GridBranch",
    "LaCmfer",
    "LaCmferConfig",
    "LaCmferNet",
    "LaCmferOptimConfig",
    "alignment_losses",
    "decode_architecture",
    "encode_architecture",
    "grid_cells",
    "hardness",
    "hardness_weights",
    "multi_view_vote",
    "multiview_consistency_loss",
]

FAMILY = "la-cmfer"
"""Architecture family of the exported models: ``la-cmfer.<arch>[.<arch>...]``."""
GRID = 2
"""Cells per side of the local branch's grid (the paper's 2 x 2)."""
_OMEGA_FLOOR = 1e-8
"""Added to eq. 3 so a set of one-hot predictions still has weights that sum above 0."""


# --- config ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaCmferOptimConfig(SgdInvConfig):
    """SGD with the inverse-decay schedule ``lr_t = lr (1 + gamma t/T)^-power``."""

    lr: float = 0.01
    """Base learning rate (paper: 0.01)."""
    backbone_lr_scale: float = 0.1
    """Learning-rate multiplier of the source backbones (pretrained layers)."""
    weight_decay: float = 5e-4
    """SGD weight decay."""


@dataclass(frozen=True)
class LaCmferConfig:
    """LA-CMFER settings (paper defaults, Sec. 4.1 and the supplementary, unless noted)."""

    alpha: float = 0.1
    """Eq. 14 weight of the inter-domain loss L_inter (paper: 0.1; 0.4 for FER-2013/AffectNet)."""
    lambda_cid: float = 0.02
    """Eq. 9 weight of the cluster-level term L_cid inside L_inter."""
    beta: float = 0.5
    """Eq. 14 weight of the multi-view clustering consistency loss L_mcc (eq. 11)."""
    gamma: float = 0.1
    """Eq. 14 weight of the multi-view voting loss L_mvv (eq. 12)."""
    tau: float = 0.9
    """Eq. 12 voting threshold: one branch's top probability must exceed it."""
    epsilon: float = 0.4
    """Reliability threshold: only samples (and means) above it enter L_inter."""
    kernel_num: int = 5
    """Gaussian kernels of the MMD (DAN)."""
    kernel_mul: float = 2.0
    """Ratio between consecutive MMD bandwidths (DAN)."""
    train_global_head: bool = False
    """Train the source heads C_G too (default: frozen, the source hypothesis)."""
    target_bn_init: bool = True
    """Re-estimate BatchNorm statistics on the target (AdaBN) before adapting."""
    epochs: int = 10
    """Passes over the target images (paper: 20,000 iterations of 128)."""
    batch_size: int = 64
    """Images per step (paper: 128)."""
    label_batch_size: int = 256
    """Images per forward pass of whole-set passes (BN statistics, the final vote)."""
    optim: LaCmferOptimConfig = field(default_factory=LaCmferOptimConfig)
    """Optimiser and schedule."""
    augment: FlipShiftConfig = field(default_factory=lambda: FlipShiftConfig(enabled=False))
    """Flip + shift of training batches (SHOT's helper); off: the paper names none."""
    local_init: Literal["source", "random"] = "source"
    """Start of A_L and C_L: ``source`` (A_L the identity, C_L the source head on the cell
    mean: both branches start as the source model) or ``random`` (PyTorch's default init,
    seeded by the run's seed: a new branch, as the paper's)."""

    def __post_init__(self) -> None:
        bad = []
        weights = (self.alpha, self.lambda_cid, self.beta, self.gamma)
        if not all(w >= 0 for w in weights):
            bad.append(
                f"alpha={self.alpha}, lambda_cid={self.lambda_cid}, beta={self.beta}, "
                f"gamma={self.gamma} (must be >= 0)"
            )
        elif self.alpha == 0 and self.beta == 0 and self.gamma == 0:
            bad.append("alpha, beta and gamma are all 0 (nothing to minimise)")
        if not 0 < self.tau < 1:
            bad.append(f"tau={self.tau} (must be in (0, 1))")
        if not 0 <= self.epsilon < 1:
            bad.append(f"epsilon={self.epsilon} (must be in [0, 1))")
        if self.kernel_num < 1 or not self.kernel_mul > 0:
            bad.append(f"kernel_num={self.kernel_num}, kernel_mul={self.kernel_mul} (must be > 0)")
        if self.epochs < 1 or self.batch_size < 2 or self.label_batch_size < 1:
            bad.append(
                f"epochs={self.epochs}, batch_size={self.batch_size}, "
                f"label_batch_size={self.label_batch_size}"
            )
        if self.local_init not in ("source", "random"):
            bad.append(f"local_init={self.local_init!r} (must be source or random)")
        refuse_invalid(self, bad)


# --- the equations -----------------------------------------------------------------------


def hardness(probs: torch.Tensor, real_class: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: ``Omega(x) = sqrt(sum_j 1[p_j != max p or j != rce] p_j^2)``.

    Target samples (``real_class=None``): the L2 norm of the probabilities without
    the maximum (every entry equal to the maximum is left out, as written). Source
    points: the entry of the real class is set to 0 instead.

    Args:
        probs: (B, K) probabilities.
        real_class: (B,) int64 real classes of source points, or None for targets.
    """
    p = probs.detach().float()
    if real_class is None:
        keep = p != p.amax(dim=1, keepdim=True)
    else:
        keep = torch.ones_like(p, dtype=torch.bool)
        keep[torch.arange(p.shape[0], device=p.device), real_class] = False
    return torch.sqrt((p.square() * keep).sum(dim=1))


def hardness_weights(omega: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``H(x_i) = Omega(x_i) / sum_k Omega(x_k)`` over the batch (floored above 0)."""
    w = omega.detach().float() + _OMEGA_FLOOR
    return w / w.sum()


def multi_view_vote(
    p_global: torch.Tensor, p_local: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 12's MV: the branches agree on the argmax and one exceeds ``tau``.

    Returns:
        ``(labels, selected)``: int64 labels (-1 where not selected) and the bool mask.
    """
    conf_g, y_g = p_global.detach().max(dim=1)
    conf_l, y_l = p_local.detach().max(dim=1)
    selected = (y_g == y_l) & ((conf_g > tau) | (conf_l > tau))
    return torch.where(selected, y_g, torch.full_like(y_g, -1)), selected


def multiview_consistency_loss(p_global: torch.Tensor, p_local: torch.Tensor) -> torch.Tensor:
    """Eq. 10-11: ``L_mcc = (S(|norm(MPC) - I|) + S(|norm(MPC') - I|)) / 2K``.

    ``MPC = P_G^T P_L`` is the K x K multi-view prediction consistency matrix of the
    batch; ``norm`` divides each row by its sum (the class normalisation of MCC,
    Jin et al. 2020, which the paper cites); ``S`` sums absolute values.
    """
    pg, pl = p_global.float(), p_local.float()
    k = pg.shape[1]
    mpc = pg.t() @ pl
    eye = torch.eye(k, dtype=mpc.dtype, device=mpc.device)
    tiny = torch.finfo(mpc.dtype).tiny
    rows = mpc / mpc.sum(dim=1, keepdim=True).clamp_min(tiny)
    cols = mpc.t() / mpc.t().sum(dim=1, keepdim=True).clamp_min(tiny)
    return ((rows - eye).abs().sum() + (cols - eye).abs().sum()) / (2 * k)


class AlignmentTerms(NamedTuple):
    """Eq. 5 (``sid``) and eq. 7 (``cid``) of one branch of one source."""

    sid: torch.Tensor
    cid: torch.Tensor
    classes: int
    """Classes that entered eq. 7 (a reliable mean and target samples on both sides)."""


def alignment_losses(
    features: torch.Tensor,
    probs: torch.Tensor,
    means: torch.Tensor,
    mean_probs: torch.Tensor,
    prior: torch.Tensor,
    *,
    epsilon: float,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
) -> AlignmentTerms:
    """Source-free eq. 5-8 against the vendor's class feature means.

    Eq. 5-6 (sample level): weighted MMD^2 between the class means (weights: class
    prior x eq. 3 hardness with the real class zeroed, under the branch's head) and
    the batch features (weights: eq. 4 hardness). Eq. 7-8 (cluster level), per
    class k: ``MMD^2(mu_k, T_{y_hat=k}) - MMD^2(mu_k, T_{y_hat!=k})``, averaged over
    the classes present on both sides. Only means and samples whose top probability
    exceeds ``epsilon`` take part. One set of bandwidths (DAN's data-driven ones over
    the pooled means and features) serves every term. Zero when nothing is reliable.

    Args:
        features: (B, D) target features of the branch (gradients flow into them).
        probs: (B, K) the branch's probabilities on them (detached inside).
        means: (K, D) vendor class feature means.
        mean_probs: (K, K) the branch's probabilities of the means.
        prior: (K,) class prior of the source (sums to one).
        epsilon: reliability threshold.
        kernel_mul, kernel_num: MMD kernels (DAN).
    """
    zero = features.sum() * 0.0
    p, mp = probs.detach().float(), mean_probs.detach().float()
    k = means.shape[0]
    rel_t = p.amax(dim=1) > epsilon
    rel_s = mp.amax(dim=1) > epsilon
    if not bool(rel_t.any()) or not bool(rel_s.any()):
        return AlignmentTerms(zero, zero, 0)
    classes = torch.arange(k, device=means.device)
    w_src = prior.to(mp) * (hardness(mp, classes) + _OMEGA_FLOOR)
    h_tgt = hardness_weights(hardness(p))
    feats = features.float()
    mu = means.to(feats)
    bw = mmd_bandwidths(torch.cat([mu[rel_s], feats[rel_t]]), kernel_mul, kernel_num)
    mmd = partial(gaussian_mmd, kernel_mul=kernel_mul, kernel_num=kernel_num, bandwidths=bw)
    sid = mmd(mu[rel_s], feats[rel_t], source_weight=w_src[rel_s], target_weight=h_tgt[rel_t])
    y_hat = p.argmax(dim=1)
    terms = []
    for c in classes[rel_s].tolist():
        same, other = rel_t & (y_hat == c), rel_t & (y_hat != c)
        if not bool(same.any()) or not bool(other.any()):
            continue
        pull = mmd(mu[c : c + 1], feats[same], target_weight=h_tgt[same])
        push = mmd(mu[c : c + 1], feats[other], target_weight=h_tgt[other])
        terms.append(pull - push)
    cid = torch.stack(terms).mean() if terms else zero
    return AlignmentTerms(sid, cid, len(terms))


def grid_cells(fmap: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """Average-pool a (N, C, h, w) map over a ``grid x grid`` grid -> (N, grid^2, C).

    Cells in row-major order (top-left, top-right, bottom-left, bottom-right for 2 x 2);
    bounds as ``adaptive_avg_pool2d`` (``floor(i h / g)`` to ``ceil((i + 1) h / g)``), so
    a map smaller than the grid repeats rows. Slices and means only (plain ONNX).
    """
    h, w = fmap.shape[2], fmap.shape[3]
    rows = [(i * h // grid, -(-(i + 1) * h // grid)) for i in range(grid)]
    cols = [(j * w // grid, -(-(j + 1) * w // grid)) for j in range(grid)]
    cells = [fmap[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for r0, r1 in rows for c0, c1 in cols]
    return torch.stack(cells, dim=1)


# --- the model ---------------------------------------------------------------------------


class GridBranch(nn.Module):
    """One source backbone with a 2x2-grid local branch (A_L shared over cells, C_L)."""

    def __init__(self, trunk: nn.Module, neck: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        self.local_proj = nn.Linear(feature_dim, feature_dim)
        self.local_head = nn.Linear(GRID * GRID * feature_dim, num_classes)
        self.feature_dim = feature_dim

    @torch.no_grad()
    def init_from_head(self, head: nn.Linear) -> None:
        """A_L = identity on features >= -1; C_L = the source head on the mean of the cells."""
        self.local_proj.weight.copy_(torch.eye(self.feature_dim))
        self.local_proj.bias.fill_(1.0)
        cells = GRID * GRID
        self.local_head.weight.copy_(head.weight.repeat(1, cells) / cells)
        self.local_head.bias.copy_(head.bias)

    def init_random(self, seed: int) -> None:
        """A_L and C_L as new layers: PyTorch's default init from ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.local_proj.reset_parameters()
            self.local_head.reset_parameters()

    def project(self, cells: torch.Tensor) -> torch.Tensor:
        """A_L per cell: ``relu(W e + b) - 1``."""
        return torch.relu(self.local_proj(cells)) - 1.0

    def local_logits(self, projected: torch.Tensor) -> torch.Tensor:
        """C_L over the concatenated cells (N, cells, D) -> (N, K)."""
        return self.local_head(projected.flatten(1))  # type: ignore[no-any-return]

    def mean_view(self, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vendor class means (K, D) as images whose four cells all equal the mean.

        Returns ``(A_L(mu), C_L logits)``: the target cells' path (A_L per cell, C_L
        over the concatenation); ``A_L(mu)`` is also the cell average, the local
        feature the alignment compares.
        """
        projected = self.project(means)
        return projected, self.local_logits(projected.unsqueeze(1).expand(-1, GRID * GRID, -1))

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_G, A_L cells)``: global features (N, D) and projected cells (N, 4, D)."""
        fmap = self.trunk(x)
        f_global = self.neck(fmap.mean(dim=(2, 3)))
        cells = grid_cells(fmap)
        n, c = cells.shape[0], cells.shape[1]
        necked = self.neck(cells.reshape(n * c, -1)).reshape(n, c, -1)
        return f_global, self.project(necked)


class _Members(nn.Module):
    """The sources' branches; as a backbone it returns the concatenated global features."""

    def __init__(self, members: Sequence[GridBranch]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.views(x)[0] for m in self.members if isinstance(m, GridBranch)], 1)


class LaCmferNet(Classifier):
    """The adapted model: every source's global and local branch; the more confident wins.

    ``head`` is the global classifier over the concatenated global features (the
    mean of the sources' global logits); the local logits are the mean of the
    sources' ``C_L`` logits. ``forward`` returns the logits of the branch whose top
    softmax probability is higher (ties: global) and the global features.
    """

    backbone: _Members

    def __init__(self, members: Sequence[GridBranch], head: nn.Linear) -> None:
        super().__init__(_Members(members), head)

    @property
    def members(self) -> Sequence[GridBranch]:
        return [m for m in self.backbone.members if isinstance(m, GridBranch)]

    def branch_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(global logits, local logits, global features)`` of the ensemble."""
        feats, local = [], []
        for m in self.members:
            f_global, projected = m.views(x)
            feats.append(f_global)
            local.append(m.local_logits(projected))
        features = torch.cat(feats, dim=1)
        z_local = local[0] if len(local) == 1 else torch.stack(local).mean(dim=0)
        return self.head(features), z_local, features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_global, z_local, features = self.branch_logits(x)
        conf_g = torch.softmax(z_global, dim=1).amax(dim=1, keepdim=True)
        conf_l = torch.softmax(z_local, dim=1).amax(dim=1, keepdim=True)
        return torch.where(conf_l > conf_g, z_local, z_global), features


@torch.no_grad()
def ensemble_head(heads: Sequence[nn.Linear]) -> nn.Linear:
    """One linear layer on the concatenated features = the mean of the heads' logits."""
    n = len(heads)
    out = nn.Linear(sum(h.in_features for h in heads), heads[0].out_features)
    out.weight.copy_(torch.cat([h.weight.detach().cpu() for h in heads], dim=1) / n)
    out.bias.copy_(torch.stack([h.bias.detach().cpu() for h in heads]).mean(dim=0))
    return out.to(heads[0].weight.device)


def encode_architecture(archs: Sequence[str]) -> str:
    """``la-cmfer.<arch>...`` with runs written ``<arch>-x<count>`` (e.g. ``smallcnn-x2``).

    Raises:
        ConfigError: the name would exceed the 64 characters a manifest allows.
    """
    parts: list[str] = []
    i = 0
    while i < len(archs):
        j = i
        while j < len(archs) and archs[j] == archs[i]:
            j += 1
        parts.append(archs[i] if j - i == 1 else f"{archs[i]}-x{j - i}")
        i = j
    name = ".".join([FAMILY, *parts])
    if not NAME_RE.match(name):
        raise ConfigError(
            f"the exported architecture name {name!r} is too long",
            "a manifest's architecture name has at most 64 characters",
            "pass fewer source packages or group those of the same architecture",
        )
    return name


def decode_architecture(name: str) -> list[str]:
    """Inverse of :func:`encode_architecture`.

    Raises:
        PackageError: not a ``la-cmfer.`` name or a malformed run.
    """
    prefix, _, rest = name.partition(".")
    if prefix != FAMILY or not rest:
        raise PackageError(f"{name!r} is not an LA-CMFER architecture", "", "re-export it")
    archs: list[str] = []
    for part in rest.split("."):
        arch, sep, count = part.rpartition("-x")
        if sep and count.isdigit() and arch and int(count) >= 1:
            archs += [arch] * int(count)
        else:
            archs.append(part)
    return archs


def _member(model: Classifier, arch: str) -> tuple[GridBranch, nn.Linear]:
    trunk, neck = feature_map_split(model.backbone, arch)
    head = model.head
    return GridBranch(trunk, neck, head.in_features, head.out_features), head


def build_from_spec(spec: ArchitectureSpec) -> Classifier:
    """A randomly initialised :class:`LaCmferNet` for an ``la-cmfer.*`` architecture."""
    members, heads = [], []
    for arch in decode_architecture(spec.name):
        member, head = _member(build_classifier(arch, spec.num_classes, spec.in_channels), arch)
        members.append(member)
        heads.append(head)
    return LaCmferNet(members, ensemble_head(heads))


register_architecture_family(FAMILY, build_from_spec)


# --- the method --------------------------------------------------------------------------


class _Views(NamedTuple):
    z_global: torch.Tensor
    z_local: torch.Tensor
    f_global: torch.Tensor
    f_local: torch.Tensor
    """Cell average of the A_L outputs (aligned to the vendor's means)."""


@register_method("la-cmfer")
class LaCmfer(Method):
    """LA-CMFER source-free: global + 2x2-grid local branches, alignment to vendor means."""

    description = (
        "LA-CMFER: global + 2x2-grid local branches, hardness-weighted MMD to vendor class "
        "means, multi-view consistency and voting; one or more sources (Yang et al. 2024)"
    )
    config_class = LaCmferConfig
    min_sources = 1
    max_sources = 8
    relative_cost = 3.0  # five branches (global + 2x2 grid) per image
    config: LaCmferConfig

    def __init__(self, config: LaCmferConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        labels = context.labels
        members: list[GridBranch] = []
        heads: list[nn.Linear] = []
        self._archs: list[str] = []
        self._means: list[torch.Tensor | None] = []
        self._priors: list[torch.Tensor] = []
        k = context.num_classes
        for i, src in enumerate(context.sources):
            manifest = src.package.manifest
            if manifest.labels != labels:
                raise ConfigError(
                    f"source package {manifest.name!r} has other labels",
                    "all sources must share labels in the same order",
                    "use packages exported for the same classes",
                )
            arch = manifest.architecture.name
            member, head = _member(src.model, arch)
            if config.local_init == "source":
                member.init_from_head(head)
            else:
                member.init_random(context.seed * 1009 + i)
            members.append(member)
            heads.append(head)
            self._archs.append(arch)
            self._means.append(self._vendor_means(src.package.manifest, member.feature_dim))
            self._priors.append(self._vendor_prior(manifest.source_stats, k))
        self.export_name = encode_architecture(self._archs)
        self.global_heads = nn.ModuleList(heads).to(context.device)
        self.net = LaCmferNet(members, ensemble_head(heads)).to(context.device)
        self._voted = (0, 0)
        self._agreed = 0
        """Training images whose branches agreed on the argmax (eq. 12's condition (i))."""

    # --- vendor statistics ------------------------------------------------------------

    def _vendor_means(self, manifest: Manifest, dim: int) -> torch.Tensor | None:
        stats, name = manifest.source_stats, manifest.name
        means = None if stats is None else stats.class_feature_means
        if means is None:
            warnings.warn(
                f"la-cmfer: source package {name!r} has no source_stats.class_feature_means; "
                "its sample- and cluster-level alignment (eq. 5-9) is skipped",
                UserWarning,
                stacklevel=3,
            )
            return None
        if len(means[0]) != dim:
            raise PackageError(
                f"source package {name!r}: class_feature_means rows have {len(means[0])} "
                f"values, the model's features have {dim}",
                "the statistics belong to another model",
                "ask the vendor to export the means of this model's features",
            )
        return torch.tensor(means, dtype=torch.float32, device=self.context.device)

    def _vendor_prior(self, stats: SourceStats | None, k: int) -> torch.Tensor:
        counts = None if stats is None else stats.class_counts
        if counts is None or sum(counts) <= 0:
            prior = torch.full((k,), 1.0 / k)
        else:
            prior = torch.tensor([float(c) for c in counts])
            prior = prior / prior.sum()
        return prior.to(self.context.device)

    # --- what trains ------------------------------------------------------------------

    def _parameters(self) -> list[ParamGroup]:
        cfg = self.config
        backbone: list[nn.Parameter] = []
        local: list[nn.Parameter] = []
        for m in self.net.members:
            backbone += [*m.trunk.parameters(), *m.neck.parameters()]
            local += [*m.local_proj.parameters(), *m.local_head.parameters()]
        if cfg.train_global_head:
            local += list(self.global_heads.parameters())
        return [
            ParamGroup(backbone, lr_scale=cfg.optim.backbone_lr_scale),
            ParamGroup(local, lr_scale=1.0),
        ]

    def _train_mode(self) -> None:
        self.net.train()

    def _leave(self) -> None:
        self._sync_head()
        self.net.eval()

    @torch.no_grad()
    def _sync_head(self) -> None:
        head = ensemble_head(list(self._heads()))
        self.net.head.weight.copy_(head.weight)
        self.net.head.bias.copy_(head.bias)

    def _heads(self) -> list[nn.Linear]:
        return [h for h in self.global_heads if isinstance(h, nn.Linear)]

    # --- loss -------------------------------------------------------------------------

    def _views(self, x: torch.Tensor) -> list[_Views]:
        out = []
        for member, head in zip(self.net.members, self._heads(), strict=True):
            f_global, projected = member.views(x)
            out.append(
                _Views(head(f_global), member.local_logits(projected), f_global, projected.mean(1))
            )
        return out

    def _inter(self, n: int, v: _Views) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Eq. 9 for source ``n``: (L_sid^G + L_sid^L, L_cid^G + L_cid^L, classes used)."""
        means = self._means[n]
        zero = v.f_global.sum() * 0.0
        if means is None:
            return zero, zero, 0
        cfg = self.config
        member, head = self.net.members[n], self._heads()[n]
        local_means, mean_logits_l = member.mean_view(means)
        sid, cid, used = zero, zero, 0
        for feats, logits, mus, mean_logits in (
            (v.f_global, v.z_global, means, head(means)),
            (v.f_local, v.z_local, local_means, mean_logits_l),
        ):
            terms = alignment_losses(
                feats,
                torch.softmax(logits.float(), dim=1),
                mus,
                torch.softmax(mean_logits.float(), dim=1),
                self._priors[n],
                epsilon=cfg.epsilon,
                kernel_mul=cfg.kernel_mul,
                kernel_num=cfg.kernel_num,
            )
            sid, cid, used = sid + terms.sid, cid + terms.cid, used + terms.classes
        return sid, cid, used

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 14 without L_sup on a batch of (augmented) target images, and its parts."""
        cfg = self.config
        views = self._views(x)
        n_src = len(views)
        z_g = views[0].z_global if n_src == 1 else torch.stack([v.z_global for v in views]).mean(0)
        z_l = views[0].z_local if n_src == 1 else torch.stack([v.z_local for v in views]).mean(0)
        labels, selected = multi_view_vote(
            torch.softmax(z_g.float(), 1), torch.softmax(z_l.float(), 1), cfg.tau
        )
        share = selected.float().mean()
        total = z_g.sum() * 0.0
        parts = {k: total.detach().clone() for k in ("sid", "cid", "mcc", "mvv")}
        for n, v in enumerate(views):
            p_g, p_l = torch.softmax(v.z_global.float(), 1), torch.softmax(v.z_local.float(), 1)
            mcc = multiview_consistency_loss(p_g, p_l)
            mvv = (margin_ce_im(v.z_global, labels).ce + margin_ce_im(v.z_local, labels).ce) * share
            loss = cfg.beta * mcc + cfg.gamma * mvv
            sid, cid, _ = self._inter(n, v) if cfg.alpha > 0 else (total, total, 0)
            loss = loss + cfg.alpha * (sid + cfg.lambda_cid * cid)
            total = total + loss
            for key, val in (("sid", sid), ("cid", cid), ("mcc", mcc), ("mvv", mvv)):
                parts[key] = parts[key] + val.detach()
        parts["voted"] = share.detach()
        parts["agreed"] = (z_g.detach().argmax(1) == z_l.detach().argmax(1)).float().mean()
        return total, parts

    def _step(self, batch: Batch) -> StepOutput:
        aug = self.config.augment
        x = augment_flip_shift(batch.x, aug.shift, batch.generator) if aug.enabled else batch.x
        loss, parts = self.losses(x)
        voted, seen = self._voted
        self._voted = (voted + round(parts["voted"].item() * x.shape[0]), seen + x.shape[0])
        self._agreed += round(parts["agreed"].item() * x.shape[0])
        return StepOutput(loss, parts)

    # --- Method -----------------------------------------------------------------------

    def phases(self) -> Sequence[Phase]:
        cfg = self.config
        opt = cfg.optim
        init = (
            self.bn_statistics_phases(self.net, cfg.label_batch_size, name="target-bn")
            if cfg.target_bn_init
            else []
        )
        return [
            *init,
            Phase(
                name="adapt",
                epochs=cfg.epochs,
                step=self._step,
                batch_size=cfg.batch_size,
                parameters=self._parameters,
                optimizer=opt.optimizer(),
                schedule=opt.schedule(),
                on_enter=self._train_mode,
                on_phase_end=self._leave,
            ),
        ]

    def modules(self) -> Mapping[str, nn.Module]:
        return {"net": self.net, "global_heads": self.global_heads}

    def export_model(self) -> Classifier:
        self._sync_head()
        return self.net.eval()

    def export_architecture(self) -> str:
        return self.export_name

    def state_meta(self) -> dict[str, JSON]:
        return {"voted": list(self._voted), "agreed": self._agreed}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, JSON]) -> None:
        voted = meta.get("voted")
        if isinstance(voted, list) and len(voted) == 2:
            self._voted = (int(voted[0]), int(voted[1]))
        agreed = meta.get("agreed")
        if isinstance(agreed, int):
            self._agreed = agreed

    @torch.no_grad()
    def pseudo_label_selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Eq. 12's vote of the final model on the un-augmented images (eval mode)."""
        was_training = self.net.training
        self._sync_head()
        self.net.eval()
        labels = []
        for _, x in self.context.data.batches(self.config.label_batch_size):
            z_g, z_l, _ = self.net.branch_logits(x.to(self.context.device))
            labels.append(
                multi_view_vote(torch.softmax(z_g, 1), torch.softmax(z_l, 1), self.config.tau)[0]
            )
        self.net.train(was_training)
        all_labels = torch.cat(labels).cpu()
        idx = torch.nonzero(all_labels >= 0).flatten()
        return idx, all_labels[idx]

    def report(self) -> dict[str, JSON]:
        voted, seen = self._voted
        return {
            "sources": len(self._archs),
            "architecture": self.export_name,
            "aligned_sources": [m is not None for m in self._means],
            "voted_share_in_training": round(voted / seen, 4) if seen else None,
            "agreed_share_in_training": round(self._agreed / seen, 4) if seen else None,
            "local_init": self.config.local_init,
        }
