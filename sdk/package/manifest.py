"""Package manifest, schema version 1 (see docs/package-format.md).

The manifest is the only file read before every other file is verified, so it
is parsed strictly and validated field by field; every error names the field.
No torch import.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sourcefree.errors import ConfigError, PackageError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
#: Key in the ONNX graph's metadata_props holding the manifest without ``files``.
ONNX_MANIFEST_KEY = "sourcefree.manifest"

# ``\Z``, not ``$``: ``$`` also matches before a trailing newline ("name\n").
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
MAX_LABEL_CHARS = 64
#: Unicode categories refused in labels: controls, format characters (bidi
#: overrides, zero-width joiners, BOM), line and paragraph separators,
#: unassigned, surrogate and private-use code points.
LABEL_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"})
KINDS = ("source", "adapted")
COLORS = ("rgb", "gray")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
#: Graph precisions: ``fp32`` and ``fp16`` (``export``), ``int8`` (``optimize`` only: a QDQ
#: graph whose provenance records the fp32 package it came from, ``provenance.optimization``).
#: Inputs and outputs stay float32 and model.safetensors stays the fp32 weights in every case.
PRECISIONS = ("fp32", "fp16", "int8")
#: IR versions a package may declare (the SDK writes 10; onnxruntime 1.20 and later load 7..10).
MIN_IR_VERSION = 7
MAX_IR_VERSION = 10
#: Default-domain opsets a package may declare (the SDK writes 20; onnxruntime 1.20
#: implements up to 21).
MIN_OPSET = 17
MAX_OPSET = 21
MAX_INPUT_SIDE = 4096
#: Most values in one input image (channels x height x width): 3 x 1024 x 1024,
#: 12 MiB as float32. Covers FER models up to 1024 px; 512 px RGB is a quarter.
MAX_INPUT_ELEMENTS = 3 * 1024 * 1024
#: Most bytes of float32 input one batch may take (batch_size x image bytes).
MAX_BATCH_BYTES = 4 << 30
MAX_CLASSES = 100_000
#: How a raw image becomes the model's face (``input.faces.mode``): ``none`` (the image is
#: already a face crop: resized whole), ``detect`` (the largest detected face, square, grown
#: by the margin), ``align`` (as detect, then rotated and warped so the eyes sit on a fixed
#: template; see :mod:`sourcefree.data.faces`).
FACE_MODES = ("none", "detect", "align")
#: What happens to an image where no face is found (``input.faces.no_face``): ``skip``
#: (not trained on, not predicted; counted) or ``whole`` (the whole frame, resized).
NO_FACE_POLICIES = ("skip", "whole")
#: Face detectors a package may name (``input.faces.detector``): OpenCV's Haar cascade
#: ``haarcascade_frontalface_default.xml`` with the SDK's fixed parameters.
FACE_DETECTORS = ("opencv-haar-frontalface-default",)
FACE_KEYS = {"mode", "margin", "no_face", "detector"}
#: Margin around a detected face, as a fraction of its side (bounds and default).
MIN_FACE_MARGIN = 0.0
MAX_FACE_MARGIN = 1.0
DEFAULT_FACE_MARGIN = 0.25
INPUT_KEYS = {"size", "channels", "color", "mean", "std", "interpolation", "layout", "dtype"}
#: Architectures of the registry in sourcefree.engine.models (kept here for torch-free help).
ARCHITECTURE_NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "smallcnn",
)

TOP_LEVEL = {
    "schema_version",
    "kind",
    "name",
    "version",
    "labels",
    "input",
    "architecture",
    "outputs",
    "onnx",
    "files",
    "provenance",
    "source_stats",
    "auxiliary",
}
PROVENANCE_KEYS = {
    "sdk_version",
    "torch_version",
    "created_utc",
    "source_package_sha256",
    "source_packages",
    "method",
    "config",
    "num_target_images",
    "note",
    "optimization",
}
#: ``provenance.optimization`` (written by ``sourcefree optimize``): aggregates only.
OPTIMIZATION_KEYS = {"from_sha256", "top1_agreement", "min_agreement", "calibration_images"}
#: ``optimize`` defaults (here, torch-free, for the CLI and the writer): the top-1 agreement
#: with the fp32 graph a variant must reach, the fewest readable calibration images (with 16,
#: one disagreement already moves the agreement by 6%), the most used (a seeded subset).
DEFAULT_MIN_AGREEMENT = 0.99
MIN_CALIBRATION_IMAGES = 16
DEFAULT_MAX_CALIBRATION_IMAGES = 512
SOURCE_STATS_KEYS = {"class_counts", "class_feature_means", "au_frequencies", "calibration"}
#: Roles of auxiliary models a package may carry (manifest ``auxiliary``).
AUXILIARY_ROLES = ("au_detector",)
AU_DETECTOR_KEYS = {"file", "input", "output", "au_names", "threshold"}
#: Default file name of the action-unit detector graph.
AU_DETECTOR_NAME = "au_detector.onnx"
MAX_AUS = 256
CALIBRATION_KEYS = {
    "validation_accuracy",
    "validation_images",
    "atc_max_softmax",
    "atc_neg_entropy",
}


def _err(path: str, why: str, fix: str = "re-export the package with the SDK") -> PackageError:
    return PackageError(f"manifest field '{path}' is invalid", why, fix)


def _obj(value: Any, path: str, allowed: set[str], required: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _err(path, f"expected an object, got {type(value).__name__}")
    prefix = f"{path}." if path else ""
    missing = sorted(required - value.keys())
    if missing:
        raise PackageError(
            f"manifest field '{prefix}{missing[0]}' is missing",
            "it is required by schema version 1",
            "re-export the package with the SDK",
        )
    unknown = sorted(value.keys() - allowed)
    if unknown:
        raise _err(
            f"{prefix}{unknown[0]}",
            "unknown field; packages carry allowlisted fields only",
            "remove the field, or re-export the package with the SDK",
        )
    return value


def _str(value: Any, path: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str):
        raise _err(path, f"expected a string, got {type(value).__name__}")
    if pattern is not None and not pattern.fullmatch(value):
        raise _err(path, f"{value[:80]!r} does not match {pattern.pattern}")
    return value


def _label(value: Any, path: str) -> str:
    """A class name: printable text, no markup, control or invisible characters."""
    text = _str(value, path)
    shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
    fix = "use plain names such as 'happy' or 'angry face', then re-export"
    if not 1 <= len(text) <= MAX_LABEL_CHARS:
        why = f"{shown} has {len(text)} characters, expected 1 to {MAX_LABEL_CHARS}"
        raise _err(path, why, fix)
    if text != text.strip():
        raise _err(path, f"{shown} starts or ends with whitespace", fix)
    for i, char in enumerate(text):
        category = unicodedata.category(char)
        if category in LABEL_BAD_CATEGORIES or char in "/\\":
            raise _err(
                path,
                f"{shown} holds {char!r} (U+{ord(char):04X}, {category}) at position {i}; "
                "labels may not carry control, invisible, bidi, separator, unassigned "
                "or private-use characters, '/' or '\\'",
                fix,
            )
    return text


def _choice(value: Any, path: str, choices: Sequence[str]) -> str:
    text = _str(value, path)
    if text not in choices:
        raise _err(path, f"{text!r} is not one of {', '.join(choices)}")
    return text


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(path, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _err(path, f"{value} is outside [{lo}, {hi}]")
    return value


def _float(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(path, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _err(path, "must be finite")
    return float(value)


def _list(value: Any, path: str, lo: int, hi: int) -> list[Any]:
    if not isinstance(value, list):
        raise _err(path, f"expected a list, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise _err(path, f"has {len(value)} entries, expected {lo} to {hi}")
    return value


@dataclass(frozen=True)
class FaceSpec:
    """How a raw photo becomes the face the model sees (``input.faces``).

    Part of the input contract: adaptation, evaluation and serving crop the same
    way (:func:`sourcefree.data.faces.face_inputs`).
    """

    mode: str = "none"
    """``none`` (already cropped), ``detect`` or ``align`` (:data:`FACE_MODES`)."""
    margin: float = DEFAULT_FACE_MARGIN
    """Margin around the detected face, as a fraction of its side, in [0, 1]."""
    no_face: str = "skip"
    """``skip`` or ``whole``: what an image without a face becomes (:data:`NO_FACE_POLICIES`)."""
    detector: str = FACE_DETECTORS[0]
    """The face detector's identity (:data:`FACE_DETECTORS`)."""

    def __post_init__(self) -> None:
        path = "input.faces"
        _choice(self.mode, f"{path}.mode", FACE_MODES)
        margin = _float(self.margin, f"{path}.margin")
        if not MIN_FACE_MARGIN <= margin <= MAX_FACE_MARGIN:
            raise _err(
                f"{path}.margin",
                f"{margin} is outside [{MIN_FACE_MARGIN:g}, {MAX_FACE_MARGIN:g}] "
                "(a fraction of the face's side)",
                "pass a margin such as 0.25 (25 % of the face's side)",
            )
        object.__setattr__(self, "margin", margin)
        _choice(self.no_face, f"{path}.no_face", NO_FACE_POLICIES)
        _choice(self.detector, f"{path}.detector", FACE_DETECTORS)

    @property
    def active(self) -> bool:
        """Whether faces are detected at all (mode other than ``none``)."""
        return self.mode != "none"

    def describe(self) -> str:
        """One line, e.g. ``align, margin 0.25, no face: skip``."""
        if not self.active:
            return "none"
        return f"{self.mode}, margin {self.margin:g}, no face: {self.no_face}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "margin": self.margin,
            "no_face": self.no_face,
            "detector": self.detector,
        }

    @classmethod
    def from_dict(cls, value: Any, path: str = "input.faces") -> FaceSpec:
        obj = _obj(value, path, FACE_KEYS, FACE_KEYS)
        mode = _choice(obj["mode"], f"{path}.mode", FACE_MODES)
        if mode == "none":
            raise _err(
                f"{path}.mode",
                "'none' is written by leaving input.faces out (one spelling per contract)",
                "drop input.faces, or re-export the package with the SDK",
            )
        return cls(
            mode=mode,
            margin=_float(obj["margin"], f"{path}.margin"),
            no_face=_choice(obj["no_face"], f"{path}.no_face", NO_FACE_POLICIES),
            detector=_choice(obj["detector"], f"{path}.detector", FACE_DETECTORS),
        )


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input tensor."""

    size: tuple[int, int]
    """Height and width in pixels after resizing."""
    channels: int = 3
    """1 or 3. Grey images are replicated when the model takes 3 channels."""
    color: str = "rgb"
    """``rgb`` or ``gray``: the colour the model was trained on."""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted from pixel values in [0, 1]."""
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel standard deviation divided after the mean."""
    interpolation: str = "bilinear"
    """Resize filter: nearest, bilinear or bicubic."""
    layout: str = "NCHW"
    dtype: str = "float32"
    faces: FaceSpec = field(default_factory=FaceSpec)
    """Face detection and alignment applied before resizing (``none``: the image is the face).
    Written to the manifest only when its mode is not ``none``."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise PackageError when a field is out of its domain."""
        path = "input"
        if len(self.size) != 2:
            raise _err(f"{path}.size", "expected [height, width]")
        for i, side in enumerate(self.size):
            _int(side, f"{path}.size[{i}]", 1, MAX_INPUT_SIDE)
        _int(self.channels, f"{path}.channels", 1, 3)
        if self.channels == 2:
            raise _err(f"{path}.channels", "must be 1 or 3")
        elements = self.channels * self.size[0] * self.size[1]
        if elements > MAX_INPUT_ELEMENTS:
            raise _err(
                f"{path}.size",
                f"{self.channels} x {self.size[0]} x {self.size[1]} = {elements} values per "
                f"image exceeds the cap of {MAX_INPUT_ELEMENTS} (3 x 1024 x 1024, 12 MiB)",
                "export the model with a smaller input size",
            )
        _choice(self.color, f"{path}.color", COLORS)
        if self.color == "rgb" and self.channels != 3:
            raise _err(f"{path}.channels", "colour input needs 3 channels")
        _choice(self.interpolation, f"{path}.interpolation", INTERPOLATIONS)
        _choice(self.layout, f"{path}.layout", ("NCHW",))
        _choice(self.dtype, f"{path}.dtype", ("float32",))
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise _err(f"{path}.{key}", f"needs {self.channels} values, got {len(values)}")
            for i, v in enumerate(values):
                _float(v, f"{path}.{key}[{i}]")
        for i, v in enumerate(self.std):
            if v <= 0:
                raise _err(f"{path}.std[{i}]", "must be positive")
        if not isinstance(self.faces, FaceSpec):
            raise _err(f"{path}.faces", f"expected a FaceSpec, got {type(self.faces).__name__}")

    @property
    def image_bytes(self) -> int:
        """Bytes of one preprocessed image (float32, channels x height x width)."""
        return 4 * self.channels * self.size[0] * self.size[1]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": list(self.size),
            "channels": self.channels,
            "color": self.color,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "layout": self.layout,
            "dtype": self.dtype,
        }
        if self.faces.active:  # absent when none: older manifests serialise unchanged
            out["faces"] = self.faces.to_dict()
        return out

    @classmethod
    def from_dict(cls, value: Any, path: str = "input") -> InputSpec:
        obj = _obj(value, path, INPUT_KEYS | {"faces"}, INPUT_KEYS)
        faces = FaceSpec.from_dict(obj["faces"], f"{path}.faces") if "faces" in obj else FaceSpec()
        size = _list(obj["size"], f"{path}.size", 2, 2)
        mean = _list(obj["mean"], f"{path}.mean", 1, 3)
        std = _list(obj["std"], f"{path}.std", 1, 3)
        return cls(
            size=(
                _int(size[0], f"{path}.size[0]", 1, MAX_INPUT_SIDE),
                _int(size[1], f"{path}.size[1]", 1, MAX_INPUT_SIDE),
            ),
            channels=_int(obj["channels"], f"{path}.channels", 1, 3),
            color=_choice(obj["color"], f"{path}.color", COLORS),
            mean=tuple(_float(v, f"{path}.mean[{i}]") for i, v in enumerate(mean)),
            std=tuple(_float(v, f"{path}.std[{i}]") for i, v in enumerate(std)),
            interpolation=_choice(obj["interpolation"], f"{path}.interpolation", INTERPOLATIONS),
            layout=_str(obj["layout"], f"{path}.layout"),
            dtype=_str(obj["dtype"], f"{path}.dtype"),
            faces=faces,
        )


def physical_memory_bytes() -> int | None:
    """The machine's physical memory in bytes (``os.sysconf``), or None where unknown."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return int(ram) if ram > 0 else None


def batch_budget_bytes() -> int:
    """Bytes one input batch may take: MAX_BATCH_BYTES, or a quarter of the RAM if less."""
    ram = physical_memory_bytes()
    return MAX_BATCH_BYTES if ram is None else min(MAX_BATCH_BYTES, ram // 4)


def check_batch_bytes(spec: InputSpec, batch_size: int, option: str = "batch_size") -> None:
    """Refuse a batch whose float32 input would exceed :func:`batch_budget_bytes`."""
    budget = batch_budget_bytes()
    need = batch_size * spec.image_bytes
    if need > budget:
        most = max(1, budget // spec.image_bytes)
        raise ConfigError(
            f"{option} {batch_size} is too large for {spec.size[0]}x{spec.size[1]} inputs",
            f"one batch would take {need >> 20} MiB of input; the cap is {budget >> 20} MiB "
            f"(min of {MAX_BATCH_BYTES >> 30} GiB and a quarter of the RAM)",
            f"pass {option} {most} or less",
        )


#: Prefix of architecture names built by timm (``timm:NAME``, see docs/package-format.md).
TIMM_PREFIX = "timm:"
#: A registry name, or ``timm:`` and a timm model name (timm's own style, at most 100).
ARCH_NAME_RE = re.compile(r"^(?:timm:[a-z0-9][a-z0-9_.]{0,99}|[A-Za-z0-9][A-Za-z0-9._-]{0,63})\Z")
TIMM_VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+_-]{0,31}\Z")
#: ``timm.create_model`` keyword options a package may set, by value kind. Shape and
#: regularisation knobs only: never ``pretrained``, ``pretrained_cfg``,
#: ``checkpoint_path``, ``cache_dir`` or any path, layer class or device (a
#: package must not make the customer download, read a file or run named code);
#: ``in_chans`` comes from ``in_channels``, ``num_classes`` from the labels.
TIMM_OPTIONS: dict[str, str] = {
    "img_size": "int",
    "patch_size": "int",
    "embed_dim": "int",
    "depth": "int",
    "num_heads": "int",
    "reg_tokens": "int",
    "stem_width": "int",
    "mlp_ratio": "float",
    "init_values": "float",
    "ls_init_value": "float",
    "drop_rate": "float",
    "drop_path_rate": "float",
    "attn_drop_rate": "float",
    "proj_drop_rate": "float",
    "pos_drop_rate": "float",
    "qkv_bias": "bool",
    "class_token": "bool",
    "no_embed_class": "bool",
    "global_pool": "str",
}
MAX_TIMM_OPTIONS = 16
MAX_OPTION_INT = 4096
MAX_OPTION_FLOAT = 1e3
OPTION_STR_RE = re.compile(r"^[a-z0-9_]{1,32}\Z")
OPTION_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")

ArchOption = bool | int | float | str
"""A timm option's value: a JSON scalar (see :data:`TIMM_OPTIONS` for the kind per key)."""


def _option(key: str, value: Any, path: str, shown: str) -> ArchOption:
    """One allowlisted timm option, its value checked against its kind and bounds."""
    kind = TIMM_OPTIONS.get(key)
    if kind is None:
        raise _err(
            path,
            f"option {shown} is not allowed; packages may set only "
            f"{', '.join(sorted(TIMM_OPTIONS))} (never weights, paths or downloads)",
            "drop the option; the package's own weights replace pretrained ones",
        )
    fix = "pass a value in range (--arch-option KEY=VALUE parses VALUE as JSON)"
    if kind == "bool":
        if not isinstance(value, bool):
            raise _err(path, f"expected true or false, got {type(value).__name__}", fix)
        return value
    if isinstance(value, bool):
        raise _err(path, f"expected a {kind}, got a boolean", fix)
    if kind == "int":
        if not isinstance(value, int):
            raise _err(path, f"expected an integer, got {type(value).__name__}", fix)
        if not 0 <= value <= MAX_OPTION_INT:
            raise _err(path, f"{value} is outside [0, {MAX_OPTION_INT}]", fix)
        return value
    if kind == "float":
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _err(path, f"expected a finite number, got {str(value)[:20]}", fix)
        if not 0 <= value <= MAX_OPTION_FLOAT:
            raise _err(path, f"{value} is outside [0, {MAX_OPTION_FLOAT:g}]", fix)
        return value
    if not isinstance(value, str) or not OPTION_STR_RE.fullmatch(value):
        raise _err(path, f"expected a short name matching {OPTION_STR_RE.pattern}", fix)
    return value


def timm_options(value: Any, path: str = "architecture.options") -> dict[str, ArchOption]:
    """Check a timm option object: at most 16 allowlisted keys with bounded scalar values.

    Raises:
        PackageError: not an object, too many options, a key outside
            :data:`TIMM_OPTIONS`, or a value of the wrong kind or out of bounds.
    """
    if not isinstance(value, Mapping):
        raise _err(path, f"expected an object, got {type(value).__name__}")
    if len(value) > MAX_TIMM_OPTIONS:
        raise _err(
            path,
            f"has {len(value)} options, at most {MAX_TIMM_OPTIONS} are allowed",
            "keep the options that differ from the model's defaults",
        )
    out: dict[str, ArchOption] = {}
    for key in sorted(value, key=str):
        if not isinstance(key, str):
            raise _err(path, f"option names are strings, got {type(key).__name__}")
        shown = key[:40] if OPTION_KEY_RE.fullmatch(key) else ascii(key[:40])
        out[key] = _option(key, value[key], f"{path}.{shown}", shown)
    return out


@dataclass(frozen=True)
class ArchitectureSpec:
    """Which architecture the weights belong to: a registry name or ``timm:NAME``."""

    name: str
    """Registry name (``resnet18``, ``smallcnn``) or ``timm:NAME`` (e.g. ``timm:resnet26d``)."""
    num_classes: int
    feature_dim: int
    """Width of the ``features`` output (the input of the head)."""
    in_channels: int = 3
    options: Mapping[str, ArchOption] | None = None
    """timm only: keyword options of ``timm.create_model`` (:data:`TIMM_OPTIONS`)."""
    timm_version: str | None = None
    """timm only: the timm version the vendor exported with."""

    def __post_init__(self) -> None:
        path = "architecture"
        timm = self.name.startswith(TIMM_PREFIX)
        if not timm and (self.options is not None or self.timm_version is not None):
            field_name = "options" if self.options is not None else "timm_version"
            raise _err(
                f"{path}.{field_name}",
                f"only timm architectures ({TIMM_PREFIX}NAME) carry it, not {self.name[:64]!r}",
                "drop the field, or name a timm model",
            )
        if timm and self.timm_version is None:
            raise _err(f"{path}.timm_version", "a timm architecture records the timm version")
        if self.timm_version is not None:
            _str(self.timm_version, f"{path}.timm_version", TIMM_VERSION_RE)
        if self.options is not None:
            object.__setattr__(self, "options", timm_options(self.options, f"{path}.options"))

    @property
    def is_timm(self) -> bool:
        """Whether timm builds the module (``timm:NAME``)."""
        return self.name.startswith(TIMM_PREFIX)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "in_channels": self.in_channels,
        }
        if self.options is not None:
            out["options"] = dict(self.options)
        if self.timm_version is not None:
            out["timm_version"] = self.timm_version
        return out

    @classmethod
    def from_dict(cls, value: Any, path: str = "architecture") -> ArchitectureSpec:
        keys = {"name", "num_classes", "feature_dim", "in_channels"}
        obj = _obj(value, path, keys | {"options", "timm_version"}, keys)
        options = obj.get("options")
        version = obj.get("timm_version")
        return cls(
            name=_str(obj["name"], f"{path}.name", ARCH_NAME_RE),
            num_classes=_int(obj["num_classes"], f"{path}.num_classes", 2, MAX_CLASSES),
            feature_dim=_int(obj["feature_dim"], f"{path}.feature_dim", 1, 1 << 16),
            in_channels=_int(obj["in_channels"], f"{path}.in_channels", 1, 3),
            options=None if options is None else timm_options(options, f"{path}.options"),
            timm_version=None if version is None else _str(version, f"{path}.timm_version"),
        )


@dataclass(frozen=True)
class OnnxSpec:
    """Graph contract: tensor names, opset, IR version and precision."""

    opset: int
    ir_version: int
    precision: str = "fp32"
    input: str = "input"
    logits: str = "logits"
    features: str = "features"

    def to_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "ir_version": self.ir_version,
            "precision": self.precision,
            "input": self.input,
            "logits": self.logits,
            "features": self.features,
        }

    @classmethod
    def from_dict(cls, value: Any, path: str = "onnx") -> OnnxSpec:
        keys = {"opset", "ir_version", "precision", "input", "logits", "features"}
        obj = _obj(value, path, keys, keys)
        return cls(
            opset=_int(obj["opset"], f"{path}.opset", MIN_OPSET, MAX_OPSET),
            ir_version=_int(
                obj["ir_version"], f"{path}.ir_version", MIN_IR_VERSION, MAX_IR_VERSION
            ),
            precision=_choice(obj["precision"], f"{path}.precision", PRECISIONS),
            input=_str(obj["input"], f"{path}.input", NAME_RE),
            logits=_str(obj["logits"], f"{path}.logits", NAME_RE),
            features=_str(obj["features"], f"{path}.features", NAME_RE),
        )


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Calibration:
    """The vendor's validation numbers behind label-free accuracy estimates (ATC).

    Average Thresholded Confidence (Garg et al., ICLR 2022, "Leveraging unlabeled
    data to predict out-of-distribution performance"): on held-out validation images
    of the source domain, the threshold ``t`` of a confidence score is fitted so
    that the fraction of images scoring above ``t`` equals the validation accuracy.
    Aggregates only: two thresholds, an accuracy and a count.
    """

    validation_accuracy: float
    """Top-1 accuracy of the exported model on the vendor's validation images."""
    validation_images: int
    """How many validation images the numbers come from."""
    atc_max_softmax: float
    """ATC threshold on the maximum softmax probability."""
    atc_neg_entropy: float
    """ATC threshold on the negative entropy of the softmax (ATC-NE, the paper's best)."""

    def __post_init__(self) -> None:
        path = "source_stats.calibration"
        acc = _float(self.validation_accuracy, f"{path}.validation_accuracy")
        if not 0.0 <= acc <= 1.0:
            raise _err(f"{path}.validation_accuracy", f"{acc} is outside [0, 1]")
        _int(self.validation_images, f"{path}.validation_images", 1, 1 << 40)
        _float(self.atc_max_softmax, f"{path}.atc_max_softmax")
        _float(self.atc_neg_entropy, f"{path}.atc_neg_entropy")

    def threshold(self, score: str) -> float:
        """The threshold of ``score`` (``max_softmax`` or ``neg_entropy``)."""
        return self.atc_max_softmax if score == "max_softmax" else self.atc_neg_entropy

    def to_dict(self) -> dict[str, Any]:
        return {
            "validation_accuracy": self.validation_accuracy,
            "validation_images": self.validation_images,
            "atc_max_softmax": self.atc_max_softmax,
            "atc_neg_entropy": self.atc_neg_entropy,
        }

    @classmethod
    def from_dict(cls, value: Any, path: str = "source_stats.calibration") -> Calibration:
        obj = _obj(value, path, CALIBRATION_KEYS, CALIBRATION_KEYS)
        return cls(
            validation_accuracy=_float(obj["validation_accuracy"], f"{path}.validation_accuracy"),
            validation_images=_int(
                obj["validation_images"], f"{path}.validation_images", 1, 1 << 40
            ),
            atc_max_softmax=_float(obj["atc_max_softmax"], f"{path}.atc_max_softmax"),
            atc_neg_entropy=_float(obj["atc_neg_entropy"], f"{path}.atc_neg_entropy"),
        )


@dataclass(frozen=True)
class SourceStats:
    """Aggregate, privacy-safe statistics a vendor may ship (never per-image)."""

    class_counts: tuple[int, ...] | None = None
    """Training images per class (DIFC margins, priors)."""
    class_feature_means: tuple[tuple[float, ...], ...] | None = None
    """Per-class mean of the ``features`` output (prototypes, alignment)."""
    au_frequencies: tuple[tuple[float, ...], ...] | None = None
    """Per-class action-unit frequencies in [0, 1] (AdaFER)."""
    calibration: Calibration | None = None
    """Validation accuracy and ATC thresholds (label-free accuracy estimates on site)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.class_counts is not None:
            out["class_counts"] = list(self.class_counts)
        if self.class_feature_means is not None:
            out["class_feature_means"] = [list(r) for r in self.class_feature_means]
        if self.au_frequencies is not None:
            out["au_frequencies"] = [list(r) for r in self.au_frequencies]
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        return out

    @classmethod
    def from_dict(cls, value: Any, num_classes: int, path: str = "source_stats") -> SourceStats:
        obj = _obj(value, path, SOURCE_STATS_KEYS, set())
        counts = None
        if "class_counts" in obj:
            raw = _list(obj["class_counts"], f"{path}.class_counts", num_classes, num_classes)
            counts = tuple(
                _int(v, f"{path}.class_counts[{i}]", 0, 1 << 40) for i, v in enumerate(raw)
            )
        au = _matrix(obj, "au_frequencies", num_classes, path)
        for i, row in enumerate(au or ()):
            for j, v in enumerate(row):
                if not 0.0 <= v <= 1.0:
                    raise _err(f"{path}.au_frequencies[{i}][{j}]", f"{v} is outside [0, 1]")
        return cls(
            class_counts=counts,
            class_feature_means=_matrix(obj, "class_feature_means", num_classes, path),
            au_frequencies=au,
            calibration=(
                Calibration.from_dict(obj["calibration"], f"{path}.calibration")
                if "calibration" in obj
                else None
            ),
        )


def _matrix(
    obj: Mapping[str, Any], key: str, rows: int, path: str
) -> tuple[tuple[float, ...], ...] | None:
    if key not in obj:
        return None
    raw = _list(obj[key], f"{path}.{key}", rows, rows)
    out = []
    width = -1
    for i, row in enumerate(raw):
        r = _list(row, f"{path}.{key}[{i}]", 1, 1 << 16)
        if width >= 0 and len(r) != width:
            raise _err(f"{path}.{key}[{i}]", f"has {len(r)} values, row 0 has {width}")
        width = len(r)
        out.append(tuple(_float(v, f"{path}.{key}[{i}][{j}]") for j, v in enumerate(r)))
    return tuple(out)


@dataclass(frozen=True)
class AUDetectorSpec:
    """An action-unit detector shipped in the package (``auxiliary.au_detector``).

    A plain ONNX graph with the classifier's input contract (same ``input`` spec:
    size, colour, mean, std) and one output of shape ``[batch, len(au_names)]``
    holding action-unit probabilities (or intensities) in [0, 1]. It is verified
    like ``model.onnx`` (hash, op allowlist, no external data, no metadata) and
    run with onnxruntime; it is never unpickled.
    """

    au_names: tuple[str, ...]
    """Action-unit names in output order (e.g. ``AU1``, ``AU12``)."""
    file: str = AU_DETECTOR_NAME
    """File name inside the package (listed in ``files``)."""
    threshold: float = 0.5
    """An AU counts as active when its output is ``>= threshold``; the vendor's
    ``source_stats.au_frequencies`` were counted with the same threshold."""
    input: str = "input"
    """Input tensor name."""
    output: str = "au_probabilities"
    """Output tensor name."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "input": self.input,
            "output": self.output,
            "au_names": list(self.au_names),
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, value: Any, path: str = "auxiliary.au_detector") -> AUDetectorSpec:
        obj = _obj(value, path, AU_DETECTOR_KEYS, AU_DETECTOR_KEYS)
        file = _str(obj["file"], f"{path}.file", FILE_NAME_RE)
        if not file.endswith(".onnx") or file in (MANIFEST_NAME, WEIGHTS_NAME, ONNX_NAME):
            raise _err(
                f"{path}.file",
                f"{file!r} must be a .onnx file other than {ONNX_NAME}",
            )
        raw = _list(obj["au_names"], f"{path}.au_names", 1, MAX_AUS)
        names = tuple(_str(v, f"{path}.au_names[{i}]", NAME_RE) for i, v in enumerate(raw))
        if len(set(names)) != len(names):
            raise _err(f"{path}.au_names", "action-unit names must be unique")
        threshold = _float(obj["threshold"], f"{path}.threshold")
        if not 0.0 < threshold < 1.0:
            raise _err(f"{path}.threshold", f"{threshold} is outside (0, 1)")
        return cls(
            au_names=names,
            file=file,
            threshold=threshold,
            input=_str(obj["input"], f"{path}.input", NAME_RE),
            output=_str(obj["output"], f"{path}.output", NAME_RE),
        )


@dataclass(frozen=True)
class Auxiliary:
    """Auxiliary models a package may carry besides its classifier (``auxiliary``)."""

    au_detector: AUDetectorSpec | None = None
    """Action-unit detector (AdaFER)."""

    def files(self) -> tuple[str, ...]:
        """The package files the auxiliary models live in."""
        return tuple(spec.file for spec in (self.au_detector,) if spec is not None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.au_detector is not None:
            out["au_detector"] = self.au_detector.to_dict()
        return out

    @classmethod
    def from_dict(cls, value: Any, path: str = "auxiliary") -> Auxiliary:
        obj = _obj(value, path, set(AUXILIARY_ROLES), set())
        if not obj:
            raise _err(path, "it names no model; leave the field out when there is none")
        detector = None
        if "au_detector" in obj:
            detector = AUDetectorSpec.from_dict(obj["au_detector"], f"{path}.au_detector")
        return cls(au_detector=detector)


@dataclass(frozen=True)
class Optimization:
    """How a deployment variant was made (``provenance.optimization``, ``sourcefree optimize``).

    Aggregates only: the calibration images stay on site, the manifest holds how many
    there were and how often the variant's top-1 class agreed with the fp32 graph's.
    """

    from_sha256: str
    """Identity (sha256 of manifest.json) of the verified fp32 package it was made from."""
    top1_agreement: float
    """Share of the calibration images whose top-1 class equals the fp32 package's."""
    min_agreement: float
    """The threshold the agreement had to reach (``--min-agreement``)."""
    calibration_images: int
    """How many images calibrated and checked it."""

    def __post_init__(self) -> None:
        path = "provenance.optimization"
        _str(self.from_sha256, f"{path}.from_sha256", SHA256_RE)
        for key in ("top1_agreement", "min_agreement"):
            value = _float(getattr(self, key), f"{path}.{key}")
            if not 0.0 <= value <= 1.0:
                raise _err(f"{path}.{key}", f"{value} is outside [0, 1]")
        if self.top1_agreement < self.min_agreement:
            raise _err(
                f"{path}.top1_agreement",
                f"{self.top1_agreement} is below min_agreement {self.min_agreement}",
            )
        _int(self.calibration_images, f"{path}.calibration_images", 1, 1 << 40)

    def to_dict(self) -> dict[str, Any]:
        return {
            "from_sha256": self.from_sha256,
            "top1_agreement": self.top1_agreement,
            "min_agreement": self.min_agreement,
            "calibration_images": self.calibration_images,
        }

    @classmethod
    def from_dict(cls, value: Any, path: str = "provenance.optimization") -> Optimization:
        obj = _obj(value, path, OPTIMIZATION_KEYS, OPTIMIZATION_KEYS)
        return cls(
            from_sha256=_str(obj["from_sha256"], f"{path}.from_sha256", SHA256_RE),
            top1_agreement=_float(obj["top1_agreement"], f"{path}.top1_agreement"),
            min_agreement=_float(obj["min_agreement"], f"{path}.min_agreement"),
            calibration_images=_int(
                obj["calibration_images"], f"{path}.calibration_images", 1, 1 << 40
            ),
        )


def _check_precision(onnx: OnnxSpec, provenance: Mapping[str, Any]) -> None:
    """An int8 graph names the fp32 package it was optimised from; an fp32 graph names none."""
    record = provenance.get("optimization")
    if record is not None:
        Optimization.from_dict(record)
    if onnx.precision == "int8" and record is None:
        raise PackageError(
            "manifest field 'provenance.optimization' is missing",
            "an int8 graph is made by `sourcefree optimize`, which records the fp32 package "
            "it came from and the measured agreement",
            "optimize the fp32 package again with `sourcefree optimize --int8`",
        )
    if onnx.precision == "fp32" and record is not None:
        raise _err(
            "provenance.optimization",
            "an fp32 graph is not an optimised variant",
            "drop the field, or re-export the package with the SDK",
        )


def _json_value(value: Any, path: str, depth: int = 0) -> Any:
    """Accept plain JSON scalars, lists and objects of short strings (provenance)."""
    if depth > 6:
        raise _err(path, "nested too deeply")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return _float(value, path)
    if isinstance(value, str):
        if len(value) > 256:
            raise _err(path, "strings in provenance are limited to 256 characters")
        return value
    if isinstance(value, list):
        return [_json_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            _str(k, f"{path}.<key>"): _json_value(v, f"{path}.{k}", depth + 1)
            for k, v in value.items()
        }
    raise _err(path, f"unsupported value of type {type(value).__name__}")


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``."""

    kind: str
    name: str
    version: str
    labels: tuple[str, ...]
    input: InputSpec
    architecture: ArchitectureSpec
    onnx: OnnxSpec
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    source_stats: SourceStats | None = None
    auxiliary: Auxiliary | None = None
    """Auxiliary models (an action-unit detector), each in its own listed file."""
    schema_version: int = SCHEMA_VERSION

    @property
    def optimization(self) -> Optimization | None:
        """How this deployment variant was made (``sourcefree optimize``), if it is one."""
        record = self.provenance.get("optimization")
        return None if record is None else Optimization.from_dict(record)

    def to_dict(self, *, with_files: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "labels": list(self.labels),
            "input": self.input.to_dict(),
            "architecture": self.architecture.to_dict(),
            "outputs": {"logits": self.onnx.logits, "features": self.onnx.features},
            "onnx": self.onnx.to_dict(),
            "provenance": dict(self.provenance),
        }
        if self.source_stats is not None:
            out["source_stats"] = self.source_stats.to_dict()
        if self.auxiliary is not None:
            out["auxiliary"] = self.auxiliary.to_dict()
        if with_files:
            out["files"] = {
                k: {"size": v.size, "sha256": v.sha256} for k, v in sorted(self.files.items())
            }
        return out

    @classmethod
    def from_dict(cls, value: Any) -> Manifest:
        """Validate a parsed manifest object; errors name the offending field."""
        if not isinstance(value, dict):
            raise _err("<root>", "the manifest must be a JSON object")
        if "schema_version" not in value:
            raise PackageError(
                "manifest field 'schema_version' is missing",
                "without it the format cannot be known",
                "re-export the package with the SDK",
            )
        version = value["schema_version"]
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise PackageError(
                f"manifest field 'schema_version' is {version!r}",
                f"this SDK reads schema version {SCHEMA_VERSION} only",
                "upgrade sourcefree, or ask the vendor for a version-1 package",
            )
        required = TOP_LEVEL - {"source_stats", "auxiliary"}
        obj = _obj(value, "", TOP_LEVEL, required)
        labels_raw = _list(obj["labels"], "labels", 2, MAX_CLASSES)
        labels = tuple(_label(v, f"labels[{i}]") for i, v in enumerate(labels_raw))
        if len(set(labels)) != len(labels):
            raise _err("labels", "label names must be unique")
        arch = ArchitectureSpec.from_dict(obj["architecture"])
        if arch.num_classes != len(labels):
            raise _err(
                "architecture.num_classes",
                f"is {arch.num_classes} but there are {len(labels)} labels",
            )
        spec = InputSpec.from_dict(obj["input"])
        if spec.channels != arch.in_channels:
            raise _err(
                "input.channels",
                f"is {spec.channels} but the architecture takes {arch.in_channels}",
            )
        onnx = OnnxSpec.from_dict(obj["onnx"])
        outputs = _obj(obj["outputs"], "outputs", {"logits", "features"}, {"logits", "features"})
        if outputs["logits"] != onnx.logits or outputs["features"] != onnx.features:
            raise _err("outputs", "must name the same tensors as onnx.logits and onnx.features")
        files_raw = obj["files"]
        if not isinstance(files_raw, dict):
            raise _err("files", "expected an object mapping file names to size and sha256")
        files: dict[str, FileEntry] = {}
        for name, entry in files_raw.items():
            _str(name, "files.<name>", FILE_NAME_RE)
            if name in (MANIFEST_NAME, SIGNATURE_NAME):
                raise _err(f"files.{name}", "the manifest and signature are not listed in files")
            e = _obj(entry, f"files.{name}", {"size", "sha256"}, {"size", "sha256"})
            files[name] = FileEntry(
                size=_int(e["size"], f"files.{name}.size", 0, 1 << 42),
                sha256=_str(e["sha256"], f"files.{name}.sha256", SHA256_RE),
            )
        for needed in (WEIGHTS_NAME, ONNX_NAME):
            if needed not in files:
                raise PackageError(
                    f"manifest field 'files.{needed}' is missing",
                    "every package carries weights and an ONNX graph",
                    "re-export the package with the SDK",
                )
        prov = _obj(obj["provenance"], "provenance", PROVENANCE_KEYS, set())
        provenance = {k: _json_value(v, f"provenance.{k}") for k, v in prov.items()}
        _check_precision(onnx, provenance)
        stats = None
        if "source_stats" in obj:
            stats = SourceStats.from_dict(obj["source_stats"], arch.num_classes)
        auxiliary = None
        if "auxiliary" in obj:
            auxiliary = Auxiliary.from_dict(obj["auxiliary"])
            _check_auxiliary(auxiliary, files, stats)
        _check_file_set(files, auxiliary)
        return cls(
            kind=_choice(obj["kind"], "kind", KINDS),
            name=_str(obj["name"], "name", NAME_RE),
            version=_str(obj["version"], "version", NAME_RE),
            labels=labels,
            input=spec,
            architecture=arch,
            onnx=onnx,
            files=files,
            provenance=provenance,
            source_stats=stats,
            auxiliary=auxiliary,
        )


def _check_file_set(files: Mapping[str, FileEntry], auxiliary: Auxiliary | None) -> None:
    """``files`` lists the model files and the auxiliary graphs, nothing else."""
    allowed = {WEIGHTS_NAME, ONNX_NAME, *(auxiliary.files() if auxiliary is not None else ())}
    for name in sorted(set(files) - allowed):
        raise _err(
            f"files.{name}",
            f"a package holds {', '.join(sorted(allowed))} only (besides manifest.json "
            "and signature); the format defines no other file",
            "remove the file and its entry, or re-export the package with the SDK",
        )


def _check_auxiliary(
    auxiliary: Auxiliary, files: Mapping[str, FileEntry], stats: SourceStats | None
) -> None:
    """Cross-field rules: auxiliary files are listed; AU widths agree with the statistics."""
    for role, spec in (("au_detector", auxiliary.au_detector),):
        if spec is not None and spec.file not in files:
            raise PackageError(
                f"manifest field 'files.{spec.file}' is missing",
                f"auxiliary.{role} lives in that file, and every file is listed with its hash",
                "re-export the package with the SDK",
            )
    det = auxiliary.au_detector
    freqs = stats.au_frequencies if stats is not None else None
    if det is not None and freqs is not None and len(freqs[0]) != len(det.au_names):
        raise _err(
            "source_stats.au_frequencies",
            f"rows have {len(freqs[0])} values but auxiliary.au_detector names "
            f"{len(det.au_names)} action units",
            "export the frequencies over the detector's action units, in its output order",
        )
