"""Label-free model selection and the do-no-harm gate.

The customer has no labels, so every choice made on site (a method, its K or
Q, its number of epochs, and whether to ship the adapted model at all) must
come from the target images alone. This module scores a model on the target
images without labels:

- ``entropy``: mean Shannon entropy of the softmax (lower: more confident).
- ``im``: information maximisation, ``H(mean_i p_i) - mean_i H(p_i)``: the
  negative of SHOT's IM loss (Liang et al., ICML 2020); high when predictions
  are individually confident and globally diverse. In ``[0, log C]``.
- ``snd``: soft neighbourhood density (Saito et al., ICCV 2021, "Tune it the
  right way: unsupervised validation of domain adaptation via soft
  neighborhood density"): softmax outputs are L2-normalised, each image's
  cosine similarities to every other image go through a softmax at
  temperature 0.05, and SND is the mean entropy of those neighbour
  distributions. Higher is better (denser, well-clustered outputs).
- ``agreement``: share of images on which the model's top-1 equals the source
  model's; ``kappa``: the same corrected for chance (Cohen's kappa; below 0 the
  two models agree less than two independent predictors with their class
  frequencies would, as a model with permuted classes does).
- ``stability``: share of images whose top-1 survives a horizontal flip and a
  2-pixel shift (mean over the two views).
- ``atc``: Average Thresholded Confidence (Garg et al., ICLR 2022,
  "Leveraging unlabeled data to predict out-of-distribution performance"):
  the share of target images whose confidence exceeds the threshold the
  vendor fitted on its own validation images (``source_stats.calibration``,
  see :func:`calibrate`). It estimates the *source* model's target accuracy.
  For an adapted model the vendor's threshold is only an approximation:
  entropy-minimising methods make a model more confident without making it
  more accurate, so the adapted model's plain ATC reads high.
- ``anchored``: an accuracy estimate of an adapted model anchored on the
  calibrated source: the share of images where it agrees with a source
  prediction that ATC counts as correct, plus the share where it overrules a
  source prediction ATC counts as wrong. It uses the source's calibrated
  confidence only, so it is not inflated by the adapted model's own
  over-confidence; it is optimistic where the adapted model overrules the
  source (it counts all of those as right).

Candidates (of ``--select auto`` or ``-m auto``) are ranked as a pool by
:func:`rank_candidates`: with a calibration, when some candidate passes the
do-no-harm gate, the passing ones first, by ClassAMI; else by agreement with the
source; without one, by ``im``.

``adapt`` scores every model on the same seeded subsample of at most
:data:`GATE_SAMPLE` target images (:func:`sample_indices`, ``--gate-sample``);
:func:`standard_errors` gives each score's error on it.

Without a vendor calibration ``atc`` and ``anchored`` are unavailable
(``None``): no threshold is ever fitted on the target data, which would need
labels. Target labels never enter anything here.

The module imports torch; ``sourcefree.pipeline.adaptation`` imports it lazily.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from sourcefree.data.progress import progress_bar
from sourcefree.errors import ConfigError
from sourcefree.package.manifest import Calibration, InputSpec
from sourcefree.pipeline.report import GATE_Z as GATE_Z
from sourcefree.pipeline.report import STABILITY_SAMPLE as STABILITY_SAMPLE
from sourcefree.pipeline.report import view_stride

if TYPE_CHECKING:
    from sourcefree.engine.method import TargetData

ConfidenceScore = Literal["max_softmax", "neg_entropy"]
#: Confidence score of ATC estimates (ATC-NE: the best variant in Garg et al. 2022).
ATC_SCORE: ConfidenceScore = "neg_entropy"
#: Temperature of SND (Saito et al. 2021, Sec. 3).
SND_TEMPERATURE = 0.05
#: SND is computed on at most this many images (a seeded subset above it): O(N^2).
SND_MAX_SAMPLES = 8192
#: Pixels of the shifted view of :func:`augmentation_stability`.
STABILITY_SHIFT = 2

#: The gate and the label-free scores of ``adapt`` look at this many target images
#: at most (a seeded random subsample above it; ``adapt --gate-sample``). At 2,048 the
#: gate's standard error on the estimated gain is at most 0.022 (0.010 when a fifth of
#: the predictions change); docs/selection.md "Cost and subsample" has the measurement.
GATE_SAMPLE = 2048
#: Candidates' features kept for ClassAMI: at most this many scored images (every k-th).
CLASS_AMI_SAMPLE = 2048
#: The smallest subsample (SND needs a neighbour); 0 means every image.
GATE_SAMPLE_MIN = 2


def gate_sample_size(value: int | str | None) -> int:
    """The subsample size of ``--gate-sample``: a count, ``0`` or ``all`` (every image: 0).

    None is the default, :data:`GATE_SAMPLE`.

    Raises:
        ConfigError: not a whole number, negative, or 1.
    """
    if value is None:
        return GATE_SAMPLE
    size: int | None = None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "all":
            return 0
        if 0 < len(text) <= 18 and text.isascii() and text.isdigit():
            size = int(text)
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        size = int(value)
    if size is None or size < 0 or 0 < size < GATE_SAMPLE_MIN:
        shown = repr(value[:20]) if isinstance(value, str) else repr(value)[:20]
        raise ConfigError(
            f"--gate-sample {shown}",
            f"the gate's subsample is a whole number of images, 0 or at least "
            f"{GATE_SAMPLE_MIN} (0 or 'all': every image)",
            f"pass e.g. --gate-sample {GATE_SAMPLE} (the default) or --gate-sample all",
        )
    return size


def sample_indices(n: int, size: int, seed: int) -> np.ndarray | None:
    """The gate's subsample of ``n`` target images: ``size`` sorted indices, or None (all).

    None when ``size`` is 0 or at least ``n``: every image is scored, in order,
    exactly as without a subsample. Otherwise a uniform random subset drawn from
    its own generator seeded with ``seed`` (the global RNG is untouched), so every
    model and candidate of a run, and a resumed run, scores the same images.
    """
    if size < 0 or n < 0:
        raise ConfigError(f"a subsample of {size} of {n} images", "sizes are not negative", "")
    if size == 0 or n <= size:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=gen)[:size]
    return np.sort(chosen.numpy()).astype(np.int64)


#: Score names and whether higher is better.
HIGHER_IS_BETTER: Mapping[str, bool] = {
    "entropy": False,
    "im": True,
    "snd": True,
    "agreement": True,
    "kappa": True,
    "stability": True,
    "atc": True,
    "anchored": True,
}


# --- model outputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """A model's outputs on the target images (CPU, float32)."""

    logits: torch.Tensor
    """(N, C) logits of the un-augmented images."""
    view_predictions: tuple[torch.Tensor, ...] = ()
    """(M,) top-1 of each augmented view (flip, shift), when computed."""
    view_rows: torch.Tensor | None = None
    """(M,) rows of ``logits`` whose views were scored; None: every row (M = N)."""
    features: torch.Tensor | None = None
    """(K, D) penultimate features of rows ``feature_rows`` (ClassAMI), when asked for."""
    feature_rows: torch.Tensor | None = None
    """(K,) rows of ``logits`` with features; None: every row (K = N)."""

    @property
    def predictions(self) -> torch.Tensor:
        """(N,) top-1 class of each image."""
        return self.logits.argmax(1)

    def rows(self, indices: np.ndarray | torch.Tensor) -> Outputs:
        """These outputs on a subset of the images (views scored on every image only)."""
        if self.view_rows is not None or self.feature_rows is not None:
            raise ConfigError(
                "a subset of outputs whose views or features cover only some images",
                "the subset's views or features would not match its images",
                "score the views and features of every image (view_images=0, feature_images=0)",
            )
        idx = torch.as_tensor(indices).long()
        feats = None if self.features is None else self.features[idx]
        return Outputs(self.logits[idx], tuple(v[idx] for v in self.view_predictions), None, feats)

    def feature_pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features, logits) of the rows with features; None without features."""
        if self.features is None:
            return None
        rows = self.logits if self.feature_rows is None else self.logits[self.feature_rows]
        return self.features, rows

    @property
    def view_base(self) -> torch.Tensor:
        """(M,) top-1 of the clean images whose views were scored."""
        base = self.predictions
        return base if self.view_rows is None else base[self.view_rows]


ArrayLike = Outputs | torch.Tensor | np.ndarray
"""Logits (N, C), or :class:`Outputs` holding them."""


def _views(x: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """The flipped and the shifted (replicate padding) view of a batch."""
    padded = nn.functional.pad(x, (shift, shift, shift, shift), mode="replicate")
    return [x.flip(3), padded[:, :, : x.shape[2], : x.shape[3]]]


def _batches(
    data: TargetData | torch.Tensor, batch_size: int, indices: torch.Tensor | None
) -> Iterator[torch.Tensor]:
    """Normalised image batches in order: every image, or those at ``indices``."""
    total = len(data) if indices is None else int(indices.numel())
    for start in range(0, total, batch_size):
        part: slice | torch.Tensor = (
            slice(start, start + batch_size)
            if indices is None
            else indices[start : start + batch_size]
        )
        yield data[part] if isinstance(data, torch.Tensor) else data.tensor(part)


def _index_tensor(indices: np.ndarray | torch.Tensor | None, n: int) -> torch.Tensor | None:
    if indices is None:
        return None
    idx = torch.as_tensor(indices)
    if idx.ndim != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ConfigError(
            f"image indices of dtype {idx.dtype} and shape {tuple(idx.shape)}",
            "the images to score are given as a 1-D integer array",
            "pass sample_indices(...) or None (every image)",
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ConfigError(
            f"image indices outside [0, {n})",
            "every index must name one of the target images",
            "pass sample_indices(...) of this target set",
        )
    return idx.long()


@torch.no_grad()
def model_outputs(
    model: nn.Module,
    data: TargetData | torch.Tensor,
    *,
    views: bool = True,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    indices: np.ndarray | torch.Tensor | None = None,
    view_images: int = 0,
    feature_images: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> Outputs:
    """Eval-mode logits of ``model`` on the images, and top-1 of flipped/shifted views.

    ``model`` returns ``(logits, features)`` (a :class:`~sourcefree.engine.models.Classifier`)
    or logits. ``data`` is a :class:`~sourcefree.engine.method.TargetData` or a normalised
    float tensor (N, C, H, W); ``indices`` the images to score, in that order (the
    gate's subsample, :func:`sample_indices`), or None for every image. With
    ``views`` each batch and its two views go through one forward pass of at most
    ``batch_size`` images in all, so memory stays that of one batch; ``view_images``
    > 0 scores the views of at most that many images, every k-th scored one
    (``Outputs.view_rows``). ``feature_images``: None keeps no features; else the
    penultimate features of a model returning ``(logits, features)`` are kept for at
    most that many scored images, every k-th one (0: all; ``Outputs.feature_rows``).
    The model's train/eval mode is restored afterwards. ``progress``: a
    bar named ``desc`` on stderr, in images (:mod:`sourcefree.data.progress`).
    """
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    idx = _index_tensor(indices, len(data))
    logits: list[torch.Tensor] = []
    preds: list[list[torch.Tensor]] = [[], []]
    feats: list[torch.Tensor] = []
    total = len(data) if idx is None else int(idx.numel())
    every = _view_stride(total, view_images) if views else 0
    f_every = 0 if feature_images is None else _view_stride(total, feature_images)

    def run(x: torch.Tensor, k: int, done: int) -> torch.Tensor:
        out = model(x.to(dev))
        first: torch.Tensor = out[0] if isinstance(out, (tuple, list)) else out
        if f_every and isinstance(out, (tuple, list)) and len(out) > 1:
            feats.append(out[1][:k][(-done) % f_every :: f_every].flatten(1).float().cpu())
        return first.float().cpu()

    per_pass = batch_size if not views else max(1, batch_size // (3 if every == 1 else 2))
    bar = progress_bar(total, desc, enabled=progress, unit="img")
    done = 0
    try:
        for x in _batches(data, per_pass, idx):
            k = x.shape[0]
            if views:
                picked = x[(-done) % every :: every]  # rows whose position is a multiple
                m = picked.shape[0]
                out = run(torch.cat([x, *_views(picked, STABILITY_SHIFT)]), k, done)
                logits.append(out[:k])
                preds[0].append(out[k : k + m].argmax(1))
                preds[1].append(out[k + m :].argmax(1))
            else:
                logits.append(run(x, k, done))
            done += k
            bar.update(k)
    finally:
        bar.close()
        model.train(was_training)
    if not logits:
        raise ConfigError("no target images to score", "the target set is empty", "")
    all_logits = torch.cat(logits)
    _check_finite(all_logits)
    return Outputs(
        logits=all_logits,
        view_predictions=tuple(torch.cat(p) for p in preds) if views else (),
        view_rows=torch.arange(0, total, every) if views and every > 1 else None,
        features=torch.cat(feats) if feats else None,
        feature_rows=torch.arange(0, total, f_every) if feats and f_every > 1 else None,
    )


def _view_stride(total: int, view_images: int) -> int:
    """Every how many scored images the views are scored (1: all)."""
    if view_images < 0:
        raise ConfigError(
            f"view_images={view_images}", "a count of images, 0 meaning all", "pass 0 or more"
        )
    return view_stride(total, view_images)


def _check_finite(logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ConfigError(
            f"logits of shape {tuple(logits.shape)}",
            "label-free scores need (N, C) logits with N >= 1 and C >= 2",
            "pass a model's logits on the target images",
        )
    if not bool(torch.isfinite(logits).all()):
        raise ConfigError(
            "the model's logits contain NaN or Inf",
            "no score is defined for a non-finite output",
            "check the model (a diverged adaptation?)",
        )


def checked_logits(value: ArrayLike) -> torch.Tensor:
    """Float logits of ``value`` (an :class:`Outputs` or an array), refused if not finite."""
    if isinstance(value, Outputs):
        return value.logits
    t = torch.as_tensor(value).float()
    _check_finite(t)
    return t


# --- scores ---------------------------------------------------------------------------


def _entropies(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=1)
    return -(logp.exp() * logp).sum(1)


def prediction_entropy(logits: ArrayLike) -> float:
    """Mean Shannon entropy (nats) of the softmax of ``logits``; lower is more confident."""
    return float(_entropies(checked_logits(logits)).mean())


def information_maximisation(logits: ArrayLike) -> float:
    """``H(mean_i p_i) - mean_i H(p_i)`` (nats): the negative of SHOT's IM loss.

    Liang et al., ICML 2020, Sec. 3.2 (``L_div - L_ent``, exact logs here, no
    ``+1e-5``). High for confident and class-diverse predictions; in ``[0, log C]``.
    """
    t = checked_logits(logits).double()
    mean_p = torch.softmax(t, dim=1).mean(0)
    h_mean = -float(torch.special.xlogy(mean_p, mean_p).sum())
    return h_mean - float(_entropies(t).mean())


def soft_neighbourhood_density(
    logits: ArrayLike,
    *,
    temperature: float = SND_TEMPERATURE,
    max_samples: int = SND_MAX_SAMPLES,
    seed: int = 0,
    chunk: int = 1024,
) -> float:
    """Soft neighbourhood density (Saito et al., ICCV 2021); higher is better.

    Softmax outputs are L2-normalised; row ``i`` of the cosine-similarity matrix,
    without the image itself, goes through ``softmax(s_ij / temperature)``; SND is
    the mean entropy of those rows. Above ``max_samples`` images a seeded random
    subset is scored (the matrix is N x N; computed in row chunks).
    """
    if temperature <= 0:
        raise ConfigError(f"SND temperature {temperature}", "must be positive", "")
    t = checked_logits(logits)
    n = t.shape[0]
    if n < 2:
        raise ConfigError("SND of fewer than 2 images", "every image needs a neighbour", "")
    if n > max_samples:
        gen = torch.Generator().manual_seed(seed)
        t = t[torch.randperm(n, generator=gen)[:max_samples]]
        n = max_samples
    f = nn.functional.normalize(torch.softmax(t.float(), dim=1), dim=1)
    total = 0.0
    for start in range(0, n, chunk):
        rows = f[start : start + chunk]
        sim = rows @ f.T / temperature
        idx = torch.arange(rows.shape[0])
        sim[idx, idx + start] = float("-inf")
        q = torch.softmax(sim, dim=1)
        total += float(-torch.special.xlogy(q, q).sum(1).double().sum())
    return total / n


def agreement(a: ArrayLike, b: ArrayLike) -> float:
    """Share of images with the same top-1 class under both models."""
    la, lb = checked_logits(a), checked_logits(b)
    if la.shape != lb.shape:
        raise ConfigError(
            f"outputs of shape {tuple(la.shape)} and {tuple(lb.shape)}",
            "agreement compares two models on the same images",
            "score both models on the same target set",
        )
    return float((la.argmax(1) == lb.argmax(1)).double().mean())


def cohen_kappa(a: ArrayLike, b: ArrayLike) -> float:
    """Cohen's kappa of two models' top-1 predictions: ``(p_o - p_e) / (1 - p_e)``.

    ``p_o`` is the agreement, ``p_e`` the agreement expected from the two
    prediction histograms alone. When both models predict one and the same class
    everywhere (``p_e = 1``) kappa is 1.
    """
    la, lb = checked_logits(a), checked_logits(b)
    observed = agreement(la, lb)
    c = la.shape[1]
    pa = torch.bincount(la.argmax(1), minlength=c).double() / la.shape[0]
    pb = torch.bincount(lb.argmax(1), minlength=c).double() / lb.shape[0]
    expected = float((pa * pb).sum())
    if expected >= 1.0 - 1e-12:
        return 1.0 if observed >= 1.0 - 1e-12 else 0.0
    return (observed - expected) / (1.0 - expected)


def augmentation_stability(outputs: Outputs) -> float:
    """Share of images whose top-1 is unchanged under each view (flip, shift), averaged."""
    if not outputs.view_predictions:
        raise ConfigError(
            "no augmented views were scored",
            "stability compares the top-1 of each image with its flipped and shifted views",
            "call model_outputs(..., views=True)",
        )
    base = outputs.view_base
    return float(np.mean([float((v == base).double().mean()) for v in outputs.view_predictions]))


def confidence(logits: ArrayLike, score: ConfidenceScore = ATC_SCORE) -> torch.Tensor:
    """Per-image confidence: maximum softmax probability, or negative entropy (float64)."""
    t = checked_logits(logits).double()
    if score == "max_softmax":
        return torch.softmax(t, dim=1).max(1).values
    if score == "neg_entropy":
        return -_entropies(t)
    raise ConfigError(f"unknown confidence score {score!r}", "use max_softmax or neg_entropy", "")


def fit_atc_threshold(conf: torch.Tensor | np.ndarray, accuracy: float) -> float:
    """The threshold ``t`` with ``mean(conf > t) == accuracy`` (up to one image).

    Garg et al. 2022, eq. 1: fitted on labelled *validation* images of the source
    domain (the vendor's), never on target images.
    """
    if not 0.0 <= accuracy <= 1.0 or math.isnan(accuracy):
        raise ConfigError(f"accuracy {accuracy}", "must be in [0, 1]", "")
    s = torch.as_tensor(conf).double().flatten().sort().values
    n = s.numel()
    if n == 0:
        raise ConfigError("no validation confidences", "ATC needs validation images", "")
    below = n - round(accuracy * n)  # images at or below t
    if below <= 0:
        return float(s[0]) - 1e-6 * max(1.0, abs(float(s[0])))
    if below >= n:
        return float(s[-1])
    return float((s[below - 1] + s[below]) / 2)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    spec: InputSpec | None = None,
    *,
    batch_size: int = 256,
) -> Calibration:
    """Vendor side: fit the ATC thresholds on labelled validation images of the source domain.

    Args:
        model: the model as it will be exported (eval mode is used).
        images: normalised float (N, C, H, W), or uint8 (N, H, W, 3) with ``spec``.
        labels: (N,) class indices.
        spec: the package's input spec (needed for uint8 images).

    The result goes into ``source_stats={"calibration": cal.to_dict(), ...}`` of
    :func:`sourcefree.export.source_package`; it holds two thresholds, an accuracy
    and a count (aggregates only). Use images the model was not trained on.
    """
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if spec is None:
            raise ConfigError(
                "uint8 validation images without an input spec",
                "the images must be normalised as the package will declare",
                "pass spec=InputSpec(...) or normalised float images",
            )
        from sourcefree.vendor.training import to_tensor

        x = to_tensor(images, spec)
    else:
        x = torch.as_tensor(images).float()
    y = torch.as_tensor(np.asarray(labels)).long().flatten()
    if x.shape[0] != y.shape[0] or y.numel() == 0:
        raise ConfigError(
            f"{x.shape[0]} validation images and {y.numel()} labels",
            "calibration needs one label per image",
            "pass matching arrays",
        )
    out = model_outputs(model, x, views=False, batch_size=batch_size)
    acc = float((out.predictions == y).double().mean())
    return Calibration(
        validation_accuracy=acc,
        validation_images=int(y.numel()),
        atc_max_softmax=fit_atc_threshold(confidence(out, "max_softmax"), acc),
        atc_neg_entropy=fit_atc_threshold(confidence(out, "neg_entropy"), acc),
    )


def atc_accuracy(
    logits: ArrayLike,
    calibration: Calibration,
    score: ConfidenceScore = ATC_SCORE,
) -> float:
    """ATC estimate of accuracy: the share of images whose confidence exceeds the threshold."""
    return float((confidence(logits, score) > calibration.threshold(score)).double().mean())


def anchored_accuracy(
    outputs: ArrayLike,
    source: ArrayLike,
    calibration: Calibration,
    score: ConfidenceScore = ATC_SCORE,
) -> float:
    """Accuracy estimate of a model anchored on the calibrated source model.

    ``mean(agree & source_ok) + mean(disagree & ~source_ok)`` with ``source_ok``
    the source's ATC indicator (confidence above the vendor's threshold): the
    source's ATC estimate, minus what the model changes where the source is
    (by ATC) right, plus what it changes where the source is wrong. Equals
    :func:`atc_accuracy` of the source for the source itself.
    """
    la, ls = checked_logits(outputs), checked_logits(source)
    if la.shape != ls.shape:
        raise ConfigError(
            f"outputs of shape {tuple(la.shape)} and {tuple(ls.shape)}",
            "the anchored estimate compares two models on the same images",
            "score both models on the same target set",
        )
    ok = confidence(ls, score) > calibration.threshold(score)
    agree = la.argmax(1) == ls.argmax(1)
    return float(((agree & ok) | (~agree & ~ok)).double().mean())


# --- a model's scores -------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """Label-free scores of one model on the target images (see the module docstring)."""

    entropy: float
    im: float
    snd: float
    agreement: float
    """With the source model (1.0 for the source itself)."""
    kappa: float
    """Cohen's kappa with the source model (1.0 for the source itself)."""
    stability: float | None
    atc: float | None
    """None without a vendor calibration."""
    anchored: float | None
    """None without a vendor calibration."""
    images: int
    """How many target images were scored."""

    def to_dict(self) -> dict[str, float | None]:
        return {
            "entropy": _round(self.entropy),
            "im": _round(self.im),
            "snd": _round(self.snd),
            "agreement": _round(self.agreement),
            "kappa": _round(self.kappa),
            "stability": _round(self.stability),
            "atc": _round(self.atc),
            "anchored": _round(self.anchored),
            "images": self.images,
        }


def _round(v: float | None) -> float | None:
    """Six significant digits (scores of tiny models can be ~1e-7 apart)."""
    return None if v is None else float(f"{float(v):.6g}")


def score_outputs(
    outputs: Outputs,
    source: Outputs,
    calibration: Calibration | None = None,
    *,
    score: ConfidenceScore = ATC_SCORE,
) -> Scores:
    """Every label-free score of ``outputs``, with ``source`` as the reference model."""
    return Scores(
        entropy=prediction_entropy(outputs),
        im=information_maximisation(outputs),
        snd=soft_neighbourhood_density(outputs),
        agreement=agreement(outputs, source),
        kappa=cohen_kappa(outputs, source),
        stability=augmentation_stability(outputs) if outputs.view_predictions else None,
        atc=None if calibration is None else atc_accuracy(outputs, calibration, score),
        anchored=(
            None if calibration is None else anchored_accuracy(outputs, source, calibration, score)
        ),
        images=int(outputs.logits.shape[0]),
    )


def _se(values: torch.Tensor) -> float:
    """Standard error of the mean of per-image values (population variance, as the gate)."""
    v = values.double()
    return float(v.std(unbiased=False) / math.sqrt(v.numel()))


def standard_errors(
    outputs: Outputs,
    source: Outputs,
    calibration: Calibration | None = None,
    *,
    score: ConfidenceScore = ATC_SCORE,
) -> dict[str, float | None]:
    """Standard error of each score of :func:`score_outputs` over the images scored.

    Each score that is a mean over images gets ``std / sqrt(n)`` of its per-image
    values (``im``: of its delta-method influence values); ``snd`` and ``kappa``
    are not such means and get None, as do scores that were not computed. The
    images are treated as draws from the target distribution, so on a subsample
    this is the subsample's error of the whole set's value.
    """
    la, ls = checked_logits(outputs).double(), checked_logits(source).double()
    probs = torch.softmax(la, dim=1)
    ent = _entropies(la)
    mean_p = probs.mean(0).clamp_min(torch.finfo(torch.float64).tiny)
    agree = (la.argmax(1) == ls.argmax(1)).double()
    out: dict[str, float | None] = {
        "entropy": _se(ent),
        "im": _se(-(probs @ (mean_p.log() + 1.0)) - ent),
        "snd": None,
        "agreement": _se(agree),
        "kappa": None,
        "stability": None,
        "atc": None,
        "anchored": None,
    }
    if outputs.view_predictions:
        base = outputs.view_base
        same = [(v == base).double() for v in outputs.view_predictions]
        out["stability"] = _se(torch.stack(same).mean(0))
    if calibration is not None:
        threshold = calibration.threshold(score)
        out["atc"] = _se((confidence(la, score) > threshold).double())
        ok = confidence(ls, score) > threshold
        same_top1 = agree.bool()
        out["anchored"] = _se(((same_top1 & ok) | (~same_top1 & ~ok)).double())
    return {k: _round(v) for k, v in out.items()}


# --- choosing among candidates, and the do-no-harm gate ------------------------------

#: ``adapt -m auto``: try the registered methods.
AUTO_METHOD = "auto"


def consensus_agreement(
    pool: Sequence[ArrayLike], voters: Sequence[bool] | None = None
) -> list[float]:
    """Each model's agreement with the pool's soft consensus.

    The consensus label of an image is the argmax of the summed softmax outputs of
    every model in ``pool`` (of those whose ``voters`` entry is true, when given);
    a model's value is the share of images on which its top-1 equals it. Agreement
    with an ensemble of similar models tracks accuracy (Jiang et al., ICLR 2022,
    "Assessing generalization of SGD via disagreement"): a model that drifts away
    from what the others agree on is more often wrong.
    """
    if not pool:
        raise ConfigError("no candidates to rank", "the pool is empty", "pass at least one")
    logits = [checked_logits(o) for o in pool]
    if len({tuple(t.shape) for t in logits}) != 1:
        raise ConfigError(
            "candidates of different output shapes",
            "the consensus compares models on the same images and classes",
            "score every candidate on the same target set",
        )
    if voters is not None and (len(voters) != len(logits) or not any(voters)):
        raise ConfigError(
            f"{sum(map(bool, voters))} voters of {len(voters)} for {len(logits)} models",
            "the consensus needs one flag per model and at least one voter",
            "pass a flag per model of the pool",
        )
    votes = logits if voters is None else [t for t, v in zip(logits, voters, strict=True) if v]
    vote = torch.stack([torch.softmax(t.double(), 1) for t in votes]).sum(0).argmax(1)
    return [float((t.argmax(1) == vote).double().mean()) for t in logits]


def class_ami_values(pool: Sequence[ArrayLike]) -> tuple[float, ...] | None:
    """Each model's ClassAMI on its kept features (None when one has none).

    ClassAMI (Musgrave et al. 2022, arXiv 2208.07360): adjusted mutual information
    of K-means clusters of the model's own features (K = C) and its predicted
    labels, :func:`sourcefree.pipeline.validators.class_ami`.
    """
    from sourcefree.pipeline.validators import class_ami

    pairs = [o.feature_pairs() if isinstance(o, Outputs) else None for o in pool]
    if any(p is None for p in pairs):
        return None
    return tuple(class_ami(f, t) for f, t in (p for p in pairs if p is not None))


#: How :func:`rank_candidates` ranked a pool (``consensus``: the rule before 2026-12-06).
RankRule = Literal["class_ami", "consensus", "agreement", "im"]


@dataclass(frozen=True)
class Ranking:
    """Label-free values of a pool of adapted candidates (higher is better)."""

    values: tuple[float, ...]
    """One per candidate, in the pool's order."""
    rule: RankRule
    """``class_ami``, ``consensus``, ``agreement`` (with the source) or ``im``."""
    reason: str
    """Why that rule (for the report)."""
    passing: tuple[bool, ...] = ()
    """Per candidate: whether it passes the do-no-harm gate (empty: not asked). A
    passing candidate ranks above every failing one, whatever the values."""

    def key(self, i: int) -> tuple[bool, float]:
        """Candidate ``i``'s sort key: passing first, then the value."""
        return (bool(self.passing[i]) if self.passing else True, self.values[i])

    def best(self) -> int:
        """Index of the highest key (the first on ties)."""
        return max(range(len(self.values)), key=lambda i: (*self.key(i), -i))


def rank_candidates(pool: Sequence[tuple[Scores, ArrayLike]], source: Scores) -> Ranking:
    """Rank adapted candidates of one target set without labels.

    ``pool`` holds each candidate's scores and outputs; ``source`` the source model's
    scores. With a vendor calibration the do-no-harm gate first asks whether
    adaptation helps on this target at all:

    - some candidate passes the gate (the shift is large enough for adaptation to
      be estimated better than the source): the passing candidates rank above the
      others, each by its ClassAMI (:func:`class_ami_values`); without features
      (a model returning logits only), by agreement with the pool's soft
      consensus (:func:`consensus_agreement`);
    - none passes (adaptation only moves the source, as under a pure class-prior
      shift): rank by agreement with the source model, so the candidate that
      changes least wins.

    Without a calibration: the information-maximisation score. docs/selection.md
    has the development-seed measurements behind these rules.
    """
    if not pool:
        raise ConfigError("no candidates to rank", "the pool is empty", "pass at least one")
    scores = [s for s, _ in pool]
    if source.anchored is None or any(s.anchored is None for s in scores):
        return Ranking(
            tuple(s.im for s in scores),
            "im",
            "no vendor calibration: information maximisation (confident and diverse)",
        )
    passing = tuple(gate_decision(source, s).decision == "adapted" for s in scores)
    if any(passing):
        head = f"{sum(passing)} of {len(scores)} candidates pass the gate and rank first"
        ami = class_ami_values([o for _, o in pool])
        if ami is not None:
            return Ranking(ami, "class_ami", f"{head}, by ClassAMI", passing)
        return Ranking(
            tuple(consensus_agreement([o for _, o in pool])),
            "consensus",
            f"{head}, by agreement with the candidates' soft consensus (no features for ClassAMI)",
            passing,
        )
    return Ranking(
        tuple(s.agreement for s in scores),
        "agreement",
        "no candidate passes the gate: agreement with the source model (least change)",
    )


@dataclass(frozen=True)
class Candidate:
    """One run tried by ``--select auto`` or ``-m auto``."""

    method: str
    overrides: Mapping[str, Any]
    """Dotted config keys set on top of the user's config (a grid entry)."""

    @property
    def label(self) -> str:
        """``method`` or ``method:key=value,...`` (the benchmarks' variant syntax)."""
        if not self.overrides:
            return self.method
        body = ",".join(f"{k}={_text(v)}" for k, v in self.overrides.items())
        return f"{self.method}:{body}"


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def auto_methods(num_sources: int) -> list[str]:
    """Registered methods that take ``num_sources`` packages, cheapest first (``-m auto``)."""
    from sourcefree.engine.registry import get_method, list_methods

    eligible = []
    for name in list_methods():
        cls = get_method(name)
        if cls.min_sources <= num_sources <= cls.max_sources:
            eligible.append((float(cls.relative_cost), name))
    return [name for _, name in sorted(eligible)]


def plan_candidates(methods: Sequence[str], *, grid: bool) -> list[Candidate]:
    """The candidates: each method's ``selection_grid`` (``grid``) or its defaults."""
    from sourcefree.engine.registry import get_method

    out: list[Candidate] = []
    for name in methods:
        cls = get_method(name)
        entries = cls.selection_grid if grid and cls.selection_grid else ({},)
        out.extend(Candidate(name, dict(entry)) for entry in entries)
    return out


def apply_overrides(
    config_class: type[Any], config: Mapping[str, Any], overrides: Mapping[str, Any]
) -> Any:
    """``config`` (a resolved config dict) with a grid entry's dotted keys set.

    Raises:
        ConfigError: the user set a key the grid varies, or the entry is invalid.
    """
    from sourcefree.engine import config as cfgmod

    defaults = cfgmod.to_dict(config_class())
    data: dict[str, Any] = _deep_copy(config)
    for key, value in overrides.items():
        if _get_dotted(config, key) != _get_dotted(defaults, key):
            raise ConfigError(
                f"--select auto varies {key!r}, which the config sets",
                f"the grid tries {key}={_text(value)} among others",
                f"drop {key} from --set/--config, or run without --select auto",
            )
        cfgmod.set_dotted(data, key, list(value) if isinstance(value, tuple) else value)
    return cfgmod.from_dict(config_class, data)


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def _get_dotted(d: Mapping[str, Any], key: str) -> Any:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class GateResult:
    """The do-no-harm gate's verdict on an adapted model."""

    decision: Literal["adapted", "source"]
    criterion: str
    """``anchored`` (vendor calibration) or ``uncalibrated``."""
    reason: str
    estimated_gain: float | None
    """Anchored accuracy of the adapted model minus the source's ATC (calibrated only)."""
    standard_error: float | None = None
    """Standard error of ``estimated_gain`` over the images scored (calibrated only)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "criterion": self.criterion,
            "reason": self.reason,
            "estimated_gain": _round(self.estimated_gain),
            "standard_error": _round(self.standard_error),
        }


def gate_decision(
    source: Scores,
    adapted: Scores,
    *,
    method: str = "the adapted model",
    z: float = GATE_Z,
) -> GateResult:
    """Keep the adapted model only when it is estimated better than the source.

    With a vendor calibration (``anchored`` scores): the estimated gain is the
    adapted model's anchored accuracy minus the source's ATC estimate, i.e. the
    mean over images of +1 (it overrules a source prediction ATC counts as
    wrong), -1 (it changes one ATC counts as right) or 0. The adapted model
    passes when that mean exceeds ``z`` standard errors (``sqrt((d - gain^2) / N)``
    with ``d = 1 - agreement``, the share of changed predictions, and ``N`` the
    images scored: the gate's subsample when there is one): a few changed images
    on a small target set are no evidence. Without one, no accuracy can be
    estimated; the adapted model passes when it is at least as confident-and-diverse
    as the source (``im``) and agrees
    with the source at least as often as chance (``kappa >= 0``): this catches
    collapsed or class-scrambled models, not a harmful shift of the class prior.
    """
    if source.anchored is not None and adapted.anchored is not None:
        gain = adapted.anchored - source.anchored
        changed = 1.0 - adapted.agreement
        se = math.sqrt(max(0.0, changed - gain * gain) / max(1, adapted.images))
        numbers = (
            f"anchored accuracy estimate {adapted.anchored:.3f} vs the source's ATC "
            f"estimate {source.anchored:.3f} ({gain:+.3f}, {z:g} standard errors: "
            f"{z * se:.3f})"
        )
        if gain > 0 and gain > z * se:
            return GateResult(
                "adapted", "anchored", f"{method} is estimated better: {numbers}", gain, se
            )
        return GateResult(
            "source",
            "anchored",
            f"{method} is not estimated better than the source model: {numbers}; "
            "the source model is kept",
            gain,
            se,
        )
    problems = []
    if adapted.im < source.im:
        problems.append(f"its IM score {adapted.im:.3f} is below the source's {source.im:.3f}")
    if adapted.kappa < 0:
        problems.append(
            f"it agrees with the source less than chance (kappa {adapted.kappa:.3f}), "
            "as a model with permuted classes would"
        )
    if problems:
        return GateResult(
            "source",
            "uncalibrated",
            f"{method} looks degenerate: " + "; ".join(problems) + "; the source model is kept",
            None,
        )
    return GateResult(
        "adapted",
        "uncalibrated",
        f"{method} passes the uncalibrated checks (IM {adapted.im:.3f} >= {source.im:.3f}, "
        f"kappa {adapted.kappa:.3f} >= 0); without a vendor calibration its accuracy "
        "cannot be estimated",
        None,
    )
