"""Optional offline face detection: OpenCV's Haar cascade, shipped inside its wheel.

Needs the ``faces`` extra (``pip install 'sourcefree[faces]'``, i.e.
``opencv-python-headless>=4.8,<5``; OpenCV 5 ships no cascades). OpenCV is
imported only when a detector is built. Formats that carry face boxes
(ExpW, AffectNet) are cropped from their boxes and need no detector.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from sourcefree.data.dataset import Box
from sourcefree.errors import DatasetError

#: The cascade file inside ``cv2.data.haarcascades``.
CASCADE = "haarcascade_frontalface_default.xml"


class FaceDetectorError(DatasetError):
    """OpenCV with Haar cascades is not installed."""


def _missing(why: str) -> FaceDetectorError:
    return FaceDetectorError(
        "face detection needs OpenCV with its Haar cascades",
        why,
        "pip install 'sourcefree[faces]' (opencv-python-headless>=4.8,<5)",
    )


def _load_cascade() -> Any:
    try:
        import cv2
    except ImportError:
        raise _missing("OpenCV (cv2) is not installed") from None
    data = getattr(cv2, "data", None)
    folder = getattr(data, "haarcascades", "") if data is not None else ""
    path = os.path.join(folder, CASCADE) if folder else ""
    if not hasattr(cv2, "CascadeClassifier") or not path or not os.path.isfile(path):
        raise _missing(
            f"this OpenCV ({getattr(cv2, '__version__', '?')}) has no Haar cascades; "
            "OpenCV 5 dropped them"
        )
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise _missing(f"the cascade {CASCADE} could not be loaded")
    return cascade


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
        arr = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image)
        if arr.ndim == 3:
            arr = (arr[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        found = self._cascade.detectMultiScale(
            np.ascontiguousarray(arr),
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size),
        )
        boxes = [
            (int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in np.reshape(found, (-1, 4))
        ]
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)

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
