"""Fixture helpers for the data tests: tiny images written in real on-disk formats."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ImageWriter = Callable[..., Path]


def _write(path: Path, size: tuple[int, int] = (16, 12), value: int = 128, fmt: str = "") -> Path:
    """Write a small RGB image (width, height) whose pixels encode ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[0, 0] = (255 - value, value, 0)
    Image.fromarray(arr, "RGB").save(path, format=fmt or None)
    return path


@pytest.fixture
def write_image() -> ImageWriter:
    """``write_image(path, size=(w, h), value=128, fmt="")`` -> path."""
    return _write
