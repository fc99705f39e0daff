"""The vendor's CLI verb: ``sourcefree export`` (wired into the CLI by ``sourcefree.cli.app``).

With ``--val-dir/--val-labels`` it ships the aggregate statistics the Python API's
``source_package(source_stats=...)`` ships (class counts, class feature means, the
do-no-harm gate's calibration), computed by the same functions; with ``--au-detector``
an action-unit detector and its per-class AU frequencies (AdaFER). No image leaves.
Torch and onnx are imported inside the command, so ``sourcefree --help`` stays torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sourcefree.cli.errors import typed_errors_command as _typed_errors
from sourcefree.package.manifest import (
    ARCHITECTURE_NAMES,
    DEFAULT_FACE_MARGIN,
    FACE_MODES,
    MAX_FACE_MARGIN,
    MIN_FACE_MARGIN,
    NO_FACE_POLICIES,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from sourcefree.data.dataset import ImageDataset
    from sourcefree.engine.models import Architecture, Classifier
    from sourcefree.package.manifest import AUDetectorSpec, FaceSpec, InputSpec


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None


def _counts(text: str | None, num_classes: int) -> list[int] | None:
    """``--class-counts``: one whole number >= 0 per class, comma-separated."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = [-1]
    if any(v < 0 for v in values) or len(values) != num_classes:
        raise click.BadParameter(
            f"expected {num_classes} comma-separated whole numbers >= 0 (one per --labels "
            f"class), got {text[:80]!r}",
            param_hint="--class-counts",
        )
    return values


def _arch_options(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``KEY=VALUE`` pairs; VALUE is read as a JSON scalar (a bare word is a string)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            raise click.BadParameter(
                f"expected KEY=VALUE, got {pair[:80]!r}", param_hint="--arch-option"
            )
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if value is None or isinstance(value, (list, dict)) or key in out:
            why = "is given twice" if key in out else "must be a number, true/false or a name"
            raise click.BadParameter(f"{key[:40]!r} {why}", param_hint="--arch-option")
        out[key] = value
    return out or None


@click.command("export")
@click.option(
    "--arch",
    required=True,
    help=f"Architecture: {', '.join(ARCHITECTURE_NAMES)}, or timm:NAME (a timm model).",
)
@click.option(
    "--arch-option",
    "arch_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="timm:NAME only: a timm.create_model option (allowlisted, e.g. img_size=32); repeatable.",
)
@click.option(
    "--weights",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="safetensors file with the architecture's own state_dict (num_classes = #labels).",
)
@click.option("--labels", required=True, help="Class names in output order, comma-separated.")
@click.option("--input-size", required=True, type=click.IntRange(1, 4096), help="Side in px.")
@click.option("--mean", default=None, help="Per-channel mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--grayscale", is_flag=True, help="The model was trained on grey images.")
@click.option(
    "--interpolation",
    type=click.Choice(["nearest", "bilinear", "bicubic"]),
    default="bilinear",
    show_default=True,
)
@click.option(
    "--faces",
    type=click.Choice(FACE_MODES),
    default="none",
    show_default=True,
    help="How a raw photo becomes the model's face (input.faces): none (images are already "
    "face crops), detect (largest face, square, plus --face-margin) or align (detect, then "
    "the eyes levelled onto a fixed template). Adapt, evaluate and predict all apply it.",
)
@click.option(
    "--face-margin",
    type=click.FloatRange(MIN_FACE_MARGIN, MAX_FACE_MARGIN),
    default=None,
    help=f"--faces detect|align: margin around the face, a fraction of its side "
    f"[default: {DEFAULT_FACE_MARGIN}].",
)
@click.option(
    "--no-face",
    type=click.Choice(NO_FACE_POLICIES),
    default=None,
    help="--faces detect|align: an image without a face is skipped and counted (skip, the "
    "default) or resized whole (whole).",
)
@click.option("--name", default=None, help="Package name (default: the --out folder name).")
@click.option("--version", "pkg_version", default="1.0.0", show_default=True)
@click.option(
    "--class-counts",
    default=None,
    help="Training images per class (aggregate source stats); overrides the --val-dir counts.",
)
@click.option(
    "--val-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled validation images of the source domain, not trained on (with --val-labels): "
    "ship class counts, class feature means and the do-no-harm gate's calibration. "
    "Only these aggregates enter the package, never an image.",
)
@click.option(
    "--val-labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="path,label CSV of the --val-dir images (the format of adapt --eval-labels).",
)
@click.option(
    "--au-detector",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="safetensors action-unit detector for AdaFER (needs --au-names and --val-dir): the "
    "--au-arch model's own state_dict with one output per AU (sigmoid applied), or an "
    "AUDetectorNet's state_dict (sourcefree.vendor.training.train_au_detector).",
)
@click.option(
    "--au-names", default=None, help="AU names in the detector's output order, comma-separated."
)
@click.option(
    "--au-arch",
    default="smallcnn",
    show_default=True,
    help="Registered architecture of --au-detector; it takes the classifier's input.",
)
@click.option(
    "--au-threshold",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="An AU is active at or above this output (AU frequencies, AdaFER).",
)
@click.option("--fp16", is_flag=True, help="Store an fp16 graph (checked by top-1 agreement).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Package directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@_typed_errors
def export_cmd(
    arch: str,
    arch_options: tuple[str, ...],
    weights: Path,
    labels: str,
    input_size: int,
    grayscale: bool,
    name: str | None,
    pkg_version: str,
    class_counts: str | None,
    val_dir: Path | None,
    val_labels: Path | None,
    au_detector: Path | None,
    au_names: str | None,
    au_arch: str,
    au_threshold: float,
    fp16: bool,
    out: Path,
    overwrite: bool,
    **preprocess: Any,
) -> None:
    """Vendor: package a trained model (safetensors + ONNX + manifest).

    The model is exported to ONNX and checked against torch on random inputs
    (fp32: max|onnx - torch| <= 1e-4 + 1e-3 x max|torch| on the logits and features;
    fp16: 1e-3 + 3e-2 x max|torch| and top-1 agreement >= 95%);
    on any failure nothing is written.

    With --val-dir/--val-labels the package also carries aggregates of those
    labelled images: images per class, the per-class mean of the features
    (LA-CMFER) and the calibration behind the do-no-harm gate's accuracy
    estimate (validation accuracy, two ATC thresholds). --au-detector adds an
    action-unit detector and the per-class AU frequencies it finds on them (AdaFER).

    \b
    Example:
      sourcefree export --arch resnet18 --weights fer.safetensors \\
        --labels surprise,fear,disgust,happiness,sadness,anger,neutral \\
        --input-size 64 --out fer-resnet18
      sourcefree export --arch smallcnn --weights fer.safetensors --labels ... \\
        --input-size 32 --val-dir val/ --val-labels val/labels.csv \\
        --au-detector au.safetensors --au-names AU1,AU2,AU4 --out fer-small
      sourcefree export --arch timm:vit_tiny_patch16_224 --arch-option img_size=32 \\
        --arch-option patch_size=4 --weights vit.safetensors --labels ... \\
        --input-size 32 --out fer-vit
      sourcefree export --arch resnet18 --weights fer.safetensors --labels ... \\
        --input-size 64 --faces align --face-margin 0.25 --no-face skip --out fer-photos
    """
    from sourcefree.engine.models import from_vendor_state
    from sourcefree.export import source_package
    from sourcefree.fsutil import check_output_dir

    check_output_dir(out.absolute(), overwrite)
    names = [s.strip() for s in labels.split(",") if s.strip()]
    counts = _counts(class_counts, len(names))
    au = _au_spec(au_detector, au_names, au_threshold, val_dir is not None)
    val = _val_dataset(val_dir, val_labels, names)  # the CSV is checked before any decoding
    options = _arch_options(arch_options)
    a, state, spec = _vendor_input(arch, options, weights, input_size, grayscale, **preprocess)
    x, y = _decode(val, spec, names) if val is not None else (None, None)
    model = from_vendor_state(a, state, len(names), spec.channels).eval()
    detector = _detector(au_detector, au_arch, au, spec.channels)
    stats = _source_stats(model, x, y, len(names), detector, au)
    if counts is not None:
        stats["class_counts"] = counts
    pkg = source_package(
        model,
        architecture=arch,
        architecture_options=options,
        labels=names,
        input_spec=spec,
        out=out,
        source_stats=stats or None,
        au_detector=detector,
        au_names=au.au_names if au is not None else None,
        au_threshold=au_threshold,
        name=name,
        version=pkg_version,
        overwrite=overwrite,
        fp16=fp16,
    )
    click.echo(
        f"wrote {out} ({pkg.manifest.name} {pkg.manifest.version}, sha256 {pkg.sha256[:16]})"
    )
    if stats:
        click.echo(f"source_stats: {_describe(stats)}")


def _vendor_input(
    arch: str,
    options: dict[str, Any] | None,
    weights: Path,
    input_size: int,
    grayscale: bool,
    *,
    mean: str | None,
    std: str | None,
    interpolation: str,
    faces: str = "none",
    face_margin: float | None = None,
    no_face: str | None = None,
) -> tuple[Architecture, dict[str, torch.Tensor], InputSpec]:
    """The architecture, the vendor's weights and the input spec they declare."""
    from sourcefree.engine.models import (
        first_conv_channels,
        read_vendor_weights,
        resolve_architecture,
    )
    from sourcefree.errors import PackageError
    from sourcefree.package.manifest import InputSpec

    face_spec = _face_spec(faces, face_margin, no_face)
    a = resolve_architecture(arch, options)
    state = read_vendor_weights(weights)
    in_channels = first_conv_channels(a, state)  # by the registry's key, never dict order
    if in_channels == 1 and not grayscale:
        raise PackageError(
            f"{a.name}'s first convolution {a.first_conv!r} takes 1 channel",
            "a one-channel model was trained on grey images",
            "pass --grayscale",
        )
    default = (0.5,) * in_channels
    spec = InputSpec(
        size=(input_size, input_size),
        channels=in_channels,
        color="gray" if grayscale else "rgb",
        mean=_floats(mean, "--mean") or default,
        std=_floats(std, "--std") or default,
        interpolation=interpolation,
        faces=face_spec,
    )
    return a, state, spec


def _face_spec(mode: str, margin: float | None, no_face: str | None) -> FaceSpec:
    """``input.faces`` from ``--faces``, ``--face-margin`` and ``--no-face``."""
    from sourcefree.errors import ConfigError
    from sourcefree.package.manifest import FaceSpec

    if mode == "none":
        given = [n for n, v in (("--face-margin", margin), ("--no-face", no_face)) if v is not None]
        if given:
            raise ConfigError(
                f"{given[0]} was given without --faces detect or align",
                "with --faces none the images are already face crops: nothing is detected",
                f"pass --faces detect (or align), or leave {given[0]} out",
            )
        return FaceSpec()
    return FaceSpec(
        mode=mode,
        margin=DEFAULT_FACE_MARGIN if margin is None else margin,
        no_face=no_face or "skip",
    )


A = TypeVar("A")
B = TypeVar("B")


def _pair(name_a: str, a: A | None, name_b: str, b: B | None, why: str) -> tuple[A, B] | None:
    """Two options that only work together: both given, or None for neither; one alone is
    a ConfigError that names the other."""
    from sourcefree.errors import ConfigError

    if a is None and b is None:
        return None
    if a is None or b is None:
        given, missing = (name_a, name_b) if b is None else (name_b, name_a)
        raise ConfigError(
            f"{given} was given without {missing}", why, f"pass {missing} or leave {given} out"
        )
    return a, b


def _au_spec(
    detector: Path | None, au_names: str | None, threshold: float, has_val: bool
) -> AUDetectorSpec | None:
    """The AU detector's manifest entry from the options, checked before any work."""
    from sourcefree.errors import ConfigError, SourcefreeError
    from sourcefree.export.source import au_detector_spec

    pair = _pair(
        "--au-detector", detector, "--au-names", au_names,
        "the package names every output of the detector it ships",
    )  # fmt: skip
    if pair is None:
        return None
    detector, au_names = pair
    if not has_val:
        raise ConfigError(
            "--au-detector was given without --val-dir and --val-labels",
            "AdaFER needs the per-class frequencies of the AUs the detector finds on "
            "labelled source images (source_stats.au_frequencies)",
            "pass your labelled validation images with --val-dir and --val-labels",
        )
    names = [s.strip() for s in au_names.split(",") if s.strip()]
    try:
        return au_detector_spec(names, threshold)
    except SourcefreeError as exc:
        raise ConfigError(
            f"--au-names {au_names[:80]!r} is refused",
            exc.why or exc.what,
            "name each detector output once: a letter or digit, then letters, digits, . _ -",
        ) from None


def _detector(
    path: Path | None, arch: str, au: AUDetectorSpec | None, channels: int
) -> torch.nn.Module | None:
    """The AU detector of ``--au-detector`` (see ``au_detector_from_state``), or None."""
    if path is None or au is None:
        return None
    from sourcefree.engine.models import read_vendor_weights
    from sourcefree.errors import PackageError
    from sourcefree.vendor.training import au_detector_from_state

    try:
        return au_detector_from_state(arch, read_vendor_weights(path), len(au.au_names), channels)
    except PackageError as exc:
        raise PackageError(
            f"--au-detector {path.name}: {exc.what}",
            exc.why,
            "pass the --au-arch model's own state_dict() with one output per --au-names "
            "entry, or the state_dict() of train_au_detector's result",
        ) from None


def _val_dataset(
    val_dir: Path | None, val_labels: Path | None, names: list[str]
) -> ImageDataset | None:
    """The labelled validation images (listed and matched to the CSV, not decoded)."""
    from sourcefree.errors import DatasetError
    from sourcefree.runtime.evaluation import labelled_dataset

    pair = _pair(
        "--val-dir", val_dir, "--val-labels", val_labels,
        "the source statistics need labelled images: a folder and its path,label CSV",
    )  # fmt: skip
    if pair is None:
        return None
    val_dir, val_labels = pair
    try:
        dataset = labelled_dataset(val_dir, val_labels, names)
    except DatasetError as exc:
        if "unknown label" not in exc.what and "label index" not in exc.what:
            raise
        raise DatasetError(
            f"--val-labels: {exc.what}",
            exc.why,
            "label every row with one of --labels, or drop the row",
        ) from None
    _check_every_class(dataset.targets, names, "labels")
    return dataset


def _decode(
    dataset: ImageDataset, spec: InputSpec, names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The validation images as the runtime preprocesses them (float32 NCHW) and their labels."""
    from sourcefree.runtime.evaluation import load_inputs

    x, loaded = load_inputs(dataset, spec)
    _check_every_class(loaded.labels, names, "readable images")
    return x, loaded.labels


def _check_every_class(y: np.ndarray, names: list[str], what: str) -> None:
    """Refuse validation labels that leave a class without an image (its mean is undefined)."""
    import numpy as np

    from sourcefree.errors import DatasetError

    counts = np.bincount(y[y >= 0], minlength=len(names))
    empty = [n for n, c in zip(names, counts, strict=False) if c == 0]
    if empty:
        raise DatasetError(
            f"the validation {what} have no image of class(es) {', '.join(map(repr, empty[:5]))}",
            "class feature means and per-class AU frequencies need every class",
            "add labelled validation images of every class in --labels",
        )


def _source_stats(
    model: Classifier,
    x: np.ndarray | None,
    y: np.ndarray | None,
    num_classes: int,
    detector: torch.nn.Module | None,
    au: AUDetectorSpec | None,
) -> dict[str, Any]:
    """The aggregates of ``source_stats`` from the labelled validation images (none without).

    The same functions the Python API path uses (examples/vendor_export.py):
    ``class_feature_means``, ``calibrate``, ``detect_aus`` and ``au_frequencies``.
    """
    if x is None or y is None:
        return {}
    import numpy as np
    import torch

    from sourcefree.pipeline.selection import calibrate
    from sourcefree.vendor.training import au_frequencies, class_feature_means, detect_aus

    images = torch.from_numpy(x)
    stats: dict[str, Any] = {
        "class_counts": np.bincount(y, minlength=num_classes).tolist(),
        "class_feature_means": class_feature_means(model, images, y, num_classes),
        "calibration": calibrate(model, images, y).to_dict(),
    }
    if detector is not None and au is not None:
        found = detect_aus(detector, images)
        stats["au_frequencies"] = au_frequencies(found, y, num_classes, au.threshold)
    return stats


def _describe(stats: dict[str, Any]) -> str:
    """One line: which statistics were shipped, with the calibration's numbers."""
    parts = [k.replace("_", " ") for k in stats if k != "calibration"]
    cal = stats.get("calibration")
    if cal is not None:
        parts.append(
            f"calibration ({cal['validation_images']} validation images, "
            f"top-1 {cal['validation_accuracy']:.3f})"
        )
    return ", ".join(parts)


COMMANDS: tuple[click.Command, ...] = (export_cmd,)
