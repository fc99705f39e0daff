"""The decoded-image cache: bitwise pixels, reuse without decoding, damage detected, privacy."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from sourcefree.data.cache import HEADER_SIZE, CachedRead, cache_path, read_cached
from sourcefree.data.dataset import ImageDataset, hashed_id
from sourcefree.data.readers import read_image_folder
from sourcefree.data.synthetic import write_domain
from sourcefree.engine.method import Method, MethodContext, Phase, StepOutput
from sourcefree.engine.models import Classifier
from sourcefree.engine.registry import register_method, unregister_method
from sourcefree.errors import DatasetError, RunInterruptedError
from sourcefree.package.manifest import InputSpec
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.pipeline.prepare import disk_needs, preflight
from tests.signal_helpers import sigterm_at

SPEC = InputSpec(size=(32, 32))
SECRET = "secret-name-4711"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """20 faces (one file name that must never reach the cache) and one corrupt file."""
    data = write_domain(tmp_path / "faces", "wild-mild", 20, 32, seed=3)
    first = sorted(data.glob("*.png"))[0]
    first.rename(data / f"{SECRET}.png")
    (data / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return data


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


def _listing(data: Path) -> ImageDataset:
    return read_image_folder(data)


def _read(data: Path, run: Path, **kw: Any) -> CachedRead:
    kw.setdefault("max_bad_fraction", 0.1)
    return read_cached(_listing(data), SPEC, cache_path(run), **kw)


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count ImageDataset.load calls (each one decodes every image)."""
    calls: list[int] = []
    real = ImageDataset.load

    def counting(self: ImageDataset, *args: Any, **kw: Any) -> Any:
        calls.append(len(self))
        return real(self, *args, **kw)

    monkeypatch.setattr(ImageDataset, "load", counting)
    return calls


@pytest.mark.parametrize("workers", [1, 2])
def test_cached_pixels_are_bitwise_the_uncached_ones(
    folder: Path, run_dir: Path, workers: int
) -> None:
    plain = _listing(folder).load(spec=SPEC, max_bad_fraction=0.1, workers=workers)
    cached = _read(folder, run_dir, workers=workers)
    assert not cached.info.reused and cached.info.refused is None
    assert cached.images.shape == plain.images.shape == (20, 32, 32, 3)
    assert np.array_equal(cached.images, plain.images)
    assert np.array_equal(cached.indices, plain.indices)
    assert not cached.images.flags.writeable, "the map is read-only"
    assert cached.report.ok == plain.report.ok == 20 and cached.report.bad == 1
    assert cached.report.reasons == plain.report.reasons == {"corrupt": 1}
    again = _read(folder, run_dir, workers=workers)
    assert again.info.reused and np.array_equal(again.images, plain.images)
    assert again.report == dataclasses.replace(cached.report, bad_ids=())


def test_a_valid_cache_is_reused_without_decoding(
    folder: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _read(folder, run_dir)
    calls = _count_loads(monkeypatch)
    second = _read(folder, run_dir)
    assert calls == [] and second.info.reused
    assert second.info.bytes == cache_path(run_dir).stat().st_size == first.info.bytes
    assert np.array_equal(first.images, second.images)


def _flip(offset: int) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset if offset >= 0 else len(data) + offset] ^= 0x01
        path.write_bytes(bytes(data))

    return edit


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 7)


def _extend(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"\0")


def _public(path: Path) -> None:
    os.chmod(path, 0o644)


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a cache at all")


DAMAGE = {
    "truncated": (_truncate, "size does not match"),
    "extended": (_extend, "size does not match"),
    "magic byte": (_flip(0), "not a decoded-image cache"),
    "header byte": (_flip(40), "header was modified"),
    "pixel byte": (_flip(HEADER_SIZE + 5000), "pixels do not match their sha256"),
    "index byte": (_flip(-200), "index or summary section was modified"),
    "summary byte": (_flip(-3), "index or summary section was modified"),
    "readable by others": (_public, "not a private file"),
    "garbage": (_garbage, "not a decoded-image cache"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_is_refused_logged_and_rebuilt(
    folder: Path,
    run_dir: Path,
    damage: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = _read(folder, run_dir)
    pixels = np.array(good.images)
    edit, reason = DAMAGE[damage]
    edit(cache_path(run_dir))
    calls = _count_loads(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="sourcefree"):
        rebuilt = _read(folder, run_dir)
    assert calls == [21], "decoded again, once"
    assert not rebuilt.info.reused and rebuilt.info.refused is not None
    assert reason in rebuilt.info.refused
    assert "decoded-image cache in the run directory was refused" in caplog.text
    assert np.array_equal(rebuilt.images, pixels)
    assert stat.S_IMODE(cache_path(run_dir).stat().st_mode) == 0o600
    assert _read(folder, run_dir).info.reused, "the rebuilt file is valid"


def test_other_images_or_decode_settings_are_not_reused(folder: Path, run_dir: Path) -> None:
    _read(folder, run_dir)
    other = read_cached(_listing(folder), InputSpec(size=(24, 24)), cache_path(run_dir))
    assert not other.info.reused and "shape" in (other.info.refused or "")
    assert other.images.shape == (20, 24, 24, 3)
    grey = read_cached(
        _listing(folder), InputSpec(size=(24, 24), color="gray"), cache_path(run_dir)
    )
    assert not grey.info.reused and grey.images.shape == (20, 24, 24, 1)
    assert not _read(folder, run_dir).info.reused
    (folder / "zz-broken.png").unlink()
    fewer = _read(folder, run_dir)
    assert not fewer.info.reused and "other images" in (fewer.info.refused or "")


def test_reuse_applies_strict_and_the_bad_fraction(folder: Path, run_dir: Path) -> None:
    _read(folder, run_dir)
    with pytest.raises(DatasetError, match="(?i)strict mode stops"):
        _read(folder, run_dir, strict=True)
    with pytest.raises(DatasetError, match="max_bad_fraction"):
        _read(folder, run_dir, max_bad_fraction=0.0)
    assert _read(folder, run_dir).info.reused, "a refusal of the read keeps the valid cache"


def test_a_failed_decode_leaves_nothing(folder: Path, run_dir: Path) -> None:
    with pytest.raises(DatasetError, match="unreadable"):
        _read(folder, run_dir, max_bad_fraction=0.0)
    assert os.listdir(run_dir) == [], "no cache and no temp file"


def test_the_cache_holds_pixels_and_counts_only(folder: Path, run_dir: Path) -> None:
    _read(folder, run_dir)
    blob = cache_path(run_dir).read_bytes()
    listing = _listing(folder)
    for text in (SECRET, str(folder), folder.name, "zz-broken", ".png"):
        assert text.encode() not in blob, text
    for sample in listing.samples:
        assert hashed_id(sample.key).encode() not in blob
        assert sample.key.encode() not in blob


def test_each_rank_has_its_own_file(tmp_path: Path) -> None:
    assert cache_path(tmp_path).name == "images.cache"
    assert cache_path(tmp_path, 3).name == "images.rank3.cache"


# -- through adapt ------------------------------------------------------------------------


SETS = ["batch_size=16", "epochs=2"]


def _weights(pkg_dir: Path) -> dict[str, torch.Tensor]:
    return load_safetensors((pkg_dir / "model.safetensors").read_bytes())


def test_adapt_keeps_the_cache_private_and_removes_it_with_the_run_dir(
    source_pkg: Path, folder: Path, tmp_path: Path
) -> None:
    request = AdaptRequest(source_pkg, folder, method="adabn", out=tmp_path / "a", device="cpu")
    first = adapt(request)
    assert first.report.to_dict()["target"]["cache"]["reused"] is False
    assert not (tmp_path / ".a.work").exists(), "no cache survives a run that did not keep it"
    kept = tmp_path / "kept.work"
    done = adapt(
        AdaptRequest(
            source_pkg,
            folder,
            method="adabn",
            out=tmp_path / "b",
            device="cpu",
            workdir=kept,
            keep_workdir=True,
        )
    )
    cache = cache_path(kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and cache.stat().st_uid == os.getuid()
    assert done.report.target_cache == {"reused": False, "bytes": cache.stat().st_size}
    a, b = _weights(tmp_path / "a" / "package"), _weights(tmp_path / "b" / "package")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert SECRET.encode() not in cache.read_bytes()
    assert not [p for p in kept.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_resume_reads_the_cache_and_decodes_nothing(
    source_pkg: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wd = tmp_path / "wd"
    base = AdaptRequest(
        source_pkg, folder, method="tent", out=tmp_path / "run", overrides=SETS, device="cpu"
    )
    adapt(dataclasses.replace(base, out=tmp_path / "ref"))
    with pytest.raises(RunInterruptedError):
        adapt(dataclasses.replace(base, workdir=wd, on_step=sigterm_at(2)))
    assert cache_path(wd).is_file(), "the cache stays with the checkpoints"
    calls = _count_loads(monkeypatch)
    done = adapt(dataclasses.replace(base, workdir=wd, resume=True))
    assert calls == [], "resume decodes nothing"
    assert done.report.resumed and done.report.to_dict()["target"]["cache"]["reused"] is True
    a, b = _weights(tmp_path / "ref" / "package"), _weights(tmp_path / "run" / "package")
    assert all(torch.equal(a[k], b[k]) for k in a), "bitwise, as without a cache"
    assert not wd.exists()


@dataclass(frozen=True)
class NoopConfig:
    """Test method: keep the source model."""

    scale: float = 1.0
    """Unused; varied by the selection grid."""


class Noop(Method):
    """Keeps the source model; one pass over the images, two --select auto candidates."""

    description = "test: keep the source model"
    config_class = NoopConfig
    selection_grid = ({"scale": 1.0}, {"scale": 2.0})

    def __init__(self, config: NoopConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.model = context.sources[0].model

    def phases(self) -> Sequence[Phase]:
        return [Phase("noop", 1, lambda batch: StepOutput(loss=None), batch_size=8)]

    def modules(self) -> Mapping[str, nn.Module]:
        return {"model": self.model}

    def export_model(self) -> Classifier:
        return self.model.eval()


@pytest.fixture
def noop() -> Iterator[str]:
    register_method("noop-cache-test")(Noop)
    yield "noop-cache-test"
    unregister_method("noop-cache-test")


def test_select_auto_candidates_and_a_later_run_share_one_decode(
    source_pkg: Path, folder: Path, tmp_path: Path, noop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_loads(monkeypatch)
    work = tmp_path / "work"
    request = AdaptRequest(
        source_pkg,
        folder,
        method=noop,
        select="auto",
        out=tmp_path / "a",
        device="cpu",
        workdir=work,
        keep_workdir=True,
    )
    first = adapt(request)
    assert len(first.report.to_dict()["selection"]["candidates"]) == 2
    assert calls == [21], "one decode for both candidates"
    assert first.report.target_cache is not None and not first.report.target_cache["reused"]
    again = adapt(dataclasses.replace(request, out=tmp_path / "b", keep_workdir=False))
    assert calls == [21], "the kept run directory's cache is read, not decoded again"
    assert again.report.target_cache is not None and again.report.target_cache["reused"]
    assert not work.exists()


def test_disk_needs_count_the_decoded_images(
    source_pkg: Path, folder: Path, tmp_path: Path
) -> None:
    request = AdaptRequest(source_pkg, folder, method="adabn", out=tmp_path / "o")
    pkgs = list(preflight(request).packages)
    needs = disk_needs(request, pkgs, tmp_path / "o", images=21)
    cache = needs[-1]
    assert cache.where == tmp_path / ".o.work" and "21 decoded target images" in cache.what
    assert 21 * 32 * 32 * 3 < cache.bytes < 21 * 32 * 32 * 3 + (1 << 20)
    assert len(disk_needs(request, pkgs, tmp_path / "o")) == len(needs) - 1


def test_the_pixel_digest_travels_with_the_images(folder: Path, run_dir: Path) -> None:
    """Built or reused, the read carries the sha256 of its pixels (torchrun compares it)."""
    import hashlib

    built, reused = _read(folder, run_dir), _read(folder, run_dir)
    want = hashlib.sha256(np.ascontiguousarray(built.images).tobytes()).digest()
    assert built.pixel_sha256 == reused.pixel_sha256 == want
    assert not built.info.reused and reused.info.reused
