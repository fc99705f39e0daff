"""Vendor-side supervised training of a source model on in-memory images.

Used by the demo, the examples and the benchmarks. After training, BatchNorm
statistics are re-estimated on the training images in eval-free passes
("precise BN"): the running averages of the last steps are biased, and an
un-recalibrated source model under-reports its own accuracy and inflates the
gains of AdaBN-style adaptation (research notes, data.md pitfall 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sourcefree.data.imaging import normalise, rgb_to_grey
from sourcefree.engine.models import (
    Architecture,
    Classifier,
    build_classifier,
    first_conv_channels,
    from_vendor_state,
    get_architecture,
)
from sourcefree.errors import ConfigError, PackageError
from sourcefree.ops.augment import (
    affine_sample,
    color_jitter,
    from_unit,
    grey,
    resized_crop_theta,
    to_unit,
)
from sourcefree.package.manifest import InputSpec


@dataclass(frozen=True)
class TrainConfig:
    """Supervised source training: AdamW with a one-cycle schedule.

    Defaults reach 0.98 validation accuracy on 5000 ``studio`` faces at 32 px
    in 6 epochs (benchmarks/synthetic_baselines.py).
    """

    arch: str | Architecture = "smallcnn"
    """A registered name, or a resolved one (``resolve_architecture("timm:NAME", options)``)."""
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
    robust: bool = False
    """Generic photometric robustness augmentation (:func:`robust_augment`): crop,
    colour jitter, grey, noise, blur. :func:`train_au_detector` turns it on."""


def to_tensor(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 NHWC RGB at the spec's size -> normalised float32 NCHW, as the runtime makes it.

    Grey specs convert with :func:`~sourcefree.data.imaging.rgb_to_grey` (Pillow's
    ``L``, the runtime's conversion) before :func:`~sourcefree.data.imaging.normalise`,
    so a vendor model trains on exactly the tensors it is served.

    Raises:
        InputError: not uint8 NHWC with 3 channels (or 1 for a grey spec).
    """
    if spec.color == "gray" and images.ndim == 4 and images.shape[-1] == 3:
        images = rgb_to_grey(images)
    return torch.from_numpy(normalise(images, spec))


def robust_augment(x: torch.Tensor, spec: InputSpec, gen: torch.Generator) -> torch.Tensor:
    """Generic robustness augmentation of normalised images (a batch at once).

    Random resized crop (area 0.7-1, with flips), colour jitter 0.4 / hue 0.1 with
    probability 0.8, grey-scale with probability 0.5, Gaussian pixel noise with a
    per-image sigma in [0, 0.08], and a 3x3 box blur with probability 0.5. These are
    the usual augmentations of detectors meant to work on photos from unknown
    cameras; none is tuned to a particular target domain.
    """
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    n = x.shape[0]
    unit = affine_sample(to_unit(x, mean, std), resized_crop_theta(n, (0.7, 1.0), gen), x.shape[-1])
    unit = color_jitter(unit, gen, 0.4, 0.1, 0.8)
    to_grey = (torch.rand(n, generator=gen) < 0.5).view(-1, 1, 1, 1)
    unit = torch.where(to_grey, grey(unit), unit)
    sigma = 0.08 * torch.rand(n, 1, 1, 1, generator=gen)
    unit = (unit + sigma * torch.randn(unit.shape, generator=gen)).clamp(0.0, 1.0)
    blur = (torch.rand(n, generator=gen) < 0.5).view(-1, 1, 1, 1)
    padded = nn.functional.pad(unit, (1, 1, 1, 1), mode="replicate")
    unit = torch.where(blur, nn.functional.avg_pool2d(padded, 3, 1), unit)
    return from_unit(unit, mean, std)


def _augment(
    x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, spec: InputSpec
) -> torch.Tensor:
    if cfg.robust:
        x = robust_augment(x, spec, gen)
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
    y = torch.from_numpy(labels.astype(np.int64))
    model = build_classifier(cfg.arch, num_classes, spec.channels)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    _fit(model, to_tensor(images, spec), y, loss_fn, spec, cfg)
    return model.eval()


def _fit(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    spec: InputSpec,
    cfg: TrainConfig,
) -> None:
    """AdamW + one-cycle over ``cfg.epochs`` shuffled passes, then precise BN."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, x.shape[0] // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            logits, _ = model(_augment(x[idx], cfg, gen, spec))
            loss = loss_fn(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    recalibrate_batchnorm(model, x)
    model.eval()


class AUDetectorNet(nn.Module):
    """An action-unit detector: a registered architecture with one logit per AU, then a sigmoid.

    ``forward`` returns AU probabilities in [0, 1], shape (N, num AUs): what
    :func:`sourcefree.export.source_package` (``au_detector=``) exports to ONNX.
    """

    def __init__(self, net: Classifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.net(x)
        return torch.sigmoid(logits)


def au_detector_from_state(
    arch: str | Architecture,
    state: Mapping[str, torch.Tensor],
    num_aus: int,
    in_channels: int = 3,
) -> AUDetectorNet:
    """An AU detector from saved weights (what ``sourcefree export --au-detector`` reads).

    ``state`` is either the architecture's own ``state_dict()`` with one output per AU
    (as ``export --weights``; its logits get a sigmoid), or the ``state_dict()`` of an
    :class:`AUDetectorNet` (what :func:`train_au_detector` returns; keys ``net.*``).
    The detector takes the classifier's input (``in_channels``); eval mode.

    Raises:
        ConfigError: the detector has another number of outputs than ``num_aus``.
        PackageError: the weights belong to another architecture or channel count.
    """
    a = get_architecture(arch) if isinstance(arch, str) else arch
    wrapped = any(k.startswith("net.") for k in state)
    head = state.get("net.head.weight" if wrapped else f"{a.head_path}.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != num_aus:
        raise ConfigError(
            f"the AU detector has {head.shape[0]} outputs but {num_aus} AU names were given",
            "each output is one action unit, named in output order",
            f"name all {head.shape[0]} outputs, or pass the matching detector",
        )
    if not wrapped:
        channels = first_conv_channels(a, state)
        if channels != in_channels:
            raise PackageError(
                f"the AU detector takes {channels}-channel input, the classifier {in_channels}",
                "the detector runs on the classifier's input",
                "train the detector on the same input (colour or grey) as the classifier",
            )
        return AUDetectorNet(from_vendor_state(a, state, num_aus, in_channels)).eval()
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise PackageError(
            f"the AU detector's tensor {bad[0]!r} contains NaN or Inf",
            "a detector with non-finite weights finds nothing",
            "retrain or fix the detector",
        )
    detector = AUDetectorNet(build_classifier(a, num_aus, in_channels))
    expected = detector.state_dict()
    wrong = sorted(set(expected) ^ set(state)) or [
        k for k, t in expected.items() if tuple(state[k].shape) != tuple(t.shape)
    ]
    if wrong:
        raise PackageError(
            f"the AU detector's weights do not match {a.name} with {num_aus} outputs "
            f"and {in_channels} input channels (first mismatch: {wrong[0][:80]!r})",
            "the tensor names or shapes come from another architecture",
            "pass the state_dict() of a detector of that architecture (--au-arch)",
        )
    detector.load_state_dict(dict(state), strict=True)
    return detector.eval()


def train_au_detector(
    images: np.ndarray,
    aus: np.ndarray,
    spec: InputSpec,
    cfg: TrainConfig = TrainConfig(robust=True),
) -> AUDetectorNet:
    """Train an action-unit detector from scratch on AU annotations; return it in eval mode.

    Binary cross-entropy of one sigmoid per AU against the annotated intensities
    in [0, 1] (soft targets), with the classifier's optimiser and schedule. The
    default turns on :func:`robust_augment`: the detector is meant to work on the
    customer's photos, whatever their camera (the AdaFER paper's detector was
    pre-trained on a large in-the-wild AU dataset).

    Args:
        images: uint8 (N, H, W, 3) RGB at the spec's size.
        aus: float (N, num AUs) AU intensities or 0/1 occurrences in [0, 1].
        spec: the input spec the package will declare (shared with the classifier).
        cfg: training settings (``arch``, epochs, lr, ``robust``, ...).
    """
    a = np.asarray(aus, dtype=np.float32)
    if images.ndim != 4 or a.ndim != 2 or images.shape[0] != a.shape[0] or a.shape[0] == 0:
        raise ConfigError(
            f"training images of shape {images.shape} and AU annotations of shape {a.shape}",
            "expected (N, H, W, 3) images with one row of AU values each",
            "pass matching arrays",
        )
    if not bool(np.isfinite(a).all()) or a.min() < 0.0 or a.max() > 1.0:
        raise ConfigError(
            "AU annotations outside [0, 1]",
            "they are the detector's sigmoid targets",
            "scale intensities to [0, 1] (FACS A-E intensities: divide by 5)",
        )
    torch.manual_seed(cfg.seed)
    net = build_classifier(cfg.arch, a.shape[1], spec.channels)
    _fit(net, to_tensor(images, spec), torch.from_numpy(a), nn.BCEWithLogitsLoss(), spec, cfg)
    return AUDetectorNet(net).eval()


@torch.no_grad()
def detect_aus(detector: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Eval-mode AU probabilities (N, num AUs) of normalised images ``x``, in batches."""
    detector.eval()
    parts = [detector(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(parts).float().numpy()


def au_frequencies(
    aus: np.ndarray, labels: np.ndarray, num_classes: int, threshold: float = 0.5
) -> list[list[float]]:
    """Per-class AU frequencies for ``source_stats.au_frequencies`` (an aggregate).

    ``F[c][a]`` is the fraction of the class-``c`` images whose AU ``a`` is active,
    i.e. ``aus[i, a] >= threshold`` (the detector's ``au_threshold`` in the
    package). A class without images gets zeros. As in the AdaFER paper (Sec. 3.2)
    the AUs should come from the same detector that runs on the customer's images
    (:func:`detect_aus` on the training images), so both sides share its biases.
    """
    a = np.asarray(aus)
    y = np.asarray(labels).astype(np.int64)
    if a.ndim != 2 or y.shape != (a.shape[0],) or not 0.0 < threshold < 1.0:
        raise ConfigError(
            f"AU values of shape {a.shape}, labels of shape {y.shape}, threshold {threshold}",
            "expected (N, num AUs) values, N labels and a threshold in (0, 1)",
            "pass matching arrays",
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"labels outside [0, {num_classes})", "they index the classes", "fix the labels"
        )
    active = (a >= threshold).astype(np.float64)
    sums = np.zeros((num_classes, a.shape[1]))
    np.add.at(sums, y, active)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    freqs = sums / np.maximum(counts, 1.0)[:, None]
    return [[float(v) for v in row] for row in freqs]


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
