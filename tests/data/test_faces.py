"""Optional face cropping: OpenCV's Haar cascade on a real photo, and the missing-extra error."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sourcefree.data import read_image_folder
from sourcefree.data.faces import FaceDetector, FaceDetectorError, expand_box

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("cv2")


def test_haar_cascade_finds_the_astronaut() -> None:
    photo = skimage_data.astronaut()  # public-domain NASA portrait, 512 x 512 RGB
    boxes = FaceDetector().detect(photo)
    assert boxes, "no face found"
    left, top, right, bottom = boxes[0]
    # The face sits around x 177-272, y 66-161 (data.md, checked with OpenCV 4.14).
    assert 150 < left < 200 and 40 < top < 100
    assert 70 < right - left < 130 and 70 < bottom - top < 130


def test_load_crops_detected_faces(tmp_path: Path) -> None:
    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "astronaut.png")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "wall.png")
    loaded = read_image_folder(tmp_path).load(size=48, detect_faces=True)
    assert loaded.report.ok == 2 and loaded.report.no_face == 1
    face = loaded.images[0].astype(np.float64)
    # A skin-toned crop, not the mostly dark, blue-grey full photo.
    assert face[..., 0].mean() > face[..., 2].mean() + 20


def test_expand_box_is_square_and_centred() -> None:
    assert expand_box((10, 20, 30, 60), 0.5) == (-10, 10, 50, 70)


def test_missing_opencv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(FaceDetectorError, match=r"pip install 'sourcefree\[faces\]'"):
        FaceDetector()


def test_opencv_without_cascades(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoCascades:  # what OpenCV 5 looks like: no CascadeClassifier, empty data dir
        __version__ = "5.0.0"

    monkeypatch.setitem(sys.modules, "cv2", NoCascades())
    with pytest.raises(FaceDetectorError, match="OpenCV 5 dropped them"):
        FaceDetector()
