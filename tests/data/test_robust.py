"""Robust reading: every bad-file case of security.md 4B is skipped, counted and reported."""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sourcefree.data import ImageDataset, imaging, read_image_folder, read_labels_csv
from sourcefree.data.dataset import escape_name, hashed_id
from sourcefree.errors import ConfigError, DatasetError

ImageWriter = Callable[..., Path]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a huge size but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _good(root: Path, write_image: ImageWriter, n: int) -> None:
    for i in range(n):
        write_image(root / f"good{i:02d}.png", value=10 * i)


def _one_bad(tmp_path: Path, write_image: ImageWriter, name: str, data: bytes) -> ImageDataset:
    root = tmp_path / "data"
    _good(root, write_image, 3)
    (root / name).write_bytes(data)
    return read_image_folder(root)


def _reasons(ds: ImageDataset) -> dict[str, int]:
    return ds.preflight(max_bad_fraction=1.0).reasons


def test_zero_byte_file_is_skipped(tmp_path: Path, write_image: ImageWriter) -> None:
    ds = _one_bad(tmp_path, write_image, "zero.jpg", b"")
    assert _reasons(ds) == {"empty": 1}


def test_truncated_jpeg_is_skipped(tmp_path: Path, write_image: ImageWriter) -> None:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    ds = _one_bad(tmp_path, write_image, "cut.jpg", buf.getvalue()[: len(buf.getvalue()) // 2])
    assert _reasons(ds) == {"corrupt": 1}


def test_garbage_named_jpg_is_skipped(tmp_path: Path, write_image: ImageWriter) -> None:
    ds = _one_bad(tmp_path, write_image, "garbage.jpg", b"this is not a JPEG at all" * 10)
    assert _reasons(ds) == {"not_image": 1}


@pytest.mark.parametrize(
    ("side", "reason"),
    [(30_000, "bomb"), (10_000, "bomb"), (8_200, "too_large")],
    ids=["bomb-error", "bomb-warning-range", "above-max-pixels"],
)
def test_decompression_bombs_are_refused(
    tmp_path: Path, write_image: ImageWriter, side: int, reason: str
) -> None:
    ds = _one_bad(tmp_path, write_image, "bomb.png", _png_header(side, side))
    assert _reasons(ds) == {reason: 1}


def test_modes_are_normalised(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    root.mkdir()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(root / "a_cmyk.jpg", quality=100)
    grey16 = np.full((8, 8), 65535, dtype=np.uint16)
    Image.fromarray(grey16).save(root / "b_16bit.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = bytes([255, 0])  # index 1 (green) fully transparent
    pal.save(root / "c_palette_alpha.png", transparency=bytes([255, 0]))
    Image.new("L", (8, 8), 200).save(root / "d_grey.png")
    ds = read_image_folder(root)
    loaded = ds.load(size=8, color="rgb")
    assert loaded.report.bad == 0
    cmyk, b16, palette, grey = loaded.images[:, 4, 4]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # red
    assert tuple(b16) == (255, 255, 255)  # 16-bit white stays white
    assert tuple(palette) == (0, 0, 0)  # transparent -> composited on black
    assert tuple(grey) == (200, 200, 200)  # grey replicated to RGB
    as_grey = ds.load(size=8, color="gray")
    assert as_grey.images.shape == (4, 8, 8, 1)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    root = tmp_path / "exif"
    root.mkdir()
    img = Image.new("RGB", (20, 10), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # a red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(root / "rotated.jpg", exif=exif, quality=100)
    ds = read_image_folder(root)
    decoded = ds.decode(0)
    assert decoded.size == (10, 20)
    top = np.asarray(decoded)[1, 5]
    assert top[0] > 200 and top[1] < 80  # the stripe is now on top


def test_symlink_outside_root_is_not_followed(tmp_path: Path, write_image: ImageWriter) -> None:
    outside = write_image(tmp_path / "secret" / "private.png")
    root = tmp_path / "data"
    _good(root, write_image, 3)
    (root / "link.png").symlink_to(outside)
    (root / "inside.png").symlink_to(root / "good00.png")  # inside the root: followed
    os.symlink(tmp_path / "secret", root / "linkdir")  # directory links: never descended
    ds = read_image_folder(root)
    report = ds.preflight(max_bad_fraction=1.0)
    assert report.reasons == {"outside_root": 1}
    assert report.ok == 4
    assert report.ignored == 1


def test_fifo_and_device_are_not_opened(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "data"
    _good(root, write_image, 3)
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would block forever
    (root / "null.png").symlink_to("/dev/null")
    report = read_image_folder(root).preflight(max_bad_fraction=1.0)
    assert report.reasons == {"not_regular": 1, "outside_root": 1}


def test_directory_named_like_an_image(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "data"
    _good(root, write_image, 2)
    write_image(root / "x.jpg" / "inner.png")  # a folder called x.jpg is just a folder
    ds = read_image_folder(root)
    assert len(ds) == 3 and ds.preflight().bad == 0
    (root / "labels.csv").write_text("path,label\nx.jpg,a\ngood00.png,b\n")
    listed = read_labels_csv(root / "labels.csv")
    assert listed.preflight(max_bad_fraction=1.0).reasons == {"not_regular": 1}


def test_non_utf8_and_newline_names(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "data"
    root.mkdir()
    weird = [os.fsdecode(b"caf\xe9\xff.png"), "two\nlines.png"]
    for name in weird:
        write_image(root / name)
    (root / os.fsdecode(b"bad\xfe\nname.jpg")).write_bytes(b"")
    log = tmp_path / "skipped.log"
    ds = read_image_folder(root)
    report = ds.preflight(max_bad_fraction=1.0, log_path=log)
    assert report.ok == 2 and report.reasons == {"empty": 1}
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1  # the newline in the name is escaped
    ident, reason, shown = lines[0].split("\t")
    assert reason == "empty"
    assert shown == "bad\\xfe\\nname.jpg"
    assert ident == hashed_id(os.fsdecode(b"bad\xfe\nname.jpg"))
    assert escape_name("a\\b") == "a\\\\b"


def test_non_image_and_hidden_files_are_ignored(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "data"
    _good(root, write_image, 2)
    (root / "notes.txt").write_text("hello")
    (root / "._good00.png").write_bytes(b"AppleDouble junk")
    (root / ".cache").mkdir()
    write_image(root / ".cache" / "thumb.png")
    ds = read_image_folder(root)
    assert len(ds) == 2
    assert ds.preflight().ignored == 3


def test_unreadable_file_is_counted(tmp_path: Path, write_image: ImageWriter) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    root = tmp_path / "data"
    _good(root, write_image, 3)
    locked = write_image(root / "locked.png")
    locked.chmod(0)
    try:
        assert _reasons(read_image_folder(root)) == {"unreadable": 1}
    finally:
        locked.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_bad_fraction_threshold(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "data"
    _good(root, write_image, 20)
    (root / "bad1.jpg").write_bytes(b"")
    loaded = read_image_folder(root).load(size=8)  # 1/21 = 4.8 % <= 5 %
    assert loaded.report.bad == 1 and len(loaded.images) == 20
    assert set(loaded.indices.tolist()) == set(range(21)) - {0}  # bad1.jpg sorts first
    (root / "bad2.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"2 of 22 images are unreadable \(9\.1% > "):
        read_image_folder(root).load(size=8)
    loaded = read_image_folder(root).load(size=8, max_bad_fraction=0.1)
    assert loaded.report.reasons == {"empty": 1, "not_image": 1}


def test_strict_stops_at_first_bad_file(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "data"
    _good(root, write_image, 20)
    (root / "zz_bad.jpg").write_bytes(b"")
    ds = read_image_folder(root)
    with pytest.raises(DatasetError, match=r"unreadable image [0-9a-f]{12} \(zero-byte file\)"):
        ds.load(size=8, strict=True)


def test_report_and_errors_hold_no_paths(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "patient-jane-doe"
    _good(root, write_image, 2)
    (root / "jane_doe_private.jpg").write_bytes(b"")
    (root / "john_smith.jpg").write_bytes(b"x")
    log = tmp_path / "private.log"
    with pytest.raises(DatasetError) as info:
        read_image_folder(root).load(size=8, log_path=log)
    report = read_image_folder(root).preflight(max_bad_fraction=1.0)
    for text in (str(info.value), str(report.to_dict()), report.summary()):
        assert "jane" not in text and "john" not in text and str(tmp_path) not in text
    assert len(report.bad_ids) == 2
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "jane_doe_private.jpg" in log.read_text()


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        read_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no images found"):
        read_image_folder(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        read_image_folder(tmp_path / "missing")


def test_all_bad_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 1 images could be read"):
        read_image_folder(root).load(size=8, max_bad_fraction=1.0)


def test_invalid_load_options(tmp_path: Path, write_image: ImageWriter) -> None:
    write_image(tmp_path / "a.png")
    ds = read_image_folder(tmp_path)
    with pytest.raises(ConfigError, match="max_bad_fraction=1.5 is out of range"):
        ds.load(max_bad_fraction=1.5)
    with pytest.raises(ConfigError, match="unknown colour 'cmyk'"):
        ds.load(color="cmyk")
    with pytest.raises(ConfigError, match="unknown interpolation 'lanczos'"):
        ds.load(interpolation="lanczos")


def test_fingerprint_tracks_names_sizes_mtimes(tmp_path: Path, write_image: ImageWriter) -> None:
    root = tmp_path / "data"
    _good(root, write_image, 3)
    first = read_image_folder(root).fingerprint()
    assert read_image_folder(root).fingerprint() == first
    assert first.files == 3 and first.bytes > 0
    os.utime(root / "good01.png", ns=(1, 1))
    touched = read_image_folder(root).fingerprint()
    assert touched.digest != first.digest
    write_image(root / "good03.png")
    grown = read_image_folder(root).fingerprint()
    assert first.describe_change(grown).startswith("3 -> 4 images")
    assert first.describe_change(first) == "unchanged"


def test_loaded_images_convert_like_a_manifest(tmp_path: Path, write_image: ImageWriter) -> None:
    write_image(tmp_path / "a.png", value=255)
    loaded = read_image_folder(tmp_path).load(size=(6, 4))
    x = loaded.to_float(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 6, 4) and x.dtype == np.float32
    assert float(x[0, :, 3, 2].min()) == pytest.approx(1.0)


def test_permission_error_is_counted_not_raised(
    tmp_path: Path, write_image: ImageWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    _good(root, write_image, 3)
    write_image(root / "locked.png")
    real = imaging._read_regular_file

    def deny(path: Path) -> bytes:
        if path.name == "locked.png":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(imaging, "_read_regular_file", deny)
    assert _reasons(read_image_folder(root)) == {"unreadable": 1}


def test_iter_decoded_streams_and_checks_at_the_end(
    tmp_path: Path, write_image: ImageWriter
) -> None:
    root = tmp_path / "data"
    _good(root, write_image, 3)
    (root / "bad.jpg").write_bytes(b"")
    ds = read_image_folder(root)
    seen = [i for i, img in ds.iter_decoded(max_bad_fraction=0.5, color="gray") if img.mode == "L"]
    assert seen == [1, 2, 3]
    with pytest.raises(DatasetError, match="1 of 4 images are unreadable"):
        list(ds.iter_decoded())
