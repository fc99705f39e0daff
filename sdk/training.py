"""Vendor-side supervised training of a source model on in-memory images.

Used by the demo, the examples and the benchmarks. After training, BatchNorm
statistics are re-estimated on the training images in eval-free passes
("precise BN"): the running averages of the last steps are biased, and an
un-recalibrated source model under-reports its own accuracy and inflates the
gains of AdaBN-style adaptation (research notes, data.md pitfall 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sourcefree.errors import ConfigError
from sourcefree.manifest import InputSpec
from sourcefree.models import Classifier, build_classifier


@dataclass(frozen=True)
class TrainConfig:
    """Supervised source training: AdamW with a one-cycle schedule.

    Defaults reach 0.98 validation accuracy on 5000 ``studio`` faces at 32 px
    in 6 epochs (benchmarks/synthetic_baselines.py).
    """

    arch: str = "smallcnn"
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    """Peak learning rate of the one-cycle schedule."""
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    flip: bool = False
    """Random horizontal flips (faces are left-right symmetric)."""
    shift: int = 0
    """Random translation by up to this many pixels."""


def to_tensor(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 NHWC (RGB) -> normalised float32 NCHW following the input spec."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if spec.color == "gray":
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x * weights).sum(1, keepdim=True)
        if spec.channels == 3:
            x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.flip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if cfg.shift > 0:
        pad = cfg.shift
        padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return x


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256, momentum: float = 0.1
) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over ``x``.

    Running stats are reset and accumulated with ``momentum=None`` (a
    cumulative mean) over full batches only, then momentum is restored so later
    adaptation does not keep mixing in these statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    n = x.shape[0]
    usable = max(batch_size, n - n % batch_size) if n >= batch_size else n
    for start in range(0, usable, batch_size):
        model(x[start : start + batch_size])
    for bn in bns:
        bn.momentum = momentum
    model.train(was_training)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    spec: InputSpec,
    cfg: TrainConfig = TrainConfig(),
) -> Classifier:
    """Train a registered architecture from scratch; return it in eval mode.

    Args:
        images: uint8 (N, H, W, 3) RGB at the spec's size.
        labels: int64 (N,) class indices.
        num_classes: number of classes.
        spec: the input spec the package will declare.
        cfg: training settings.
    """
    if images.ndim != 4 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ConfigError(
            f"training images of shape {images.shape} and {labels.shape[0]} labels",
            "expected (N, H, W, 3) images with one label each",
            "pass matching arrays",
        )
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = to_tensor(images, spec)
    y = torch.from_numpy(labels.astype(np.int64))
    model = build_classifier(cfg.arch, num_classes, spec.channels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, x.shape[0] // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            logits, _ = model(_augment(x[idx], cfg, gen))
            loss = loss_fn(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    recalibrate_batchnorm(model, x)
    return model.eval()


@torch.no_grad()
def predict_logits(model: Classifier, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Eval-mode logits in batches."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size])[0] for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def class_feature_means(
    model: Classifier, x: torch.Tensor, labels: np.ndarray, num_classes: int
) -> list[list[float]]:
    """Per-class mean of the ``features`` output: an aggregate the vendor may ship."""
    model.eval()
    feats = torch.cat([model(x[i : i + 512])[1] for i in range(0, x.shape[0], 512)])
    y = torch.from_numpy(labels.astype(np.int64))
    sums = torch.zeros(num_classes, feats.shape[1]).index_add_(0, y, feats)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).unsqueeze(1)
    means: list[list[float]] = (sums / counts).tolist()
    return means
