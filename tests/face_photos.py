"""Real photos and a tiny vendor model for the face tests (issue 23).

``from tests.face_photos import astronaut, lfw_faces, write_smallcnn_weights``:
scikit-image's bundled astronaut portrait, LFW face crops upscaled the way
docs/data.md advises, and the seeded smallcnn weights the face packages export.
The photo helpers skip the calling test without scikit-image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def astronaut() -> Image.Image:
    """scikit-image's astronaut photo (512x512 RGB, one frontal face)."""
    return Image.fromarray(pytest.importorskip("skimage.data").astronaut())


def lfw_faces(n: int) -> list[Image.Image]:
    """LFW face crops (25 px grey), padded by a quarter and upscaled x4 as data.md advises."""
    faces = pytest.importorskip("skimage.data").lfw_subset()[:n]
    out = []
    for face in faces:
        pixels = np.pad((face * 255).round().astype(np.uint8), 6, mode="edge")
        out.append(Image.fromarray(pixels).resize((148, 148), Image.Resampling.BILINEAR))
    return out


def write_smallcnn_weights(path: Path, classes: int = 3) -> Path:
    """A seeded smallcnn ``state_dict()`` (3-channel input) saved with safetensors."""
    import torch
    from safetensors.torch import save_file

    from sourcefree.engine.models import get_architecture

    torch.manual_seed(0)
    save_file(get_architecture("smallcnn").build(3, classes).state_dict(), path)
    return path
