"""Synthetic FER domains: parametric cartoon faces with a controllable domain shift.

Written from the recipe in ``research/data.md`` section 4. A face is drawn
from soft signed-distance shapes in a canonical frame ([-1, 1]^2, y down) at
64 px (or the output size when larger), for a whole batch at once with numpy.
Each class has an expression prototype; a sample is
``neutral + alpha * (prototype - neutral) + noise`` with alpha ~ U(0.6, 1), so
weak expressions overlap with neutral. A domain (:class:`DomainSpec`) sets the
severity in [0, 1] of each nuisance: grey, low resolution, blur, noise,
light, tone, background clutter, pose, face shape, occlusion, and the class
prior. Every image also carries a ground-truth action-unit vector derived
from its expression parameters (see :data:`AU_NAMES` and :func:`action_units`).

Deterministic: the same (domain, n, size, seed) gives the same bytes.
No torch import.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import secrets
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from sourcefree.data.labels import FER7
from sourcefree.errors import ConfigError, DatasetError

#: Class names of every synthetic domain, in the canonical FER order.
CLASSES: tuple[str, ...] = FER7
#: Expression parameters, in the column order of :data:`PROTOTYPES`.
PARAMS: tuple[str, ...] = (
    "brow_raise",
    "brow_inner",
    "eye_open",
    "mouth_curv",
    "mouth_open",
    "mouth_width",
    "wrinkle",
    "lip_asym",
)
#: Neutral expression parameters.
NEUTRAL = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0], dtype=np.float64)
#: Per-class expression prototypes (rows in canonical order, columns :data:`PARAMS`).
PROTOTYPES = np.array(
    [
        [0.12, 0.00, 1.55, 0.00, 0.95, 0.70, 0.0, 0.0],  # surprise
        [0.08, 0.07, 1.40, -0.35, 0.45, 1.30, 0.0, 0.0],  # fear
        [-0.04, -0.04, 0.60, -0.45, 0.15, 0.95, 1.0, 0.8],  # disgust
        [0.00, 0.00, 0.70, 1.00, 0.30, 1.30, 0.0, 0.0],  # happiness
        [0.00, 0.09, 0.80, -0.85, 0.00, 0.95, 0.0, 0.0],  # sadness
        [-0.07, -0.10, 0.65, -0.20, 0.00, 0.80, 0.0, 0.0],  # anger
        NEUTRAL,  # neutral
    ],
    dtype=np.float64,
)
#: Standard deviation of the per-sample parameter noise (columns :data:`PARAMS`).
PARAM_NOISE = np.array([0.025, 0.025, 0.12, 0.15, 0.08, 0.08, 0.1, 0.1], dtype=np.float64)
#: Action units in the columns of ``aus``; intensities in [0, 1] (see :func:`action_units`).
AU_NAMES: tuple[str, ...] = (
    "AU1",
    "AU2",
    "AU4",
    "AU5",
    "AU6",
    "AU7",
    "AU9",
    "AU10",
    "AU12",
    "AU15",
    "AU20",
    "AU23",
    "AU25",
    "AU26",
)
#: A RAF-DB-like class prior in canonical order (happiness and neutral dominate).
RAF_PRIOR: tuple[float, ...] = (0.10, 0.03, 0.05, 0.38, 0.16, 0.08, 0.20)

_RENDER_MIN = 64  # faces are drawn at max(64, size) pixels, then area-resized
_VIEW = 0.95  # half-width of the rendered view, in face-frame units
_CHUNK = 256  # images rendered per vectorised batch (fixed: results do not depend on it)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class DomainSpec:
    """One synthetic domain: a severity in [0, 1] per nuisance (0 = studio level)."""

    name: str
    """Preset name, used in file metadata and seeds."""
    description: str = ""
    """One line for ``--help`` and docs."""
    gray: float = 0.0
    """Blend toward luma replicated on 3 channels (1 = fully grey)."""
    lowres: float = 0.0
    """Effective resolution ``(1 - 0.5 s)`` of the 64 px drawing canvas, upsampled back."""
    blur: float = 0.0
    """Gaussian blur, sigma ``0.9 s`` pixels at 64 px."""
    noise: float = 0.0
    """Gaussian pixel noise on the drawing canvas (before the resize), sigma ``0.02 + 0.06 s``."""
    light: float = 0.0
    """Directional illumination gradient of amplitude up to ``0.6 s``."""
    tone: float = 0.0
    """Gamma in U(1 - 0.4 s, 1 + 0.6 s) and contrast in U(1 - 0.4 s, 1)."""
    clutter: float = 0.0
    """Textured background (stripes and blobs), amplitude ``max(0.15, 0.6 s)``."""
    pose: float = 0.0
    """Rotation +-(5 + 20 s) deg, shift +-(0.04 + 0.08 s), scale (0.95 - 0.15 s, 1.05 + 0.05 s)."""
    shape: float = 0.0
    """Face aspect ``1 + 0.25 s`` (longer faces)."""
    occl: float = 0.0
    """Probability ``0.25 s`` of a bar over the eyes or the mouth."""
    prior: tuple[float, ...] | None = None
    """Class prior in canonical order; None is balanced."""
    nir: bool = False
    """Near-infrared look: grey, bright skin on black, gamma 1.4-1.9, vignette."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and not (0.0 <= float(value) <= 2.0):
                raise ConfigError(
                    f"synthetic domain '{self.name}': severity {f.name}={value!r} is out of range",
                    "severities are in [0, 2] (1 is already strong)",
                    "pick a value between 0 and 1",
                )
        if self.prior is not None:
            p = np.asarray(self.prior, dtype=np.float64)
            if p.shape != (len(CLASSES),) or not np.all(p >= 0) or not p.sum() > 0:
                raise ConfigError(
                    f"synthetic domain '{self.name}': the class prior is invalid",
                    f"it needs {len(CLASSES)} non-negative weights with a positive sum",
                    "give one weight per class in canonical order",
                )

    def class_prior(self) -> np.ndarray:
        """The normalised class prior (float64, sums to 1)."""
        if self.prior is None:
            return np.full(len(CLASSES), 1.0 / len(CLASSES))
        p = np.asarray(self.prior, dtype=np.float64)
        return np.asarray(p / p.sum(), dtype=np.float64)

    def scaled(self, factor: float, name: str) -> DomainSpec:
        """A copy with every nuisance severity except grey multiplied by ``factor``."""
        keys = ("lowres", "blur", "noise", "light", "tone", "clutter", "pose", "shape", "occl")
        changes = {k: min(2.0, getattr(self, k) * factor) for k in keys}
        return replace(self, name=name, **changes)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["prior"] = None if self.prior is None else list(self.prior)
        return out


_WILD_MILD = DomainSpec(
    name="wild-mild",
    description="grey, low-res, blurred, noisy, uneven light, cluttered, posed (main target)",
    gray=1.0,
    lowres=0.5,
    blur=0.5,
    noise=0.5,
    light=0.5,
    tone=0.5,
    clutter=0.3,
    pose=0.3,
)

#: Built-in domains. ``studio`` is the source; the others are targets.
PRESETS: dict[str, DomainSpec] = {
    d.name: d
    for d in (
        DomainSpec(
            name="studio",
            description="source: colour, mild clutter, pose +-5 deg, balanced classes",
        ),
        _WILD_MILD,
        replace(
            _WILD_MILD,
            name="wild-mild-imbalanced",
            description="wild-mild with a RAF-DB-like class prior (the hard case)",
            prior=RAF_PRIOR,
        ),
        replace(
            _WILD_MILD.scaled(1.4, "wild-med"),
            description="wild-mild with every severity x1.4 (recovery breaks down)",
        ),
        DomainSpec(
            name="fer-like",
            description="FER2013-like: grey, low-res, blur, noise, light, clutter, pose, occlusion",
            gray=1.0,
            lowres=0.6,
            blur=0.5,
            noise=0.5,
            light=0.5,
            tone=0.5,
            clutter=0.5,
            pose=0.5,
            shape=0.5,
            occl=0.3,
        ),
        DomainSpec(
            name="nir",
            description="near-infrared camera: grey, bright skin on black, vignette, soft, noisy",
            gray=1.0,
            lowres=0.3,
            blur=0.5,
            noise=0.5,
            shape=1.0,
            nir=True,
        ),
        DomainSpec(
            name="prior-shift",
            description="studio images with a RAF-DB-like class prior (do-no-harm check)",
            prior=RAF_PRIOR,
        ),
    )
}


def get_domain(name: str | DomainSpec) -> DomainSpec:
    """Look up a preset by name (a DomainSpec passes through)."""
    if isinstance(name, DomainSpec):
        return name
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
    raise ConfigError(
        f"unknown synthetic domain '{name}'",
        f"did you mean '{close[0]}'?" if close else "it is not a built-in preset",
        f"pick one of: {', '.join(PRESETS)}",
    )


class SyntheticSet(NamedTuple):
    """Images (uint8 NHWC, 3 channels), labels (int64, canonical order), AUs (float32)."""

    images: np.ndarray
    labels: np.ndarray
    aus: np.ndarray


def action_units(params: np.ndarray) -> np.ndarray:
    """Action-unit intensities in [0, 1] from expression parameters (N x 8 -> N x 14).

    The mapping (parameters relative to neutral; ``clip`` to [0, 1]):

    - AU1 inner brow raiser: ``(brow_raise + brow_inner) / 0.15``
    - AU2 outer brow raiser: ``brow_raise / 0.10``
    - AU4 brow lowerer: ``-(brow_raise + brow_inner) / 0.12``
    - AU5 upper lid raiser: ``(eye_open - 1) / 0.4``
    - AU6 cheek raiser: ``min(narrow, smile)`` with ``narrow = (1 - eye_open) / 0.3``
      and ``smile = mouth_curv / 0.6``
    - AU7 lid tightener: ``narrow * (1 - smile)``
    - AU9 nose wrinkler: ``wrinkle``
    - AU10 upper lip raiser: ``lip_asym / 0.6``
    - AU12 lip corner puller: ``smile``
    - AU15 lip corner depressor: ``-mouth_curv / 0.6``
    - AU20 lip stretcher: ``(mouth_width - 1) / 0.25 * (1 - smile)``
    - AU23 lip tightener: ``(1 - mouth_width) / 0.2 * (1 - AU25)``
    - AU25 lips part: ``(mouth_open - 0.1) / 0.15``
    - AU26 jaw drop: ``(mouth_open - 0.35) / 0.4``
    """
    p = np.asarray(params, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(PARAMS):
        raise ConfigError(
            "expression parameters have the wrong shape",
            f"expected (N, {len(PARAMS)}), got {p.shape}",
            "pass one row of PARAMS per image",
        )
    raise_, inner, eye, curv, open_, width, wrinkle, asym = p.T

    def c(x: np.ndarray) -> np.ndarray:
        return np.asarray(np.clip(x, 0.0, 1.0), dtype=np.float64)

    narrow = c((1.0 - eye) / 0.3)
    smile = c(curv / 0.6)
    au25 = c((open_ - 0.1) / 0.15)
    cols = [
        c((raise_ + inner) / 0.15),
        c(raise_ / 0.10),
        c(-(raise_ + inner) / 0.12),
        c((eye - 1.0) / 0.4),
        np.minimum(narrow, smile),
        narrow * (1.0 - smile),
        c(wrinkle),
        c(asym / 0.6),
        smile,
        c(-curv / 0.6),
        c((width - 1.0) / 0.25) * (1.0 - smile),
        c((1.0 - width) / 0.2) * (1.0 - au25),
        au25,
        c((open_ - 0.35) / 0.4),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def sample_expressions(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Expression parameters per label: neutral + alpha (prototype - neutral) + noise."""
    n = labels.shape[0]
    alpha = rng.uniform(0.6, 1.0, size=(n, 1))
    params = NEUTRAL + alpha * (PROTOTYPES[labels] - NEUTRAL)
    params = params + rng.normal(size=(n, len(PARAMS))) * PARAM_NOISE
    params[:, 2] = np.clip(params[:, 2], 0.25, 2.0)  # eye_open
    params[:, 4] = np.clip(params[:, 4], 0.0, 1.3)  # mouth_open
    params[:, 5] = np.clip(params[:, 5], 0.5, 1.6)  # mouth_width
    params[:, 6] = np.clip(params[:, 6], 0.0, 1.5)  # wrinkle
    params[:, 7] = np.clip(params[:, 7], -0.3, 1.5)  # lip_asym
    return np.asarray(params, dtype=np.float64)


# ----------------------------------------------------------------------------- rendering


def _ramp(d: np.ndarray, px: np.ndarray | float) -> np.ndarray:
    """Coverage of a shape from its signed distance: 1 inside, 0 outside, 1 px edge."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _blend(img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    """In place: img = img + mask * (color - img); img (B,3,H,W), mask (B,H,W), color (B,3)."""
    img += mask[:, None] * (color[:, :, None, None] - img)


def _capsule(
    u: np.ndarray, v: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float
) -> np.ndarray:
    """Signed distance to segments p0-p1 ((B,2) each) with the given half-thickness."""
    ax, ay = p0[:, 0, None, None], p0[:, 1, None, None]
    dx, dy = (p1[:, 0] - p0[:, 0])[:, None, None], (p1[:, 1] - p0[:, 1])[:, None, None]
    px, py = u - ax, v - ay
    h = np.clip((px * dx + py * dy) / (dx * dx + dy * dy + 1e-9), 0.0, 1.0)
    return np.asarray(np.sqrt((px - h * dx) ** 2 + (py - h * dy) ** 2) - radius)


def _ellipse(u: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse centred at the origin."""
    return np.asarray((np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * np.minimum(a, b))


def _area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Row-stochastic matrix that area-averages ``n_in`` samples into ``n_out``."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        lo, hi = edges[i], edges[i + 1]
        for j in range(math.floor(lo), min(n_in, math.ceil(hi))):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    return np.asarray(m / m.sum(axis=1, keepdims=True), dtype=np.float32)


def _linear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear (pixel-centre aligned) upsampling matrix from ``n_in`` to ``n_out``."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    m[np.arange(n_out), lo] += 1.0 - w
    m[np.arange(n_out), hi] += w
    return m.astype(np.float32)


def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """Gaussian blur along one axis as an n x n matrix (edge rows renormalised)."""
    idx = np.arange(n, dtype=np.float64)
    m = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return np.asarray(m / m.sum(axis=1, keepdims=True), dtype=np.float32)


def _separable(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Apply ``rows @ img @ cols.T`` to every channel of (B,C,H,W)."""
    return np.asarray(np.matmul(np.matmul(rows, img), cols.T), dtype=np.float32)


class _Frame:
    """Pixel grid of one render resolution and the linear maps that go with it."""

    def __init__(self, render: int, size: int, spec: DomainSpec) -> None:
        xs = ((np.arange(render, dtype=np.float32) + 0.5) / render * 2.0 - 1.0) * _VIEW
        self.x = xs[None, None, :]
        self.y = xs[None, :, None]
        self.px = float(2.0 * _VIEW / render)
        scale = render / 64.0
        # Blur and low resolution act on the drawing canvas, which is then area-resized
        # to the output size (where the sensor noise is added). The effective resolution
        # is relative to the canvas, as in the recipe: relative to a 32 px output it
        # would drop the eyes and mouth below one pixel and collapse accuracy.
        pre = _gauss_matrix(render, 0.9 * spec.blur * scale) if spec.blur > 0 else None
        low = round(render * (1.0 - 0.5 * min(spec.lowres, 1.6)))
        if spec.lowres > 0 and low < render:
            lowres = _linear_matrix(render, max(low, 4)) @ _area_matrix(max(low, 4), render)
            pre = lowres if pre is None else pre @ lowres
        self.pre = pre
        self.resize = _area_matrix(size, render) if size != render else None


def _background(
    rng: np.random.Generator, spec: DomainSpec, frame: _Frame, b: int
) -> tuple[np.ndarray, np.ndarray]:
    """Background images (B,3,H,W) and the per-image base colour (B,3)."""
    if spec.nir:
        base = rng.uniform(0.0, 0.06, size=(b, 1)).repeat(3, axis=1).astype(np.float32)
        img = np.broadcast_to(base[:, :, None, None], (b, 3, frame.y.shape[1], frame.x.shape[2]))
        return img.copy(), base
    base = rng.uniform(0.15, 0.9, size=(b, 3)).astype(np.float32)
    amp = max(0.15, 0.6 * spec.clutter)
    theta = rng.uniform(0, np.pi, size=(b, 1, 1)).astype(np.float32)
    freq = rng.uniform(3.0, 12.0, size=(b, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(b, 1, 1)).astype(np.float32)
    proj = frame.x * np.cos(theta) + frame.y * np.sin(theta)
    stripes = np.sin(freq * proj + phase)  # (B,H,W)
    stripe_col = rng.uniform(-1.0, 1.0, size=(b, 3)).astype(np.float32)
    img = np.asarray(
        base[:, :, None, None] + amp * 0.5 * stripes[:, None] * stripe_col[:, :, None, None],
        dtype=np.float32,
    )
    k = 3
    cx = rng.uniform(-1.1, 1.1, size=(b, k, 1, 1)).astype(np.float32)
    cy = rng.uniform(-1.1, 1.1, size=(b, k, 1, 1)).astype(np.float32)
    rad = rng.uniform(0.15, 0.45, size=(b, k, 1, 1)).astype(np.float32)
    blobs = np.exp(
        -((frame.x[:, None] - cx) ** 2 + (frame.y[:, None] - cy) ** 2) / (2 * rad * rad)
    )  # (B,K,H,W)
    blob_col = rng.uniform(-1.0, 1.0, size=(b, k, 3)).astype(np.float32)
    img += amp * np.einsum("bkhw,bkc->bchw", blobs, blob_col, optimize=True)
    return img.astype(np.float32), base


def _col(x: Any) -> np.ndarray:
    """Per-image values as float32 (B, 1, 1), broadcast over the canvas."""
    return np.asarray(x, dtype=np.float32)[:, None, None]


class _Pose(NamedTuple):
    """Canvas coordinates mapped into each face's frame (rotated, shifted, scaled)."""

    u: np.ndarray
    v: np.ndarray
    px: np.ndarray


class _Identity(NamedTuple):
    """Who the face is: skin and hair colours (B, 3) and face-ellipse size (B, 1, 1)."""

    skin: np.ndarray
    hair: np.ndarray
    fa: np.ndarray
    fb: np.ndarray
    fy: np.ndarray


def _pose(rng: np.random.Generator, spec: DomainSpec, frame: _Frame, b: int) -> _Pose:
    """Pose: map image coordinates into the face frame."""
    max_rot = np.deg2rad(5.0 + 20.0 * spec.pose)
    rot = rng.uniform(-max_rot, max_rot, size=b)
    shift = 0.04 + 0.08 * spec.pose
    tx, ty = rng.uniform(-shift, shift, size=(2, b))
    scale = rng.uniform(0.95 - 0.15 * spec.pose, 1.05 + 0.05 * spec.pose, size=b)
    cos, sin = _col(np.cos(rot)), _col(np.sin(rot))
    xs, ys = frame.x - _col(tx), frame.y - _col(ty)
    sc = _col(scale)
    return _Pose((xs * cos + ys * sin) / sc, (-xs * sin + ys * cos) / sc, frame.px / sc)


def _identity(rng: np.random.Generator, spec: DomainSpec, b: int) -> _Identity:
    """Identity: skin, hair, face size."""
    if spec.nir:
        skin = rng.uniform(0.75, 0.95, size=(b, 1)).repeat(3, axis=1)
        hair = rng.uniform(0.05, 0.35, size=(b, 1)).repeat(3, axis=1)
    else:
        tone = rng.uniform(0.0, 1.0, size=(b, 1))
        light_skin, dark_skin = np.array([0.98, 0.84, 0.72]), np.array([0.45, 0.30, 0.20])
        skin = light_skin + tone * (dark_skin - light_skin) + rng.normal(0, 0.03, (b, 3))
        hair_palette = np.array(
            [[0.08, 0.06, 0.05], [0.30, 0.18, 0.08], [0.55, 0.40, 0.20], [0.80, 0.68, 0.40]]
        )
        hair = hair_palette[rng.integers(0, 4, size=b)] + rng.normal(0, 0.03, (b, 3))
    aspect = (1.0 + 0.25 * spec.shape) * rng.uniform(0.96, 1.04, size=b)
    return _Identity(
        skin=np.clip(skin, 0, 1).astype(np.float32),
        hair=np.clip(hair, 0, 1).astype(np.float32),
        fa=_col(0.64 * rng.uniform(0.93, 1.05, size=b)),
        fb=_col(0.80 * aspect),
        fy=_col(0.04 + 0.8 * (aspect - 1.0) * 0.25),  # longer faces grow mostly downward
    )


def _draw_eyes_and_brows(
    img: np.ndarray, pose: _Pose, who: _Identity, brow_raise: Any, brow_inner: Any, eye_open: Any
) -> None:
    """Eyes (symmetric in |u|: dark rim, white, pupil clipped to the white), then brows."""
    f32 = np.float32
    b, v, px = img.shape[0], pose.v, pose.px
    au = np.abs(pose.u)
    ey = -0.12
    eb = 0.065 * eye_open
    ev = v - ey
    rim = _ramp(_ellipse(au - 0.25, ev, np.full((b, 1, 1), 0.14, dtype=f32), eb + 0.022), px)
    _blend(img, rim, (np.minimum(who.hair, who.skin) * 0.5).astype(f32))
    white_d = _ellipse(au - 0.25, ev, np.full((b, 1, 1), 0.12, dtype=f32), eb)
    white = _ramp(white_d, px)
    _blend(img, white, np.full((b, 3), 0.96, dtype=f32))
    pupil = _ramp(np.sqrt((au - 0.25) ** 2 + ev**2) - 0.055, px) * white
    _blend(img, pupil, np.full((b, 3), 0.08, dtype=f32))

    # Brows: capsules from inner (0.10, -0.30 - raise - inner) to outer (0.40, -0.28 - raise).
    inner_y = -0.30 - brow_raise - brow_inner
    outer_y = -0.28 - brow_raise
    dxi, dyi = au - 0.10, v - inner_y
    sx, sy = np.float32(0.30), outer_y - inner_y
    h = np.clip((dxi * sx + dyi * sy) / (sx * sx + sy * sy), 0.0, 1.0)
    brow_d = np.sqrt((dxi - h * sx) ** 2 + (dyi - h * sy) ** 2) - 0.028
    # Brows (and lips, eye rims) are darker than the skin of every tone, so they stay
    # visible after grey conversion (blond brows or red lips on dark skin had no luma edge).
    _blend(img, _ramp(brow_d, px), np.minimum(who.hair * 0.6, who.skin * 0.5).astype(f32))


def _draw_nose_and_mouth(
    img: np.ndarray, pose: _Pose, skin: np.ndarray, params: Sequence[Any]
) -> None:
    """Nose bar and disgust wrinkles; the mouth (eq. of its centre line below)."""
    f32 = np.float32
    b, u, v, px = img.shape[0], pose.u, pose.v, pose.px
    curv, open_, width, wrinkle, asym = params
    au = np.abs(u)
    # Nose: a bar independent of the class, plus disgust wrinkles on the bridge.
    nose_d = np.maximum(np.abs(u) - 0.035, np.abs(v - 0.10) - 0.11)
    _blend(img, _ramp(nose_d, px) * 0.6, (skin * 0.7).astype(f32))
    wr = np.minimum(np.abs(v + 0.02), np.abs(v - 0.04))
    wrinkle_d = np.maximum(wr - 0.012, au - 0.10)
    _blend(img, _ramp(wrinkle_d, px) * np.clip(wrinkle, 0.0, 1.0), (skin * 0.45).astype(f32))

    # Mouth: centre line y = 0.42 + 0.10 c (1 - t^2) - 0.05 c with c = curv + 0.5 asym t.
    half = 0.22 * width
    t = np.clip(u / half, -1.0, 1.0)
    cl = curv + 0.5 * asym * t
    yc = 0.42 + 0.10 * cl * (1.0 - t * t) - 0.05 * cl
    gap = 0.11 * open_ * np.sqrt(np.maximum(1.0 - t * t, 0.0))
    dv = np.abs(v - yc)
    side = np.abs(u) - half
    lips = _ramp(np.maximum(dv - gap - 0.032, side), px)
    _blend(img, lips, (skin * np.array([0.72, 0.42, 0.42], dtype=f32)).astype(f32))
    inside = _ramp(np.maximum(dv - gap + 0.012, side + 0.02), px)
    _blend(img, inside, np.array([[0.22, 0.04, 0.06]], dtype=f32).repeat(b, axis=0))
    teeth_on = (open_ > 0.15).astype(f32)
    teeth = inside * _ramp((v - (yc - gap + 0.05)), px) * teeth_on
    _blend(img, teeth, np.array([[0.95, 0.94, 0.88]], dtype=f32).repeat(b, axis=0))


def _occlude_and_light(
    img: np.ndarray, pose: _Pose, rng: np.random.Generator, spec: DomainSpec, frame: _Frame
) -> None:
    """Occlusion (a bar over the eyes or the mouth), light gradient, NIR vignette; in place."""
    b, u, v = img.shape[0], pose.u, pose.v
    if spec.occl > 0:
        hit = rng.uniform(size=b) < 0.25 * spec.occl
        where = rng.integers(0, 2, size=b)
        centre = np.where(where == 0, -0.13, 0.42)
        bar_d = np.maximum(np.abs(v - _col(centre)) - 0.11, np.abs(u) - 0.58)
        bar_col = rng.uniform(0.0, 1.0, size=(b, 3)).astype(np.float32)
        _blend(img, _ramp(bar_d, pose.px) * _col(hit), bar_col)
    if spec.light > 0:
        phi = rng.uniform(0, 2 * np.pi, size=b)
        amp = 0.6 * spec.light * rng.uniform(0.5, 1.0, size=b)
        grad = (frame.x * _col(np.cos(phi)) + frame.y * _col(np.sin(phi))) / _VIEW / np.sqrt(2.0)
        img *= (1.0 + _col(amp) * grad)[:, None]
    if spec.nir:
        r2 = (frame.x**2 + frame.y**2) / (2 * _VIEW**2)
        img *= (1.0 - 0.7 * r2)[:, None]


def _tone_grey_noise(
    img: np.ndarray, rng: np.random.Generator, spec: DomainSpec, frame: _Frame
) -> np.ndarray:
    """Blur, clip, gamma/contrast, grey, sensor noise, then the resize to the output size."""
    if frame.pre is not None:
        img = _separable(img, frame.pre, frame.pre)
    np.clip(img, 0.0, 1.0, out=img)
    b = img.shape[0]
    if spec.nir:
        gamma = rng.uniform(1.4, 1.9, size=b)
        img = img ** _col(gamma)[:, None]
    if spec.tone > 0:
        gamma = rng.uniform(1.0 - 0.4 * spec.tone, 1.0 + 0.6 * spec.tone, size=b)
        contrast = rng.uniform(1.0 - 0.4 * spec.tone, 1.0, size=b)
        img = img ** _col(gamma)[:, None]
        mean = img.mean(axis=(1, 2, 3), keepdims=True)
        img = mean + _col(contrast)[:, None] * (img - mean)
    if spec.gray > 0:
        luma = np.einsum("bchw,c->bhw", img, _LUMA)[:, None]
        img = img + min(spec.gray, 1.0) * (luma - img)
    # Sensor noise on the drawing canvas, then the resize to the output size: the
    # recipe's order (every degradation before the resize). At 32 px the area resize
    # averages 2x2 canvas pixels, so the noise reaching the model has half the sigma.
    # Noise added after the resize made wild-mild far harder than the recipe measured
    # (source-only 0.37-0.45, SHOT 0.71 against the recipe's 0.517 and 0.868).
    sigma = 0.02 + 0.06 * spec.noise
    channels = 1 if spec.gray >= 1.0 else 3
    shape = (b, channels, img.shape[-2], img.shape[-1])
    img = img + sigma * rng.standard_normal(size=shape, dtype=np.float32)
    if frame.resize is not None:
        img = _separable(img, frame.resize, frame.resize)
    return np.asarray(np.clip(img, 0.0, 1.0), dtype=np.float32)


def _render_chunk(
    labels: np.ndarray,
    params: np.ndarray,
    rng: np.random.Generator,
    spec: DomainSpec,
    frame: _Frame,
) -> np.ndarray:
    """Render one batch; returns float32 (B,3,size,size) in [0, 1].

    The random draws happen in a fixed order (background, pose, identity, occlusion,
    light, tone, noise), so a seed renders the same faces as before the split.
    """
    b = labels.shape[0]
    img, _ = _background(rng, spec, frame, b)
    pose = _pose(rng, spec, frame, b)
    who = _identity(rng, spec, b)
    # Hair crown behind the face, then the face.
    u, v, px = pose
    hair_mask = _ramp(_ellipse(u, v - who.fy + 0.10, who.fa + 0.07, who.fb + 0.02), px)
    _blend(img, hair_mask * _ramp(v - who.fy, px), who.hair)
    _blend(img, _ramp(_ellipse(u, v - who.fy, who.fa, who.fb), px), who.skin)
    au_params = [_col(params[:, i]) for i in range(len(PARAMS))]
    _draw_eyes_and_brows(img, pose, who, *au_params[:3])
    _draw_nose_and_mouth(img, pose, who.skin, au_params[3:])
    _occlude_and_light(img, pose, rng, spec, frame)
    return _tone_grey_noise(img, rng, spec, frame)


def generate(domain: str | DomainSpec, n: int, size: int = 32, seed: int = 0) -> SyntheticSet:
    """Render ``n`` faces of a domain.

    Args:
        domain: a preset name (see :data:`PRESETS`) or a :class:`DomainSpec`.
        n: number of images.
        size: output side in pixels (16 to 512).
        seed: random seed; the same arguments give the same arrays.

    Returns:
        ``SyntheticSet(images uint8 (n, size, size, 3), labels int64 (n,),
        aus float32 (n, len(AU_NAMES)))``; labels index :data:`CLASSES`.
    """
    spec = get_domain(domain)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= 10**7:
        raise ConfigError(
            f"cannot generate n={n!r} images", "n must be an integer from 0 to 10,000,000", ""
        )
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 512:
        raise ConfigError(
            f"cannot generate images of size {size!r}",
            "the side must be an integer from 16 to 512 pixels",
            "use --size 32 (the benchmark size) or 48",
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"invalid seed {seed!r}", "seeds are non-negative integers", "")
    n, size, seed = int(n), int(size), int(seed)
    frame = _Frame(max(_RENDER_MIN, size), size, spec)
    prior = spec.class_prior()
    root = np.random.SeedSequence([seed, zlib.crc32(spec.name.encode("utf-8"))])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    aus = np.empty((n, len(AU_NAMES)), dtype=np.float32)
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    for i, child in enumerate(root.spawn(n_chunks)):
        rng = np.random.default_rng(child)
        lo, hi = i * _CHUNK, min(n, (i + 1) * _CHUNK)
        y = rng.choice(len(CLASSES), size=hi - lo, p=prior)
        params = sample_expressions(y, rng)
        out = _render_chunk(y, params, rng, spec, frame)
        images[lo:hi] = np.rint(out * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
        labels[lo:hi] = y
        aus[lo:hi] = action_units(params)
    return SyntheticSet(images, labels, aus)


# ----------------------------------------------------------------------------- writing

#: Marker file written with every synthetic domain (lets --overwrite know what it deletes).
DOMAIN_FILE = "domain.json"


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DatasetError(
            f"output '{out}' exists and is not a directory",
            "synth writes a directory of images",
            "choose another OUT path",
        )
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(
                f"output directory '{out}' is not empty",
                "synth never mixes new images into existing files",
                "choose an empty or new OUT, or pass --overwrite to replace a synth output",
            )
        if not (out / DOMAIN_FILE).is_file():
            raise DatasetError(
                f"output directory '{out}' was not written by `sourcefree synth`",
                f"it has no {DOMAIN_FILE}, so --overwrite will not delete it",
                "choose an empty or new OUT directory",
            )


def write_domain(
    out: str | os.PathLike[str],
    domain: str | DomainSpec,
    n: int,
    size: int = 32,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a domain as PNGs plus ``labels.csv``, ``aus.csv`` and ``domain.json``.

    The directory is built next to ``out`` and renamed into place, so an
    interrupted call leaves nothing at ``out``. ``labels.csv`` has the header
    ``path,label`` with class names (readable by :func:`read_labels_csv`).
    With ``overwrite`` an existing synth output (one holding ``domain.json``)
    is replaced; any other non-empty directory is refused.
    """
    target = Path(out)
    spec = get_domain(domain)
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n < 1:
        raise ConfigError(
            f"cannot write a domain of n={n} images", "n must be at least 1", "pass --n 1000"
        )
    _check_out(target, overwrite)
    data = generate(spec, n, size, seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # respects the umask, unlike mkdtemp's 0700
    try:
        width = max(6, len(str(max(n - 1, 0))))
        names = [f"{i:0{width}d}.png" for i in range(n)]
        for name, img in zip(names, data.images, strict=True):
            Image.fromarray(img, "RGB").save(tmp / name, compress_level=1)
        with open(tmp / "labels.csv", "w", encoding="utf-8", newline="") as fh:
            fh.write("path,label\n")
            fh.writelines(f"{nm},{CLASSES[y]}\n" for nm, y in zip(names, data.labels, strict=True))
        with open(tmp / "aus.csv", "w", encoding="utf-8", newline="") as fh:
            fh.write("path," + ",".join(AU_NAMES) + "\n")
            for nm, row in zip(names, data.aus, strict=True):
                fh.write(nm + "," + ",".join(f"{x:.3f}" for x in row) + "\n")
        meta = {
            "generator": "sourcefree.data.synthetic",
            "domain": spec.to_dict(),
            "n": n,
            "size": size,
            "seed": seed,
            "labels": list(CLASSES),
            "action_units": list(AU_NAMES),
        }
        (tmp / DOMAIN_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
