"""Offline face detection and alignment: OpenCV's Haar cascades, shipped inside its wheel.

Needs the ``faces`` extra (``pip install 'sourcefree[faces]'``, i.e.
``opencv-python-headless>=4.8,<5``; OpenCV 5 ships no cascades). OpenCV is
imported only when a detector is built. Formats that carry face boxes
(ExpW, AffectNet) are cropped from their boxes and need no detector.

:func:`model_face` is the one step that turns a decoded photo into the face a
package's model sees (its ``input.faces``); adaptation, evaluation
(:meth:`sourcefree.data.dataset.ImageDataset.load`) and serving
(:class:`sourcefree.runtime.predictor.Predictor`) all call it before the common
resize and normalisation, so the same photo gives bitwise the same input.

The eye template of ``align`` (constants below) is in units of the face's side
``F`` (0 = the face's left or top edge, 1 = its right or bottom edge): the eye
centres land at x = 0.30 and 0.70, y = 0.38 of the face. The output crop is the
face grown by the margin ``m`` on its side, ``F (1 + m)`` pixels square, with
``F`` = eye distance / 0.40 (so the warp keeps the photo's scale). With the
default margin 0.25 the eyes sit at 34 % and 66 % of the crop's width and at
40.4 % of its height.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sourcefree.data.dataset import Box
from sourcefree.errors import DatasetError, InputError
from sourcefree.package.manifest import FaceSpec

#: The face cascade inside ``cv2.data.haarcascades`` (detector ``opencv-haar-frontalface-default``).
CASCADE = "haarcascade_frontalface_default.xml"
#: The eye cascade used by ``align`` inside the detected face.
EYE_CASCADE = "haarcascade_eye.xml"
#: Eye template of ``align``: x of the image-left and image-right eye centres, and their
#: common y, in units of the face's side (see the module docstring).
EYE_TEMPLATE_X = (0.30, 0.70)
EYE_TEMPLATE_Y = 0.38
#: The face region is resized to this width before the eye search (eyes >= 20 px).
EYE_SEARCH_WIDTH = 200
#: Eye boxes are searched between these fractions of the face's width.
EYE_MIN_SIZE, EYE_MAX_SIZE = 0.10, 0.45
#: Eye centres must lie in the face's upper part (fraction of its height).
EYE_MAX_Y = 0.60
#: Plausible eye pairs: distance in this range of the face's width, tilt at most this.
EYE_MIN_DISTANCE, EYE_MAX_DISTANCE = 0.20, 0.75
EYE_MAX_TILT_DEGREES = 30.0
#: Largest side of a face crop before the resize: a bigger face is scaled down to it
#: (a 64 MP photo of one face would otherwise give a crop of up to 16k x 16k px).
MAX_FACE_SIDE = 2048


class FaceDetectorError(DatasetError):
    """OpenCV with Haar cascades is not installed."""


class NoFaceError(InputError):
    """No face was found and the package's input spec skips such images."""


def _missing(why: str) -> FaceDetectorError:
    return FaceDetectorError(
        "face detection needs OpenCV with its Haar cascades",
        why,
        "pip install 'sourcefree[faces]' (opencv-python-headless>=4.8,<5)",
    )


def _load_cascade(name: str = CASCADE) -> Any:
    try:
        import cv2
    except ImportError:
        raise _missing("OpenCV (cv2) is not installed") from None
    data = getattr(cv2, "data", None)
    folder = getattr(data, "haarcascades", "") if data is not None else ""
    path = os.path.join(folder, name) if folder else ""
    if not hasattr(cv2, "CascadeClassifier") or not path or not os.path.isfile(path):
        raise _missing(
            f"this OpenCV ({getattr(cv2, '__version__', '?')}) has no Haar cascades; "
            "OpenCV 5 dropped them"
        )
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise _missing(f"the cascade {name} could not be loaded")
    return cascade


def grey_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 (H, W) grey pixels of a PIL image (Pillow's luma) or of a numpy frame."""
    arr = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image)
    if arr.ndim == 3:
        arr = (arr[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _by_size(boxes: Sequence[Box]) -> list[Box]:
    """Largest first; equal areas by top, then left (a total, deterministic order)."""
    return sorted(boxes, key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b[1], b[0], b[2], b[3]))


class FaceDetector:
    """Frontal faces with OpenCV's Haar cascade (about 150 ms for a 512 px photo)."""

    def __init__(
        self, *, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24
    ) -> None:
        self._cascade = _load_cascade()
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size = min_size

    def detect(self, image: Image.Image | np.ndarray) -> list[Box]:
        """Face boxes (left, top, right, bottom), largest first."""
        found = self._cascade.detectMultiScale(
            grey_pixels(image),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
        )
        return _by_size(
            [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in np.reshape(found, (-1, 4))]
        )

    def largest(self, image: Image.Image | np.ndarray, margin: float = 0.25) -> Box | None:
        """The largest face as a square box grown by ``margin`` of its side; None if none."""
        boxes = self.detect(image)
        if not boxes:
            return None
        return expand_box(boxes[0], margin)


def expand_box(box: Box, margin: float) -> Box:
    """A square box around ``box``'s centre, its side grown by ``margin`` (0.25 = 25 %)."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top) * (1.0 + margin)
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    half = side / 2.0
    return (round(cx - half), round(cy - half), round(cx + half), round(cy + half))


@functools.cache
def load_detectors(name: str) -> tuple[FaceDetector, Any]:
    """The face detector of a package's ``input.faces.detector`` and the eye cascade, built once."""
    if name != "opencv-haar-frontalface-default":  # pragma: no cover - the manifest checks it
        raise _missing(f"unknown detector {name!r}")
    return FaceDetector(), _load_cascade(EYE_CASCADE)


def find_eyes(
    grey: np.ndarray, box: Box, cascade: Any | None = None
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Centres of the image-left and image-right eyes inside a face box, in photo pixels.

    The face region is resized to :data:`EYE_SEARCH_WIDTH` px wide; the largest eye
    box in each half of its upper part is kept. None when either eye is missing or
    the pair is implausible (distance, tilt).
    """
    cascade = cascade if cascade is not None else load_detectors(FaceSpec().detector)[1]
    import cv2

    left, top = max(0, box[0]), max(0, box[1])
    right, bottom = min(grey.shape[1], box[2]), min(grey.shape[0], box[3])
    width, height = right - left, bottom - top
    if width < 8 or height < 8:
        return None
    scale = EYE_SEARCH_WIDTH / width
    size = (EYE_SEARCH_WIDTH, max(1, round(height * scale)))
    filt = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    roi = cv2.resize(np.ascontiguousarray(grey[top:bottom, left:right]), size, interpolation=filt)
    lo, hi = round(EYE_MIN_SIZE * EYE_SEARCH_WIDTH), round(EYE_MAX_SIZE * EYE_SEARCH_WIDTH)
    found = cascade.detectMultiScale(
        roi, scaleFactor=1.1, minNeighbors=5, minSize=(lo, lo), maxSize=(hi, hi)
    )
    sides: tuple[list[Box], list[Box]] = ([], [])
    for x, y, w, h in np.reshape(found, (-1, 4)).tolist():
        cx, cy = x + w / 2.0, y + h / 2.0
        if cy < EYE_MAX_Y * size[1]:
            sides[0 if cx < size[0] / 2.0 else 1].append((x, y, x + w, y + h))
    if not sides[0] or not sides[1]:
        return None
    centres = []
    for side in sides:
        x0, y0, x1, y1 = _by_size(side)[0]
        centres.append((left + (x0 + x1) / 2.0 / scale, top + (y0 + y1) / 2.0 / scale))
    (lx, ly), (rx, ry) = centres
    distance = math.hypot(rx - lx, ry - ly) / width
    tilt = abs(math.degrees(math.atan2(ry - ly, rx - lx)))
    if not EYE_MIN_DISTANCE <= distance <= EYE_MAX_DISTANCE or tilt > EYE_MAX_TILT_DEGREES:
        return None
    return centres[0], centres[1]


def eye_template(side: int, margin: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where ``align`` puts the eye centres in a ``side`` px crop made with ``margin``."""

    def at(u: float) -> float:
        return side / 2.0 + (u - 0.5) * side / (1.0 + margin)

    y = at(EYE_TEMPLATE_Y)
    return (at(EYE_TEMPLATE_X[0]), y), (at(EYE_TEMPLATE_X[1]), y)


def align_face(
    image: Image.Image,
    eyes: tuple[tuple[float, float], tuple[float, float]],
    margin: float,
) -> Image.Image:
    """Rotate so the eyes are level and warp them onto :func:`eye_template` (similarity).

    The crop is ``eye distance / 0.40 x (1 + margin)`` px square (the photo's scale,
    at most :data:`MAX_FACE_SIDE`), resampled bilinearly by Pillow; outside the photo
    is black.
    """
    (lx, ly), (rx, ry) = eyes
    distance = math.hypot(rx - lx, ry - ly)
    span = EYE_TEMPLATE_X[1] - EYE_TEMPLATE_X[0]
    side = min(MAX_FACE_SIDE, max(2, round(distance / span * (1.0 + margin))))
    (qlx, qy), (qrx, _) = eye_template(side, margin)
    theta = math.atan2(ry - ly, rx - lx)
    k = distance / (qrx - qlx)  # photo pixels per output pixel (about 1)
    c, s = k * math.cos(theta), k * math.sin(theta)
    # Output (x, y) -> photo: p = k R(theta) (q - q_left) + p_left (Pillow takes the inverse map).
    coeffs = (c, -s, lx - c * qlx + s * qy, s, c, ly - s * qlx - c * qy)
    return image.transform(
        (side, side),
        Image.Transform.AFFINE,
        coeffs,
        resample=Image.Resampling.BILINEAR,
        fillcolor=0,
    )


@dataclass(frozen=True)
class FaceInput:
    """One face of a photo as the model sees it, before the resize."""

    box: Box
    """The face box in the photo (the detector's, or the format's); the whole frame when
    no face was found and the policy keeps it whole."""
    image: Image.Image
    """The crop (``detect``), the aligned crop (``align``) or the whole frame."""
    found: bool = True
    """False when no face was found and the whole frame is used."""
    aligned: bool = False
    """True when ``align`` found both eyes and warped them onto the template."""


def face_inputs(
    image: Image.Image,
    spec: FaceSpec,
    *,
    boxes: Sequence[Box] | None = None,
    limit: int | None = None,
) -> list[FaceInput]:
    """Every face of a decoded photo (``RGB`` or ``L``) cut as ``spec`` says, largest first.

    ``boxes`` (a format's face boxes) replace detection. Mode ``none`` gives the whole
    frame. An empty list when no face is found (the caller applies ``spec.no_face``).
    ``align`` falls back to the ``detect`` crop (``aligned`` False) when the eyes are
    not found. Deterministic: the same photo gives bitwise the same crops.

    Raises:
        FaceDetectorError: OpenCV or its cascades are missing.
    """
    if not spec.active:
        return [FaceInput((0, 0, image.width, image.height), image, found=True)]
    grey = None
    if boxes is None:
        detector, _ = load_detectors(spec.detector)
        grey = grey_pixels(image)
        boxes = detector.detect(grey)
    out = []
    for box in _by_size(boxes)[:limit]:
        if spec.mode == "align":
            grey = grey_pixels(image) if grey is None else grey
            eyes = find_eyes(grey, box, load_detectors(spec.detector)[1])
            if eyes is not None:
                out.append(FaceInput(box, align_face(image, eyes, spec.margin), aligned=True))
                continue
        out.append(FaceInput(box, square_crop(image, expand_box(box, spec.margin))))
    return out


def square_crop(image: Image.Image, box: Box) -> Image.Image:
    """``image.crop(box)``, black outside the photo; scaled down to :data:`MAX_FACE_SIDE`."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    if max(width, height) <= MAX_FACE_SIDE:
        return image.crop(box)
    f = MAX_FACE_SIDE / max(width, height)
    inner = (max(0, left), max(0, top), min(image.width, right), min(image.height, bottom))
    canvas = Image.new(image.mode, (max(1, round(width * f)), max(1, round(height * f))))
    if inner[2] > inner[0] and inner[3] > inner[1]:
        size = (max(1, round((inner[2] - inner[0]) * f)), max(1, round((inner[3] - inner[1]) * f)))
        part = image.crop(inner).resize(size, Image.Resampling.BILINEAR)
        canvas.paste(part, (round((inner[0] - left) * f), round((inner[1] - top) * f)))
    return canvas


def model_face(image: Image.Image, spec: FaceSpec, box: Box | None = None) -> FaceInput | None:
    """The one face the model sees for a photo: the largest, or per ``spec.no_face``.

    Returns the largest face (``box``: a format's box instead of detection), the
    whole frame (``found`` False) when none is found and the policy is ``whole``, or
    None when none is found and the policy is ``skip``.
    """
    faces = face_inputs(image, spec, boxes=None if box is None else [box], limit=1)
    if faces:
        return faces[0]
    if spec.no_face == "skip":
        return None
    return FaceInput((0, 0, image.width, image.height), image, found=False)


def no_face_error() -> NoFaceError:
    """What serving one image raises when it has no face and the policy skips it."""
    return NoFaceError(
        "no face was found in an image",
        "the package's input spec skips images without a face (input.faces.no_face = skip): "
        "its model was never trained on whole frames",
        "pass a photo with a visible frontal face, or use predict_files/predict_paths "
        "(and the predict command), which report such images and go on",
    )
