"""Deployment variants of a verified fp32 package (``sourcefree optimize``): fp16 or int8.

int8: onnxruntime's static quantisation in QDQ format (QuantizeLinear and
DequantizeLinear around the standard ops; per-channel int8 weights, uint8
activations, MinMax ranges), calibrated on the customer's own images, decoded
and preprocessed by the runtime's one path
(:func:`sourcefree.runtime.evaluation.load_inputs`). Two ends stay in float:
the node(s) reading the image (8-bit steps fitted to the input's range fall
between the pixel values: with mean 0.5 every pixel is off by half a step, which
cost a trained smallcnn 1% of agreement) and the classifier head (the node
writing ``logits``, so the logits keep their resolution).
fp16: the package's fp32 weights rebuilt in torch and exported by the SDK's fp16
exporter (:func:`sourcefree.export.onnx.to_onnx`, its parity gate included).

Both: the variant's top-1 class must agree with the fp32 graph's (both run by
onnxruntime on the CPU over the same calibration images) on at least
``min_agreement`` of them, otherwise nothing is written. The new package keeps
the fp32 package's weights, labels, input contract, statistics and auxiliary
graphs byte for byte; its manifest records the precision and
``provenance.optimization``: the fp32 package's identity, the agreement, the
threshold and how many images were used. The images themselves, their names
and per-image results never leave this function; the only thing the int8 graph
learns from them is, per quantised tensor, the range (min and max over all
images) its scale and zero point are fitted to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sourcefree.errors import (
    ConfigError,
    DatasetError,
    ExportError,
    PackageError,
    exception_summary,
)
from sourcefree.fsutil import check_output_dir
from sourcefree.package import signing, strictjson
from sourcefree.package.loader import Package, load_package, publish_package
from sourcefree.package.manifest import (
    DEFAULT_MAX_CALIBRATION_IMAGES,
    DEFAULT_MIN_AGREEMENT,
    MIN_CALIBRATION_IMAGES,
    NAME_RE,
    ONNX_MANIFEST_KEY,
    ONNX_NAME,
    Manifest,
    Optimization,
    check_batch_bytes,
)

#: Variants ``optimize`` writes (``onnx.precision`` of the new package).
VARIANTS = ("fp16", "int8")
#: Images per onnxruntime run while calibrating and measuring agreement.
BATCH = 32
#: int8 activation range estimators tried, in order (:func:`_best_int8` keeps the best).
INT8_RANGES = ("minmax", "percentile")


@dataclass(frozen=True)
class Optimized:
    """What :func:`optimize_package` wrote."""

    package: Package
    """The new package, as read back and verified from OUT."""
    precision: str
    top1_agreement: float
    """Share of the calibration images whose top-1 class equals the fp32 package's."""
    calibration_images: int
    signer: str | None
    """Fingerprint of the key that signed it, when a key was given."""


def optimize_package(
    package: str | os.PathLike[str] | Package,
    calibration: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    precision: str,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_images: int = DEFAULT_MAX_CALIBRATION_IMAGES,
    key: str | os.PathLike[str] | bytes | None = None,
    public_key: str | os.PathLike[str] | bytes | None = None,
    name: str | None = None,
    overwrite: bool = False,
    max_bad_fraction: float = 0.05,
) -> Optimized:
    """Write an fp16 or int8 variant of a verified fp32 package at ``out``.

    Args:
        package: the fp32 package (source or adapted), or its directory.
        calibration: a folder of the site's own images (read recursively); they
            calibrate the int8 ranges and measure the agreement of either variant.
        out: the new package's directory (must not exist or be empty).
        precision: ``int8`` or ``fp16``.
        min_agreement: top-1 agreement with the fp32 graph to reach, in [0, 1].
        max_images: use at most this many images (a seeded random subset).
        key: sign the new package with this Ed25519 private key (PEM path or bytes).
        public_key: verify the fp32 package's signature with this key first.
        name: the new package's name (default: ``<name>-<precision>``).
        overwrite: replace a non-empty ``out``.
        max_bad_fraction: stop when more than this share of the images is unreadable.

    Raises:
        ConfigError: a bad argument; ``out`` is the package itself.
        PackageError: the package does not verify or is not fp32.
        DatasetError: no calibration folder, fewer than 16 readable images.
        ExportError: the variant agrees on less than ``min_agreement`` (nothing written).

    Examples:
        >>> from sourcefree.export.optimize import optimize_package
        >>> done = optimize_package("adapted/package", "site-photos/", "fer-int8",
        ...     precision="int8", key="site.key")
        >>> done.top1_agreement, done.package.manifest.onnx.precision
        (0.996, 'int8')
    """
    _check_args(precision, min_agreement, max_images)
    target = Path(out).absolute()
    check_output_dir(target, overwrite)
    private = signing.load_private_key(key) if key is not None else None
    pkg = package if isinstance(package, Package) else load_package(package, public_key)
    if target.resolve().is_relative_to(pkg.path.absolute().resolve()):
        raise ConfigError(
            "the output folder is (inside) the package being optimised",
            "the fp32 package stays as it is: the variant names it as its origin",
            "write the variant to another folder (-o PKG-int8)",
        )
    _check_fp32(pkg)
    new_name = name if name is not None else _variant_name(pkg.manifest.name, precision)
    if not NAME_RE.match(new_name):
        raise ConfigError(
            f"package name {new_name[:80]!r} is not allowed",
            "names use letters, digits, '.', '_' and '-' (at most 64)",
            "pass another --name",
        )
    x = calibration_inputs(calibration, pkg, max_images, max_bad_fraction)
    graph, agreement = _best_int8(pkg, x) if precision == "int8" else _fp16(pkg, x)
    if not agreement >= min_agreement:
        raise ExportError(
            f"the {precision} variant agrees with the fp32 package on {agreement:.2%} of "
            f"top-1 predictions ({len(x)} calibration images)",
            f"at least {min_agreement:.2%} is required (--min-agreement); nothing was written",
            "serve the fp32 package"
            + (", try --fp16," if precision == "int8" else "")
            + " or lower --min-agreement if that agreement is enough for your application",
        )
    record = Optimization(pkg.sha256, agreement, float(min_agreement), len(x))
    manifest = _variant_manifest(pkg.manifest, new_name, precision, record)
    written = _write(pkg, manifest, _embed(graph, manifest), target, overwrite, private)
    return Optimized(
        package=written,
        precision=precision,
        top1_agreement=agreement,
        calibration_images=len(x),
        signer=written.signer,
    )


def _check_args(precision: str, min_agreement: float, max_images: int) -> None:
    if precision not in VARIANTS:
        raise ConfigError(
            f"precision {precision!r} is not a deployment variant",
            f"optimize writes {' or '.join(VARIANTS)}",
            "pass --int8 or --fp16",
        )
    if isinstance(min_agreement, bool) or not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(
            f"min_agreement {min_agreement!r} is outside [0, 1]",
            "it is the share of calibration images whose top-1 class must not change",
            f"pass a value such as {DEFAULT_MIN_AGREEMENT}",
        )
    if isinstance(max_images, bool) or max_images < MIN_CALIBRATION_IMAGES:
        raise ConfigError(
            f"max_images {max_images!r} is below {MIN_CALIBRATION_IMAGES}",
            "the agreement needs enough images to mean something",
            f"pass {DEFAULT_MAX_CALIBRATION_IMAGES} (the default) or another value of at least "
            f"{MIN_CALIBRATION_IMAGES}",
        )


def _check_fp32(pkg: Package) -> None:
    onnx = pkg.manifest.onnx
    if onnx.precision != "fp32":
        raise PackageError(
            f"package {pkg.manifest.name!r} is already {onnx.precision}",
            "variants are made from the fp32 graph, so each is measured against it",
            "optimize the fp32 package it was made from"
            + (
                f" (sha256 {pkg.manifest.optimization.from_sha256[:16]}...)"
                if pkg.manifest.optimization is not None
                else ""
            ),
        )


def _variant_name(name: str, precision: str) -> str:
    """``<name>-<precision>``, cut to the 64 characters a package name allows."""
    suffix = f"-{precision}"
    return name[: 64 - len(suffix)] + suffix


def calibration_inputs(
    folder: str | os.PathLike[str], pkg: Package, max_images: int, max_bad_fraction: float
) -> np.ndarray:
    """The calibration images as the runtime feeds them: float32 NCHW at the package's input.

    Decoded and preprocessed by :func:`sourcefree.runtime.evaluation.load_inputs`
    (the decode of ``evaluate`` and ``adapt``; the same normalisation as
    :class:`~sourcefree.runtime.predictor.Predictor`). A folder of more than
    ``max_images`` images is subsampled with a fixed seed.

    Raises:
        DatasetError: no such folder, no image, too many unreadable, fewer than
            :data:`MIN_CALIBRATION_IMAGES` readable.
    """
    from sourcefree.data.readers import read_image_folder
    from sourcefree.runtime.evaluation import load_inputs

    dataset = read_image_folder(folder)
    if len(dataset) > max_images:
        chosen = np.random.default_rng(0).choice(len(dataset), max_images, replace=False)
        dataset = dataset.subset(np.sort(chosen))
    check_batch_bytes(pkg.manifest.input, len(dataset), "--max-images")  # held in memory at once
    x, _ = load_inputs(dataset, pkg.manifest.input, max_bad_fraction=max_bad_fraction)
    if len(x) < MIN_CALIBRATION_IMAGES:
        raise DatasetError(
            f"the calibration folder has {len(x)} readable image(s)",
            f"calibration and the agreement check need at least {MIN_CALIBRATION_IMAGES}",
            "pass a folder with more images of the site (a few hundred are best)",
        )
    return x


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """Silence the quantiser's root-logger warnings (pre-processing advice) meanwhile."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _fp16(pkg: Package, x: np.ndarray) -> tuple[bytes, float]:
    graph = fp16_graph(pkg)
    return graph, top1_agreement(pkg, graph, x)


def _best_int8(pkg: Package, x: np.ndarray) -> tuple[bytes, float]:
    """The int8 graph of each range estimator in :data:`INT8_RANGES`, the one whose top-1
    agrees most with fp32 on ``x`` (a tie keeps the earlier); label-free, on the site's images.

    Measured 2026-12-05 on the demo's adapted smallcnn (512 of its 2000 images):
    MinMax 98.83 %, Percentile 99.41 % (99.50 % on all 2000); docs/benchmarks.md.
    An estimator onnxruntime fails on is skipped; when all fail, the first error is raised.
    """
    scored, failures = [], []
    for order, ranges in enumerate(INT8_RANGES):
        try:
            graph = quantize_int8(pkg, x, ranges)
        except ExportError as err:  # e.g. a histogram onnxruntime cannot build: try the next
            failures.append(err)
            continue
        scored.append((top1_agreement(pkg, graph, x), -order, graph))
    if not scored:
        raise failures[0]
    agreement, _, graph = max(scored)
    return graph, agreement


def quantize_int8(pkg: Package, x: np.ndarray, ranges: str = "minmax") -> bytes:
    """The package's fp32 graph quantised to int8 QDQ, calibrated on ``x`` (bytes, unsanitised).

    Per-channel int8 weights, uint8 activations, activation ranges by ``ranges``
    (``minmax``: the observed extremes; ``percentile``: onnxruntime's 99.999th
    percentile of the observed magnitudes, robust to rare outliers); the nodes
    that read ``input`` or write ``logits`` are left in float.

    Raises:
        ExportError: onnxruntime's quantiser fails on the graph.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    if ranges not in methods:
        raise ConfigError(
            f"unknown int8 range estimator {ranges!r}",
            f"known: {', '.join(methods)}",
            "pass one of them",
        )

    spec = pkg.manifest.onnx
    proto = onnx.load_from_string(pkg.onnx_bytes)
    ends = [
        n.name
        for n in proto.graph.node
        if n.name and (spec.logits in n.output or spec.input in n.input)
    ]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """The calibration images, batch by batch (onnxruntime's reader protocol)."""

        def __init__(self) -> None:
            # Equal batches: onnxruntime's histogram estimators stack per-batch outputs and
            # fail on a shorter last batch ("inhomogeneous shape").
            size = max(b for b in range(1, BATCH + 1) if len(x) % b == 0)
            self.batches = ({spec.input: x[i : i + size]} for i in range(0, len(x), size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    # The quantiser reads and writes files (it also rewrites a ModelProto it is given).
    with tempfile.TemporaryDirectory(prefix="sourcefree-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(pkg.onnx_bytes)
        try:
            # The histogram estimators print progress on stdout, which carries data only.
            with _quiet_logging(), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(src),
                    str(dst),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=ends,
                    calibrate_method=methods[ranges],
                )
        except Exception as exc:  # the quantiser raises many unrelated types
            raise ExportError(
                "onnxruntime could not quantise the graph to int8",
                exception_summary(exc),
                "nothing was written; serve the fp32 package, or try --fp16",
            ) from exc
        return dst.read_bytes()


def fp16_graph(pkg: Package) -> bytes:
    """The package's weights rebuilt in torch and exported as an fp16 graph (parity-checked).

    Raises:
        ExportError: the fp16 export fails its parity gate (:func:`check_parity`).
    """
    import torch

    from sourcefree.engine.models import load_classifier
    from sourcefree.export.onnx import check_parity, to_onnx

    manifest = pkg.manifest
    spec = dataclasses.replace(manifest.onnx, precision="fp16")
    model = load_classifier(manifest.architecture, pkg.weights_bytes).eval()
    with torch.no_grad():
        graph = to_onnx(model, manifest.input, spec, manifest.to_dict(with_files=False))
        check_parity(model, graph, manifest.input, spec, samples=64)
    return graph


def top1_agreement(pkg: Package, graph: bytes, x: np.ndarray) -> float:
    """Share of ``x`` on which ``graph`` and the package's own graph pick the same class.

    Both run on onnxruntime's CPU provider, batch by batch.
    """
    from sourcefree.runtime.predictor import open_session, run_session

    spec, name = pkg.manifest.onnx, pkg.manifest.name
    same = 0
    sessions = [open_session(data, "cpu", 0, package=name)[0] for data in (pkg.onnx_bytes, graph)]
    for i in range(0, len(x), BATCH):
        feed = {spec.input: x[i : i + BATCH]}
        ref, got = (
            np.asarray(run_session(s, [spec.logits], feed, package=name, file=ONNX_NAME)[0])
            for s in sessions
        )
        same += int((ref.argmax(1) == got.argmax(1)).sum())
    return same / len(x)


def _variant_manifest(
    manifest: Manifest, name: str, precision: str, record: Optimization
) -> Manifest:
    """The fp32 manifest with the new name, precision and ``provenance.optimization``."""
    return dataclasses.replace(
        manifest,
        name=name,
        onnx=dataclasses.replace(manifest.onnx, precision=precision),
        provenance={**manifest.provenance, "optimization": record.to_dict()},
        files={},
    )


def _embed(graph: bytes, manifest: Manifest) -> bytes:
    """``graph`` sanitised like every exported graph, carrying ``manifest`` (minus files)."""
    import onnx

    from sourcefree.export.onnx import _checked_bytes, _sanitize

    proto = onnx.load_from_string(graph)
    _sanitize(proto)  # also drops the quantiser's own metadata ("onnx.infer")
    entry = proto.metadata_props.add()
    entry.key = ONNX_MANIFEST_KEY
    entry.value = strictjson.dumps(manifest.to_dict(with_files=False)).decode("utf-8")
    return _checked_bytes(proto)


def _write(
    pkg: Package,
    manifest: Manifest,
    graph: bytes,
    target: Path,
    overwrite: bool,
    private: Ed25519PrivateKey | None,
) -> Package:
    """Stage the package (weights and auxiliary graphs copied, new graph and manifest),
    sign it, verify it, then rename it into place; on any error nothing is left."""
    blobs = {**pkg.blobs, ONNX_NAME: graph}
    return publish_package(blobs, manifest, target, overwrite=overwrite, private=private)
