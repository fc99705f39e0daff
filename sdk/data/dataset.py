"""The dataset every reader returns, and robust loading of its images.

A :class:`ImageDataset` is a list of :class:`Sample` (a file, or pixels held
in memory, with an optional label and face box) plus its label order. It
decodes nothing until :meth:`ImageDataset.load` (or :meth:`preflight`) runs,
which fully decodes every image, skips and counts unreadable ones, stops
above ``max_bad_fraction`` or at the first one with ``strict``, and returns
a :class:`ReadReport` with counts and hashed ids, never paths. Paths appear
only in the local log file the caller asks for (``log_path``).
No torch import.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sourcefree.data.decode import (
    Decoded,
    DecodePlan,
    clamp_box,
    decode_all,
    open_or_reason,
    open_sample,
    resolve_workers,
)
from sourcefree.data.imaging import draft_side, normalise, resample_filter
from sourcefree.data.progress import progress_bar
from sourcefree.errors import ConfigError, DatasetError, SourcefreeError
from sourcefree.package.manifest import FaceSpec, InputSpec

#: Image sides accepted by :meth:`ImageDataset.load`.
MAX_SIDE = 4096
#: At most this many hashed ids of bad files are kept in a report.
MAX_REPORTED_IDS = 50

#: Reasons a sample is skipped, with a short explanation for reports.
REASONS: dict[str, str] = {
    "empty": "zero-byte file",
    "corrupt": "corrupt or truncated image",
    "not_image": "not an image in an allowed format",
    "bomb": "decompression bomb",
    "too_large": "image or file too large",
    "not_regular": "not a regular file (FIFO, device, directory, socket)",
    "outside_root": "symlink or path leading outside the dataset root",
    "missing": "listed file does not exist",
    "unreadable": "permission or I/O error",
    "bad_box": "face box outside the image",
    "bad_row": "malformed pixel row",
}

Box = tuple[int, int, int, int]
"""A face box in pixels: (left, top, right, bottom), right and bottom exclusive."""


def hashed_id(key: str) -> str:
    """A short, stable id of a sample name, for reports that must not show names."""
    return hashlib.blake2b(os.fsencode(key), digest_size=6, person=b"sourcefree-id").hexdigest()


def escape_name(key: str) -> str:
    """A one-line, printable form of a file name (non-UTF-8 bytes and newlines escaped)."""
    out = []
    for ch in os.fsencode(key).decode("utf-8", "surrogateescape"):
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch == "\\" or not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True, eq=False)
class Sample:
    """One image of a dataset: a file or in-memory pixels, a label, an optional box."""

    key: str
    """Name relative to the dataset root (for ids, fingerprint and the local log)."""
    path: Path | None = None
    """The regular file to decode (already resolved inside the root)."""
    label: int = -1
    """Index into the dataset's labels; -1 when unlabelled."""
    box: Box | None = None
    """Face box from the format, cropped at load."""
    pixels: np.ndarray | None = None
    """uint8 pixels (H, W) or (H, W, 3) for formats that store images in a CSV."""
    error: str | None = None
    """A reason from :data:`REASONS` known before decoding (the sample is skipped)."""
    size: int = 0
    """File size in bytes at scan time (fingerprint)."""
    mtime_ns: int = 0
    """Modification time at scan time (fingerprint)."""


@dataclass(frozen=True)
class Fingerprint:
    """A dataset's identity for resume checks: names, sizes, mtimes and labels hashed."""

    digest: str
    files: int
    bytes: int

    def describe_change(self, other: Fingerprint) -> str:
        """One line saying how ``other`` differs from this one (no names)."""
        if other.digest == self.digest:
            return "unchanged"
        return (
            f"{self.files} -> {other.files} images, {self.bytes} -> {other.bytes} bytes; "
            "names, sizes, modification times or labels changed"
        )


@dataclass(frozen=True)
class ReadReport:
    """What reading a dataset found: counts and hashed ids, never paths."""

    total: int
    """Samples considered (images found or listed)."""
    ok: int
    """Samples decoded."""
    bad: int
    """Samples skipped as unreadable."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Skipped samples per reason (keys from :data:`REASONS`)."""
    bad_ids: tuple[str, ...] = ()
    """Hashed ids of the first skipped samples (see :func:`hashed_id`)."""
    ignored: int = 0
    """Files that are not images (by name), hidden files and unfollowed directory links."""
    dropped: int = 0
    """Samples whose label is not in the label set (contempt with 7 classes, ties, NF)."""
    no_face: int = 0
    """Images where face detection found nothing (kept whole, or skipped: ``no_face_skipped``)."""
    no_face_skipped: int = 0
    """Images skipped because no face was found (``input.faces.no_face = skip``)."""
    no_eyes: int = 0
    """Faces that ``align`` could not align (eyes not found): the ``detect`` crop was used."""

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def summary(self) -> str:
        """A short human-readable line."""
        text = f"read {self.ok} of {self.total} images"
        if self.bad:
            parts = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
            text += f"; skipped {self.bad} ({parts})"
        if self.ignored:
            text += f"; ignored {self.ignored} non-image entries"
        if self.dropped:
            text += f"; dropped {self.dropped} samples outside the label set"
        if self.no_face:
            kept, skipped = self.no_face - self.no_face_skipped, self.no_face_skipped
            how = [f"{kept} kept whole"] * bool(kept) + [f"{skipped} skipped"] * bool(skipped)
            text += f"; no face found in {self.no_face} ({', '.join(how)})"
        if self.no_eyes:
            text += f"; eyes not found in {self.no_eyes} (not aligned)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ok": self.ok,
            "bad": self.bad,
            "reasons": dict(sorted(self.reasons.items())),
            "bad_ids": list(self.bad_ids),
            "ignored": self.ignored,
            "dropped": self.dropped,
            "no_face": self.no_face,
            "no_face_skipped": self.no_face_skipped,
            "no_eyes": self.no_eyes,
        }


@dataclass(frozen=True)
class LoadedImages:
    """Decoded images at a fixed size, with labels and the indices of the kept samples."""

    images: np.ndarray
    """uint8 (N, H, W, C); C is 3 for ``rgb`` and 1 for ``gray``."""
    labels: np.ndarray
    """int64 (N,), -1 where unlabelled."""
    indices: np.ndarray
    """int64 (N,), index of each image in the dataset's samples."""
    label_names: tuple[str, ...] | None
    report: ReadReport

    def to_float(
        self,
        spec: InputSpec | None = None,
        *,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> np.ndarray:
        """float32 NCHW, ``(x / 255 - mean) / std`` per channel (:func:`imaging.normalise`).

        Pass the package's input ``spec`` (grey images are then repeated to 3
        channels where it takes 3); without one, ``mean`` and ``std`` are cut to
        the images' channels.
        """
        if spec is None:
            spec = _plain_spec(self.images.shape[-1], mean, std)
        elif not isinstance(spec, InputSpec):
            raise ConfigError(
                f"to_float got {type(spec).__name__} where an InputSpec goes",
                "the first argument is the package's input spec",
                "pass to_float(spec) or to_float(mean=..., std=...)",
            )
        return normalise(self.images, spec)


def _plain_spec(channels: int, mean: Sequence[float], std: Sequence[float]) -> InputSpec:
    """An input spec for :meth:`LoadedImages.to_float` without one (its size is never read)."""
    m, s = tuple(float(v) for v in mean)[:channels], tuple(float(v) for v in std)[:channels]
    return InputSpec(
        size=(1, 1),
        channels=channels,
        color="rgb" if channels == 3 else "gray",
        mean=m * channels if len(m) == 1 else m,
        std=s * channels if len(s) == 1 else s,
    )


class _LogFile:
    """The opt-in local log of skipped files: one line per file, mode 0600."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self._fh = None
        self.path = path
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._fh = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, key: str, reason: str) -> None:
        if self._fh is not None:
            self._fh.write(f"{hashed_id(key)}\t{reason}\t{escape_name(key)}\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def hint(self, them: str = "them") -> str:
        """Where the skipped files are named: this log, or how to get one (never a path)."""
        if self.path is None:
            return (
                "no log was kept (the CLI writes none); ImageDataset.load() or preflight() "
                f"with log_path= writes a local log that names {them}"
            )
        return f"the local log given as log_path names {them}"


class ImageDataset:
    """Samples with an optional label order; images are decoded only when loaded."""

    def __init__(
        self,
        samples: Sequence[Sample],
        labels: Sequence[str] | None,
        *,
        root: Path,
        kind: str,
        sources: Sequence[Path] = (),
        ignored: int = 0,
        dropped: int = 0,
    ) -> None:
        self.samples: tuple[Sample, ...] = tuple(samples)
        self.labels: tuple[str, ...] | None = None if labels is None else tuple(labels)
        self.root = root
        """Where the data lives (local only: never put it in a report)."""
        self.kind = kind
        """The reader that built it (``folder``, ``fer2013``, ...)."""
        self.sources = tuple(sources)
        """Annotation files read (CSV, label lists); part of the fingerprint."""
        self.ignored = ignored
        self.dropped = dropped
        if not self.samples:
            raise DatasetError(
                f"no images found for the {kind} dataset",
                "the folder or list holds no supported image"
                + (f" ({dropped} samples had labels outside the label set)" if dropped else ""),
                "point at the dataset root; supported suffixes: .jpg .jpeg .png .bmp .gif "
                ".tif .tiff .webp .ppm .pgm",
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        n_labels = "unlabelled" if self.labels is None else f"{len(self.labels)} classes"
        return f"ImageDataset(kind={self.kind!r}, {len(self)} samples, {n_labels})"

    @property
    def targets(self) -> np.ndarray:
        """int64 labels of every sample (-1 where unlabelled)."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self))

    def class_counts(self) -> np.ndarray:
        """Samples per class (needs labels)."""
        if self.labels is None:
            raise DatasetError("this dataset has no labels", "it was read unlabelled", "")
        t = self.targets
        return np.bincount(t[t >= 0], minlength=len(self.labels))

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """A dataset with the chosen samples, in the given order."""
        picked = [self.samples[int(i)] for i in indices]
        return ImageDataset(
            picked, self.labels, root=self.root, kind=self.kind, sources=self.sources
        )

    def fingerprint(self) -> Fingerprint:
        """Hash of sample names, sizes, mtimes, labels and boxes, plus the annotation files."""
        h = hashlib.sha256(b"sourcefree-dataset-v1\0")
        h.update(self.kind.encode() + b"\0")
        for name in self.labels or ():
            h.update(b"L" + name.encode("utf-8", "surrogateescape") + b"\0")
        for src in self.sources:
            try:
                st = os.stat(src)
                h.update(b"S%d:%d\0" % (st.st_size, st.st_mtime_ns))
            except OSError:
                h.update(b"S-\0")
            h.update(os.fsencode(src.name) + b"\0")
        total = 0
        for s in self.samples:
            h.update(os.fsencode(s.key) + b"\0")
            box = "" if s.box is None else ",".join(map(str, s.box))
            h.update(f"{s.size}:{s.mtime_ns}:{s.label}:{box}:{s.error or ''}\0".encode())
            total += s.size
        return Fingerprint(h.hexdigest(), len(self.samples), total)

    def decode(self, index: int, color: str = "rgb", *, crop: bool = True) -> Image.Image:
        """Decode one sample (box applied) as a PIL image in ``RGB`` or ``L``.

        ``crop=False`` keeps the whole image and only checks that the box overlaps
        it (face preprocessing then cuts around the box, :mod:`sourcefree.data.faces`).

        Raises:
            ImageDecodeError: the file cannot be decoded safely.
            DatasetError: the sample was refused at scan time, or its box is empty.
        """
        return open_sample(self.samples[index], color, crop=crop)

    def iter_decoded(
        self,
        color: str = "rgb",
        *,
        max_bad_fraction: float = 0.05,
        strict: bool = False,
        log_path: str | os.PathLike[str] | None = None,
        transform: Callable[[Image.Image], Image.Image] | None = None,
    ) -> Iterator[tuple[int, Image.Image]]:
        """Yield ``(index, image)`` for every decodable sample, skipping bad ones.

        The bad-fraction check runs when the iteration ends (a generator's
        return); use :meth:`load` or :meth:`preflight` to get the report.
        """
        reader = _Reader(self, color, max_bad_fraction, strict, log_path)
        try:
            for i in range(len(self.samples)):
                img = reader.decode(i)
                if img is None:
                    continue
                yield i, img if transform is None else transform(img)
            reader.finish()
        finally:
            reader.close()

    def preflight(
        self,
        color: str = "rgb",
        *,
        max_bad_fraction: float = 0.05,
        strict: bool = False,
        log_path: str | os.PathLike[str] | None = None,
    ) -> ReadReport:
        """Fully decode every image without keeping it; returns the report.

        Raises:
            DatasetError: above ``max_bad_fraction`` bad files, at the first
                with ``strict``, or when nothing is readable.
        """
        reader = _Reader(self, color, max_bad_fraction, strict, log_path)
        try:
            for i in range(len(self.samples)):
                reader.decode(i)
            return reader.finish()
        finally:
            reader.close()

    def load(
        self,
        size: int | tuple[int, int] | None = None,
        color: str | None = None,
        *,
        spec: InputSpec | None = None,
        interpolation: str | None = None,
        max_bad_fraction: float = 0.05,
        strict: bool = False,
        log_path: str | os.PathLike[str] | None = None,
        detect_faces: bool = False,
        face_margin: float = 0.25,
        progress: bool = False,
        workers: int | None = None,
        reduced_decode: bool = True,
        sink: Callable[[np.ndarray], None] | None = None,
    ) -> LoadedImages:
        """Decode, crop and resize every readable image into one uint8 array.

        Args:
            size: output side, or (height, width) (default 32; not with ``spec``).
            color: ``rgb`` (3 channels) or ``gray`` (1 channel) (default rgb; not with ``spec``).
            spec: a package's input spec: its size, colour, interpolation and face
                preprocessing (``spec.faces``: detection, alignment, no-face policy),
                exactly as :class:`sourcefree.runtime.predictor.Predictor` applies them.
            interpolation: ``nearest``, ``bilinear`` (default) or ``bicubic`` (not with ``spec``).
            max_bad_fraction: stop with DatasetError when more than this
                fraction of samples is unreadable (default 0.05).
            strict: stop at the first unreadable sample.
            log_path: optional local file that gets one line per skipped
                sample (hashed id, reason, escaped path). Keep it on site.
            detect_faces: crop the largest detected face (OpenCV Haar cascade),
                as ``spec.faces`` of mode ``detect`` with ``face_margin`` and the
                ``whole`` policy (an image without a face is kept whole). Not with
                a ``spec`` that has face preprocessing of its own.
            face_margin: margin around a detected face, as a fraction of its side.
            progress: a ``decoding`` bar on stderr (:mod:`sourcefree.data.progress`).
            workers: decoding processes (:mod:`sourcefree.data.decode`); 1 decodes in
                this process; None: every usable core from 1,024 images on (fewer:
                in this process). The result is bitwise the same for any count.
            reduced_decode: decode JPEGs at least twice the needed side on both
                sides at reduced scale (libjpeg's DCT scaling, Pillow's ``Image.draft``)
                before the resize. The side kept
                (:func:`sourcefree.data.imaging.draft_side`): the input side without
                face preprocessing, ``max(4 x input side, 512)`` px with it. Samples
                with a box from their format are decoded at full scale. The runtime
                :class:`~sourcefree.runtime.predictor.Predictor` applies the same rule,
                so keep it on for inputs bitwise equal to serving; False: full scale.
            sink: called with each kept image's uint8 (H, W, C) pixels, in dataset
                order, instead of keeping them (the decoded-image cache,
                :mod:`sourcefree.data.cache`, streams them to disk): the result's
                ``images`` then has no rows. The array passed is reused for the next
                image: copy or write it before returning.

        With face preprocessing, a sample's box from the format (ExpW, AffectNet)
        stands in for the detector's and gets the same margin and alignment.

        Examples:
            >>> data = read_image_folder("photos/")
            >>> loaded = data.load((64, 64), "gray", log_path="skipped.log")
            >>> loaded.images.shape, loaded.report.bad_fraction  # (N, 64, 64, 1)
            >>> loaded = data.load(spec=package.manifest.input)  # the package's contract
        """
        plan = _load_plan(
            spec, size, color, interpolation, detect_faces, face_margin, reduced_decode
        )
        workers = resolve_workers(workers, len(self.samples))
        reader = _Reader(self, plan.color, max_bad_fraction, strict, log_path)
        if plan.faces.active:
            from sourcefree.data.faces import load_detectors

            load_detectors(plan.faces.detector)  # a missing OpenCV fails before any decoding
        shape = (*plan.size, plan.channels)
        images = np.empty((0 if sink is not None else len(self.samples), *shape), dtype=np.uint8)
        row = np.empty(shape, dtype=np.uint8)
        kept: list[int] = []
        bar = progress_bar(len(self.samples), "decoding", enabled=progress, unit="img")
        try:  # closing(): a pool's workers end here, on an error or a signal too
            with contextlib.closing(decode_all(self.samples, plan, workers)) as results:
                for i, decoded in results:
                    pixels = reader.count(i, decoded)
                    bar.update(1)
                    if pixels is None:
                        continue
                    if sink is None:
                        images[len(kept)] = pixels
                    else:  # the same cast and broadcast as the assignment above
                        row[...] = pixels
                        sink(row)
                    kept.append(i)
            report = reader.finish()
        finally:
            bar.close()
            reader.close()
        idx = np.asarray(kept, dtype=np.int64)
        return LoadedImages(
            images=images[: len(kept)],
            labels=self.targets[idx],
            indices=idx,
            label_names=self.labels,
            report=report,
        )

    def torch_dataset(
        self,
        size: int | tuple[int, int] = 32,
        color: str = "rgb",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        **load_kwargs: Any,
    ) -> Any:
        """A ``torch.utils.data.TensorDataset`` of (normalised NCHW images, labels).

        Imports torch lazily; the other methods never do.
        """
        import torch

        loaded = self.load(size, color, **load_kwargs)
        x = torch.from_numpy(loaded.to_float(mean=mean, std=std))
        y = torch.from_numpy(loaded.labels)
        return torch.utils.data.TensorDataset(x, y)


def _load_plan(
    spec: InputSpec | None,
    size: int | tuple[int, int] | None,
    color: str | None,
    interpolation: str | None,
    detect_faces: bool,
    face_margin: float,
    reduced_decode: bool = True,
) -> DecodePlan:
    """The plan of :meth:`ImageDataset.load`: from the spec, or from the options.

    Raises:
        ConfigError: a spec and size/colour/interpolation both, a bad size,
            interpolation or margin, or detect_faces with a spec that detects faces.
    """
    if spec is not None:
        given = [n for n, v in (("size", size), ("color", color), ("interpolation", interpolation))
                 if v is not None]  # fmt: skip
        if given or (detect_faces and spec.faces.active):
            what = ", ".join(given) if given else "detect_faces"
            raise ConfigError(
                f"load() got both spec= and {what}",
                "the input spec already says how images are resized and cropped",
                f"pass spec= alone (or {what} without spec=)",
            )
        size, color, interpolation = spec.size, spec.color, spec.interpolation
    size = 32 if size is None else size
    height, width = (size, size) if isinstance(size, int) else size
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise ConfigError(
            f"image size {size!r} is invalid",
            f"sides must be between 1 and {MAX_SIDE}",
            "use the size in the package's input spec",
        )
    interpolation = interpolation or "bilinear"
    resample_filter(interpolation)  # an unknown name fails before any decoding
    faces = FaceSpec() if spec is None else spec.faces
    if detect_faces:
        try:
            faces = FaceSpec("detect", face_margin, "whole")
        except SourcefreeError as exc:
            raise ConfigError(
                f"face_margin={face_margin!r} is invalid", exc.why, "pass e.g. 0.25"
            ) from None
    reduce_to = draft_side((height, width), faces.active) if reduced_decode else None
    return DecodePlan((height, width), color or "rgb", interpolation, faces, reduce_to)


def crop_box(img: Image.Image, box: Box) -> Image.Image:
    """Crop a (left, top, right, bottom) box, clamped to the image.

    Raises:
        DatasetError: the box does not overlap the image.
    """
    return img.crop(clamp_box(img, box))


class _Reader:
    """Decodes samples one by one and keeps the skip accounting."""

    def __init__(
        self,
        dataset: ImageDataset,
        color: str,
        max_bad_fraction: float,
        strict: bool,
        log_path: str | os.PathLike[str] | None,
    ) -> None:
        if color not in ("rgb", "gray"):
            raise ConfigError(f"unknown colour {color!r}", "choose rgb or gray", "")
        _check_fraction(max_bad_fraction)
        self.dataset = dataset
        self.color = color
        self.max_bad_fraction = max_bad_fraction
        self.strict = strict
        self.reasons: Counter[str] = Counter()
        self.bad_ids: list[str] = []
        self.ok = 0
        self.no_face = 0
        self.no_face_skipped = 0
        self.no_eyes = 0
        self.log = _LogFile(log_path)

    def decode(self, index: int) -> Image.Image | None:
        """One sample decoded (its box cropped) and counted; None when skipped."""
        sample = self.dataset.samples[index]
        img = open_or_reason(sample, self.color)
        if isinstance(img, str):
            self._bad(sample.key, img)
            return None
        self.ok += 1
        return img

    def count(self, index: int, decoded: Decoded) -> np.ndarray | None:
        """Count what :func:`sourcefree.data.decode.decode_sample` gave; its pixels or None."""
        if decoded.reason is not None:
            self._bad(self.dataset.samples[index].key, decoded.reason)
            return None
        self.ok += 1
        self.no_face += decoded.no_face
        self.no_face_skipped += decoded.no_face and decoded.pixels is None
        self.no_eyes += decoded.no_eyes
        return decoded.pixels

    def _bad(self, key: str, reason: str) -> None:
        self.reasons[reason] += 1
        ident = hashed_id(key)
        if len(self.bad_ids) < MAX_REPORTED_IDS:
            self.bad_ids.append(ident)
        self.log.write(key, reason)
        if self.strict:
            raise DatasetError(
                f"unreadable image {ident} ({REASONS.get(reason, reason)})",
                "strict mode stops at the first unreadable file",
                f"remove or re-copy it ({self.log.hint('it')}), or run without --strict",
            )

    def report(self) -> ReadReport:
        bad = sum(self.reasons.values())
        return ReadReport(
            total=len(self.dataset.samples),
            ok=self.ok,
            bad=bad,
            reasons=dict(self.reasons),
            bad_ids=tuple(self.bad_ids),
            ignored=self.dataset.ignored,
            dropped=self.dataset.dropped,
            no_face=self.no_face,
            no_face_skipped=self.no_face_skipped,
            no_eyes=self.no_eyes,
        )

    def finish(self) -> ReadReport:
        report = self.report()
        _check_counts(report, self.max_bad_fraction, self.log)
        return report

    def close(self) -> None:
        self.log.close()


def _check_counts(report: ReadReport, max_bad_fraction: float, log: _LogFile) -> None:
    """Refuse a read with no image, no face in any, or too many unreadable images."""
    if report.ok == 0:
        raise DatasetError(
            f"none of the {report.total} images could be read",
            report.summary(),
            f"check the dataset ({log.hint()})",
        )
    if report.ok == report.no_face_skipped:
        raise DatasetError(
            f"no face was found in any of the {report.ok} readable images",
            "the package's input spec skips images without a face "
            "(input.faces.no_face = skip); " + report.summary(),
            "use photos where a frontal face is visible (OpenCV's Haar cascade finds "
            "faces of 24 px and more)",
        )
    if report.bad_fraction > max_bad_fraction:
        raise DatasetError(
            f"{report.bad} of {report.total} images are unreadable "
            f"({report.bad_fraction:.1%} > max_bad_fraction {max_bad_fraction:.1%})",
            report.summary(),
            f"fix or remove the bad files ({log.hint()}), or raise --max-bad-fraction",
        )


def check_read(report: ReadReport, *, max_bad_fraction: float, strict: bool) -> None:
    """The checks of :meth:`ImageDataset.load` on a read done earlier (the decoded-image cache).

    Raises:
        ConfigError: ``max_bad_fraction`` outside [0, 1].
        DatasetError: no image read, no face found in any, more than
            ``max_bad_fraction`` unreadable, or any unreadable with ``strict``.
    """
    _check_fraction(max_bad_fraction)
    log = _LogFile(None)
    if strict and report.bad:
        parts = ", ".join(f"{n} {REASONS.get(r, r)}" for r, n in sorted(report.reasons.items()))
        raise DatasetError(
            f"{report.bad} unreadable image(s) ({parts})",
            "strict mode stops at the first unreadable file",
            f"remove or re-copy them ({log.hint()}), or run without --strict",
        )
    _check_counts(report, max_bad_fraction, log)


def _check_fraction(max_bad_fraction: float) -> None:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(
            f"max_bad_fraction={max_bad_fraction!r} is out of range",
            "it is a fraction between 0 and 1",
            "use e.g. 0.05 (5 %), or strict mode to stop at the first bad file",
        )


def decode_plan(spec: InputSpec, *, reduced_decode: bool = True) -> DecodePlan:
    """How :meth:`ImageDataset.load` with ``spec=spec`` decodes (what changes the pixels)."""
    return _load_plan(spec, None, None, None, False, 0.25, reduced_decode)


def stat_regular(path: Path) -> os.stat_result | None:
    """``stat`` of a regular file without following a final symlink; None otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None
