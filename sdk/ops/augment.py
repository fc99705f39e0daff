"""Batched image augmentations as tensor ops, shared by the methods that need random views.

Everything works on a whole batch at once (one ``grid_sample`` per view, per-image
random factors as tensors): torchvision's per-image transforms are far slower on a
few CPU cores. Random numbers come from the caller's CPU ``torch.Generator`` (the
trainer seeds one per step), so a resumed run replays the same views.

Images are handled in two spaces: *normalised* (what the model sees, ``(x - mean) /
std`` from the package's input spec) and *unit* (``[0, 1]`` pixel values, where
colour operations are defined). :func:`to_unit` and :func:`from_unit` convert.

Used by CluP (SwAV multi-crop views and the fine-tune augmentations of its reference
code) and POCAN (two contrastive views per image for the instance contrastive loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sourcefree.engine.config import refuse_invalid

__all__ = [
    "FlipShiftConfig",
    "affine_sample",
    "augment_flip_shift",
    "color_jitter",
    "from_unit",
    "grey",
    "hue_shift",
    "random_view",
    "resized_crop_theta",
    "to_unit",
    "uniform",
]


def uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` draws from U(lo, hi) on the CPU."""
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def to_unit(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised images -> [0, 1] pixel values (``mean``, ``std`` shaped (1, C, 1, 1))."""
    return x * std + mean


def from_unit(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixel values -> normalised images."""
    return (x - mean) / std


def grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, repeated over the 3 channels (grey images are returned as they are)."""
    if x.shape[1] != 3:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


def hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate chroma in YIQ space by ``2 pi turns`` per image (a batched hue shift)."""
    if x.shape[1] != 3:
        return x
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        dtype=x.dtype,
        device=x.device,
    )
    from_yiq = torch.linalg.inv(to_yiq)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    a = 2 * math.pi * turns.to(x.device, x.dtype)
    cos, sin = torch.cos(a).view(-1, 1, 1), torch.sin(a).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    rotated = torch.stack((yiq[:, 0], cos * i - sin * q, sin * i + cos * q), dim=1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, rotated)


def color_jitter(
    x: torch.Tensor,
    gen: torch.Generator,
    strength: float,
    hue: float,
    prob: float = 1.0,
) -> torch.Tensor:
    """Brightness, contrast, saturation in [1-s, 1+s], hue in [-h, h], on [0, 1] images.

    Applied in that fixed order to each image with probability ``prob``.
    """
    n = x.shape[0]
    apply = (torch.rand(n, generator=gen) < prob).to(x.device).view(-1, 1, 1, 1)
    b = uniform(n, 1 - strength, 1 + strength, gen).to(x.device).view(-1, 1, 1, 1)
    c = uniform(n, 1 - strength, 1 + strength, gen).to(x.device).view(-1, 1, 1, 1)
    s = uniform(n, 1 - strength, 1 + strength, gen).to(x.device).view(-1, 1, 1, 1)
    h = uniform(n, -hue, hue, gen)
    y = (x * b).clamp(0, 1)
    mean = grey(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * c + mean).clamp(0, 1)
    g = grey(y)
    y = ((y - g) * s + g).clamp(0, 1)
    if hue > 0:
        y = hue_shift(y, h).clamp(0, 1)
    return torch.where(apply, y, x)


def affine_sample(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample ``x`` through per-image affine maps ``theta`` (N, 2, 3) to ``size`` px (0 fill)."""
    grid = nn.functional.affine_grid(
        theta.to(x.device, x.dtype), [x.shape[0], x.shape[1], size, size], False
    )
    return nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def resized_crop_theta(
    n: int, scale: tuple[float, float], gen: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """Affine parameters of RandomResizedCrop(scale, ratio 3/4-4/3) + horizontal flip."""
    area = uniform(n, scale[0], scale[1], gen)
    log_ratio = uniform(n, math.log(3 / 4), math.log(4 / 3), gen)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=gen) - 1) * (1 - w)
    cy = (2 * torch.rand(n, generator=gen) - 1) * (1 - h)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


def random_view(
    unit: torch.Tensor,
    gen: torch.Generator,
    size: int,
    scale: tuple[float, float],
    jitter: float,
    hue: float,
    jitter_prob: float,
    grayscale_prob: float,
) -> torch.Tensor:
    """One SimCLR/SwAV-style view of [0, 1] images, returned in [0, 1].

    Random resized crop (area ``scale``, aspect 3/4-4/3) + horizontal flip in one
    ``grid_sample`` to ``size`` px, colour jitter (``jitter``, ``hue``) with
    probability ``jitter_prob``, grey-scale with probability ``grayscale_prob``.
    Gaussian blur is left out: 32 px faces are already low-pass.
    """
    n = unit.shape[0]
    v = affine_sample(unit, resized_crop_theta(n, scale, gen), size)
    v = color_jitter(v, gen, jitter, hue, prob=jitter_prob)
    make_grey = (torch.rand(n, generator=gen) < grayscale_prob).to(v.device).view(-1, 1, 1, 1)
    return torch.where(make_grey, grey(v), v)


@dataclass(frozen=True)
class FlipShiftConfig:
    """Augmentation of training batches (pseudo-labels always use the plain images)."""

    enabled: bool = False
    """Random horizontal flip per image and a random shift per batch (match source training)."""
    shift: int = 2
    """Largest shift in pixels (replicate padding)."""

    def __post_init__(self) -> None:
        refuse_invalid(self, [f"shift={self.shift} (must be >= 0)"] if self.shift < 0 else [])


def augment_flip_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip per image and one random shift of up to ``shift`` px per batch.

    Random numbers come from the step's CPU ``generator`` (resume-safe).
    """
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if shift > 0:
        padded = nn.functional.pad(x, (shift, shift, shift, shift), mode="replicate")
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
        x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return x
