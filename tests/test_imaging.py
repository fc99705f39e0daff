"""Shared image decoding: errors are typed and never carry the file's path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from sourcefree.data.imaging import ImageDecodeError, decode_image


def test_unopenable_file_is_a_decode_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "private-name.png"
    Image.new("RGB", (8, 8)).save(path)

    def deny(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ImageDecodeError, match="could not be read") as info:
        decode_image(path, "rgb")
    assert "private-name" not in str(info.value)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "I;16", "CMYK", "L"])
def test_every_mode_becomes_rgb_or_grey(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg"
    Image.new(mode, (10, 12)).save(path)
    assert decode_image(path, "rgb").mode == "RGB"
    assert decode_image(path, "gray").mode == "L"
