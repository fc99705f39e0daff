"""Image decoding and preprocessing shared by the runtime, the data layer and training.

Decoding is strict: the whole image is decoded (a truncated JPEG opens fine
and fails only at ``load()``), EXIF orientation is applied, decompression bombs
are refused, and every mode (grey, CMYK, 16-bit, palette, alpha) is normalised
to the model's colour.

An image becomes model input in two steps, each written once here:
:func:`to_pixels` (mode, then resize with the spec's filter: uint8 HWC) and
:func:`normalise` (uint8 pixels -> float32 CHW). The runtime, evaluation,
adaptation (through the torch wrapper ``sourcefree.engine.method.pixels_to_tensor``)
and vendor training all call :func:`normalise`, so their inputs are bitwise equal
(tests/test_preprocess_parity.py). :func:`rgb_to_grey` is Pillow's ``convert("L")``
on arrays. Numpy frames (RGB, OpenCV's BGR, grey) enter through :func:`image_from_array`
and then take the PIL path, so a frame and the same pixels as a PIL image give bitwise
equal inputs. No torch import.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sourcefree.errors import ConfigError, InputError
from sourcefree.fsutil import IMAGE_SUFFIXES, FileRefusedError, read_regular_file
from sourcefree.package.manifest import InputSpec

#: Largest image accepted, in pixels (Pillow warns at 89 MP and errors at 179 MP).
MAX_PIXELS = 64 * 1024 * 1024
#: Largest file accepted, in bytes.
MAX_FILE_BYTES = 256 * 1024 * 1024
_CHUNK = 256 * 1024
#: Formats Pillow may decode; everything else (FITS, PSD, EPS, ...) is refused.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM"})

#: Resize filters by name: a manifest's ``input.interpolation`` (nearest, bilinear,
#: bicubic), plus ``area`` for :meth:`sourcefree.data.dataset.ImageDataset.load`.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}
#: Pillow's ITU-R 601-2 luma weights in 16-bit fixed point (``convert("L")``).
_LUMA_FIXED = (19595, 38470, 7471)
#: Channel orders of a 3-channel numpy frame: ``rgb``, or ``bgr`` (OpenCV's order).
CHANNEL_ORDERS = ("rgb", "bgr")


class ImageDecodeError(InputError):
    """An image file cannot be decoded safely."""


def _too_large(why: str) -> ImageDecodeError:
    return ImageDecodeError("an image file is too large", why, "downscale the image first")


def _read_regular_file(path: Path) -> bytes:
    """Read an image file: regular, not a link, never blocking, size checked first."""
    try:
        data = read_regular_file(path, MAX_FILE_BYTES, follow_links=False)
    except FileRefusedError as exc:
        if exc.reason == "too-large":
            raise _too_large(f"{exc.size} bytes exceeds {MAX_FILE_BYTES}") from None
        if exc.reason == "grew":
            raise ImageDecodeError(
                "an image file grew while it was read",
                "another process is writing it",
                "wait until the copy is complete",
            ) from None
        raise _not_regular() from None
    except OSError as exc:
        raise ImageDecodeError(
            "an image could not be read", exc.strerror or str(exc), "check the file's permissions"
        ) from None
    if not data:
        raise ImageDecodeError("an image file is empty", "it has zero bytes", "re-copy it")
    return data


def _not_regular() -> ImageDecodeError:
    return ImageDecodeError(
        "an image path is not a regular file",
        "symlinks, FIFOs, devices and directories are never followed",
        "pass the image file itself",
    )


def _read_stream(source: BinaryIO) -> io.BytesIO:
    """Copy an open binary file in 256 KiB chunks, refusing more than :data:`MAX_FILE_BYTES`."""
    out = io.BytesIO()
    while True:
        chunk = source.read(min(_CHUNK, MAX_FILE_BYTES + 1 - out.tell()))
        if not chunk:
            break
        out.write(chunk)
        if out.tell() > MAX_FILE_BYTES:
            raise _too_large(f"the stream holds more than {MAX_FILE_BYTES} bytes")
    out.seek(0)
    return out


def _check_channel_order(channel_order: str) -> None:
    if channel_order not in CHANNEL_ORDERS:
        raise InputError(
            f"unknown channel order {str(channel_order)[:20]!r}",
            f"choose one of {', '.join(CHANNEL_ORDERS)}",
            'pass channel_order="bgr" for OpenCV frames, "rgb" otherwise',
        )


def image_from_array(frame: np.ndarray, channel_order: str = "rgb") -> Image.Image:
    """A uint8 frame as a PIL image: (H, W, 3) as ``RGB``, (H, W) or (H, W, 1) as ``L``.

    ``channel_order="bgr"`` reads a 3-channel frame in OpenCV's order. Type, dtype,
    shape and size (at most :data:`MAX_PIXELS`) are checked before any copy.

    Raises:
        InputError: an unknown channel order, not a uint8 array of those shapes, or empty.
        ImageDecodeError: more than :data:`MAX_PIXELS` pixels.
    """
    _check_channel_order(channel_order)
    if not isinstance(frame, np.ndarray):
        raise InputError(
            f"expected a numpy array, got {type(frame).__name__}",
            "frames are numpy arrays",
            "pass a path, a PIL image or a uint8 numpy frame",
        )
    shape = tuple(frame.shape)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or shape[2:] not in ((), (1,), (3,)):
        raise InputError(
            f"a frame of dtype {frame.dtype} and shape {shape[:8]} is not an image",
            "frames are uint8 (H, W, 3) in RGB or BGR order, or (H, W) grey",
            "convert with frame.astype(np.uint8); drop an alpha channel; pass a list of "
            "frames for a batch; preprocessed float32 arrays go to predict_array",
        )
    height, width = shape[:2]
    if height == 0 or width == 0:
        raise InputError(f"a frame of shape {shape} is empty", "it has no pixels", "pass 1+")
    if height * width > MAX_PIXELS:
        raise _too_large(f"{width}x{height} pixels exceeds {MAX_PIXELS}")
    if frame.ndim == 2 or shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(frame.reshape(height, width)))
    pixels = frame[..., ::-1] if channel_order == "bgr" else frame
    return Image.fromarray(np.ascontiguousarray(pixels))


def draft_side(size: tuple[int, int], faces: bool) -> int:
    """The short side a JPEG keeps when decoded at reduced scale (:func:`decode_image`).

    The rule: at least the model's input side (``max(height, width)`` of ``size``)
    without face preprocessing; with it (``faces``: detect or align), at least
    ``max(4 x that side, 512)`` px, so the detector and the face crop keep far more
    pixels than the input. libjpeg scales by 1/2, 1/4 or 1/8 only, and only when
    both sides stay at or above this side, so a JPEG is reduced when it is at least
    twice as large on both sides.
    """
    side = max(size)
    return max(4 * side, 512) if faces else side


def _draft(img: Image.Image, reduce_to: int) -> None:
    """libjpeg's DCT scaling (``Image.draft``) when a JPEG is >= 2x ``reduce_to`` on both sides."""
    if img.format == "JPEG" and min(img.size) >= 2 * reduce_to:
        img.draft(None, (reduce_to, reduce_to))


def decode_image(
    source: str | os.PathLike[str] | Image.Image | np.ndarray | BinaryIO,
    color: str,
    *,
    channel_order: str = "rgb",
    reduce_to: int | None = None,
) -> Image.Image:
    """Decode fully and return a PIL image in mode ``RGB`` or ``L``.

    Args:
        source: a path, an open binary file, a PIL image, or a uint8 numpy frame
            (see :func:`image_from_array`).
        color: ``rgb`` or ``gray``, the model's colour.
        channel_order: ``rgb`` or ``bgr``; used for 3-channel numpy frames only.
        reduce_to: a JPEG file or stream at least twice this side on both sides is
            decoded at reduced scale (libjpeg's DCT scaling by 1/2, 1/4 or 1/8,
            deterministic), keeping both sides at or above it (:func:`draft_side`
            gives the side). None, other formats, PIL images and frames: full scale.

    Raises:
        ImageDecodeError: unreadable, not an image, a refused format, or a
            decompression bomb. The message never contains the path.
        InputError: a numpy frame of another dtype or shape.
    """
    _check_channel_order(channel_order)
    if isinstance(source, np.ndarray):
        img = image_from_array(source, channel_order)
    elif isinstance(source, Image.Image):
        img = source
    else:
        data = (
            io.BytesIO(_read_regular_file(Path(source)))  # shares the bytes, no copy
            if isinstance(source, (str, os.PathLike))
            else _read_stream(source)
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(data, formats=sorted(ALLOWED_FORMATS))
                if img.width * img.height > MAX_PIXELS:
                    raise ImageDecodeError(
                        "an image is too large to decode",
                        f"{img.width}x{img.height} pixels exceeds {MAX_PIXELS}",
                        "downscale it, or check it is not a decompression bomb",
                    )
                if reduce_to is not None:
                    _draft(img, reduce_to)
                img.load()
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError(
                "an image was refused as a decompression bomb",
                "its declared size is far beyond any face photo",
                "remove the file",
            ) from None
        except UnidentifiedImageError:
            raise ImageDecodeError(
                "a file is not a supported image",
                f"allowed formats: {', '.join(sorted(ALLOWED_FORMATS))}",
                "convert it to PNG or JPEG, or remove it",
            ) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageDecodeError(
                "an image is corrupt or truncated", type(exc).__name__, "re-copy or remove it"
            ) from None
    # A broken EXIF block only loses the orientation hint.
    with contextlib.suppress(OSError, ValueError, SyntaxError, KeyError, TypeError):
        img = ImageOps.exif_transpose(img)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    return _normalise_mode(img, color)


def _normalise_mode(img: Image.Image, color: str) -> Image.Image:
    """Any Pillow mode -> ``RGB`` (colour) or ``L`` (grey); alpha composited on black."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    elif mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    if color == "gray":
        return img if img.mode == "L" else img.convert("RGB").convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def resample_filter(name: str) -> Image.Resampling:
    """The Pillow filter of an interpolation name (see :data:`RESAMPLE`).

    Raises:
        ConfigError: an unknown name.
    """
    if name not in RESAMPLE:
        raise ConfigError(
            f"unknown interpolation {name!r}",
            f"choose one of {', '.join(RESAMPLE)}",
            "use the interpolation in the package's input spec",
        )
    return RESAMPLE[name]


def resized_pixels(img: Image.Image, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """An ``RGB`` or ``L`` image resized to (height, width) as uint8 (H, W, C), C = 3 or 1."""
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), resample_filter(interpolation))
    return np.asarray(img, dtype=np.uint8).reshape(height, width, -1)


def to_pixels(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """A decoded image -> uint8 (H, W, C) in the spec's colour (C = 3 rgb, 1 gray) and size.

    The mode is normalised first (alpha on black, grey as Pillow's ``L``), then
    the image is resized with the spec's interpolation: the input of :func:`normalise`.
    """
    return resized_pixels(_normalise_mode(img, spec.color), spec.size, spec.interpolation)


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (H, W, C) or (N, H, W, C) -> float32 (C, H, W) or (N, C, H, W).

    Exactly ``(pixels / 255 - mean) / std`` per channel, each step in float32 in
    this order; one-channel (grey) pixels are repeated when ``spec.channels`` is 3.
    The only place pixels become model input (the torch wrapper looks values up
    from it).

    Raises:
        InputError: not uint8, not 3-D/4-D, or channels that do not match the spec's colour.
    """
    want = 3 if spec.color == "rgb" else 1
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or pixels.shape[-1] != want:
        raise InputError(
            f"pixels of dtype {pixels.dtype} and shape {tuple(pixels.shape)} cannot be normalised",
            f"the input spec ({spec.color}) takes uint8 (H, W, {want}) or (N, H, W, {want})",
            "decode with the spec's colour (rgb_to_grey converts RGB arrays for grey specs)",
        )
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = np.moveaxis(x, -1, -3)
    if want == 1 and spec.channels == 3:
        x = np.repeat(x, 3, axis=-3)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def rgb_to_grey(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> uint8 grey (..., 1), bitwise Pillow's ``convert("L")``.

    ITU-R 601-2 luma ``L = 0.299 R + 0.587 G + 0.114 B`` in 16-bit fixed point,
    rounded half up, as Pillow computes it.

    Raises:
        InputError: not uint8 with 3 channels last.
    """
    if pixels.dtype != np.uint8 or pixels.ndim < 3 or pixels.shape[-1] != 3:
        raise InputError(
            f"pixels of dtype {pixels.dtype} and shape {tuple(pixels.shape)} are not RGB",
            "grey conversion takes uint8 (..., H, W, 3)",
            "pass uint8 RGB pixels, channels last",
        )
    wide = pixels.astype(np.uint32)
    r, g, b = _LUMA_FIXED
    luma = (wide[..., 0] * r + wide[..., 1] * g + wide[..., 2] * b + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def preprocess(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """A decoded image -> the model's float32 (C, H, W) input: to_pixels, then normalise."""
    return normalise(to_pixels(img, spec), spec)


def is_image_name(name: str) -> bool:
    """True when the file name has an image suffix."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES
