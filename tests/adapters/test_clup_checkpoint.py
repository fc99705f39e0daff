"""CluP's external SSL warm-up checkpoint (``ssl.checkpoint``): verified, loaded, kept private."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import sourcefree.package.weights as weights
from sourcefree.adapters.clup import CluP, CluPConfig, FineTuneConfig, SSLConfig
from sourcefree.cli.commands_adapt import adapt_command
from sourcefree.data.synthetic import generate
from sourcefree.engine.config import PRIVATE, public_dict, to_dict
from sourcefree.engine.method import MethodContext, SourceModel, TargetData
from sourcefree.engine.models import load_classifier
from sourcefree.errors import ConfigError, IntegrityError, PackageError
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec

Tensors = dict[str, torch.Tensor]


def _data() -> TargetData:
    s = generate("wild-mild", 16, 32, seed=5)
    return TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="t")


def _config(checkpoint: Path | None = None, sha256: str | None = None) -> CluPConfig:
    ssl = SSLConfig(
        epochs=1,
        prototypes=8,
        hidden_dim=16,
        output_dim=8,
        local_crops=0,
        checkpoint=None if checkpoint is None else str(checkpoint),
        checkpoint_sha256=sha256,
    )
    return CluPConfig(ssl=ssl, finetune=FineTuneConfig(epochs=1))


def _context(source_pkg: Path) -> MethodContext:
    pkg = load_package(source_pkg)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    return MethodContext((SourceModel(pkg, model),), _data(), torch.device("cpu"), 0)


def _build(source_pkg: Path, cfg: CluPConfig) -> CluP:
    return CluP(cfg, _context(source_pkg))


@pytest.fixture(scope="module")
def backbone_state(source_pkg: Path) -> Tensors:
    """A state dict with the backbone's names, shapes and dtypes, and fresh values."""
    ref = _build(source_pkg, _config()).model.backbone.state_dict()
    gen = torch.Generator().manual_seed(11)
    return {
        k: torch.randn(v.shape, generator=gen).to(v.dtype)
        if v.is_floating_point()
        else torch.full_like(v, 5)
        for k, v in ref.items()
    }


def _save(state: Tensors, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_checkpoint_is_the_starting_point(
    source_pkg: Path, backbone_state: Tensors, tmp_path: Path
) -> None:
    path = _save(backbone_state, tmp_path / "swav-backbone.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for sha in (None, digest):
        cfg = _config(path, sha)
        method = _build(source_pkg, cfg)
        got = method.model.backbone.state_dict()
        assert got.keys() == backbone_state.keys()
        assert all(torch.equal(got[k], v) for k, v in backbone_state.items())
        ssl = method.report()["ssl"]
        assert isinstance(ssl, dict)
        assert ssl["checkpoint_sha256"] == digest and ssl["init"] == "checkpoint"
        assert str(tmp_path) not in json.dumps(method.report())
        # What leaves the machine names the checkpoint only as private.
        public = public_dict(cfg)
        assert public["ssl"]["checkpoint"] == PRIVATE
        assert public["ssl"]["checkpoint_sha256"] == sha
        assert str(tmp_path) not in json.dumps(public)
        assert to_dict(cfg)["ssl"]["checkpoint"] == str(path)  # the config itself keeps it
    assert public_dict(_config())["ssl"]["checkpoint"] is None


def _drop_first(s: Tensors) -> Tensors:
    return dict(list(s.items())[1:])


def _first_float(s: Tensors) -> str:
    return next(k for k, v in s.items() if v.is_floating_point())


def _first_int(s: Tensors) -> str:
    return next(k for k, v in s.items() if not v.is_floating_point())


def _reshaped(s: Tensors) -> Tensors:
    k = _first_float(s)
    return {**s, k: torch.zeros(s[k].numel() + 1)}


def _nan(s: Tensors) -> Tensors:
    k = _first_float(s)
    return {**s, k: torch.full_like(s[k], float("nan"))}


BAD_STATES: list[tuple[str, Callable[[Tensors], Tensors], str]] = [
    ("missing", _drop_first, r"1 missing, 0 unexpected"),
    ("extra", lambda s: {**s, "extra.weight": torch.zeros(2)}, r"0 missing, 1 unexpected"),
    ("shape", _reshaped, r"The backbone's is torch.float32"),
    ("float dtype", lambda s: {k: v.double() for k, v in s.items()}, r"torch.float64"),
    ("int dtype", lambda s: {**s, _first_int(s): s[_first_int(s)].int()}, r"torch.int32"),
    ("non-finite", _nan, r"NaN or Inf"),
]


@pytest.mark.parametrize(("case", "edit", "message"), BAD_STATES, ids=[b[0] for b in BAD_STATES])
def test_mismatched_checkpoints_are_refused(
    source_pkg: Path,
    backbone_state: Tensors,
    tmp_path: Path,
    case: str,
    edit: Callable[[Tensors], Tensors],
    message: str,
) -> None:
    path = _save(edit(backbone_state), tmp_path / f"{case}.safetensors")
    with pytest.raises(PackageError, match=message) as info:
        _build(source_pkg, _config(path))
    assert "Fix:" in str(info.value)


def _header_too_long(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


BAD_FILES: list[tuple[str, Callable[[Path], object], str]] = [
    ("pickle", lambda p: p.write_bytes(b"\x80\x04\x95" + b"\x00" * 64), "Pickles run code"),
    ("zip", lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 64), "Torch checkpoints"),
    ("header", _header_too_long, "header length"),
    ("short", lambda p: p.write_bytes(b"\x01\x00"), "shorter than"),
]


@pytest.mark.parametrize(("case", "write", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_files_that_are_not_safetensors_are_refused(
    source_pkg: Path, tmp_path: Path, case: str, write: Callable[[Path], object], message: str
) -> None:
    path = tmp_path / f"{case}.bin"
    write(path)
    with pytest.raises(PackageError, match=message):
        _build(source_pkg, _config(path))


def test_sha256_and_size_are_checked(
    source_pkg: Path, backbone_state: Tensors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(backbone_state, tmp_path / "ckpt.safetensors")
    with pytest.raises(IntegrityError, match="expected ssl.checkpoint_sha256 is 000000000000"):
        _build(source_pkg, _config(path, "0" * 64))
    # Header limit 0: the file (a header plus exactly the backbone's bytes) is too large.
    ctx = _context(source_pkg)
    monkeypatch.setattr(weights, "MAX_HEADER_BYTES", 0)
    with pytest.raises(PackageError, match="holds at most"):
        CluP(_config(path), ctx)


def test_checkpoint_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a readable file"):
        SSLConfig(checkpoint=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ConfigError, match="not a readable file"):
        SSLConfig(checkpoint=str(tmp_path))  # a directory
    with pytest.raises(ConfigError, match="without ssl.checkpoint"):
        SSLConfig(checkpoint_sha256="a" * 64)
    (tmp_path / "c").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a sha256"):
        SSLConfig(checkpoint=str(tmp_path / "c"), checkpoint_sha256="A" * 64)


def test_cli_refuses_a_bad_checkpoint_with_exit_2(
    source_pkg: Path, target_small: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "swav.pt"
    bad.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    out = tmp_path / "out"
    args = [str(source_pkg), str(target_small), "-m", "clup", "-o", str(out), "--no-progress"]
    for value, message in ((bad, "Pickles run code"), (tmp_path / "no", "not a readable file")):
        result = CliRunner().invoke(adapt_command, [*args, "--set", f"ssl.checkpoint={value}"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and message in result.output
        assert "Traceback" not in result.output
        assert not out.exists()


def test_the_checkpoint_path_stays_out_of_the_outputs(
    source_pkg: Path, target_small: Path, backbone_state: Tensors, tmp_path: Path
) -> None:
    path = _save(backbone_state, tmp_path / "private-swav-run.safetensors")
    out = tmp_path / "out"
    args = [str(source_pkg), str(target_small), "-m", "clup", "-o", str(out), "--no-progress"]
    sets = [f"ssl.checkpoint={path}", "ssl.epochs=0", "finetune.epochs=1", "kmeans_n_init=1"]
    sets += ["n_clusters=6", "ssl.prototypes=8", "ssl.local_crops=0", "batch_size=16"]
    result = CliRunner().invoke(adapt_command, [*args, *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    report = json.loads((out / "report.json").read_text())
    assert report["method_report"]["ssl"]["checkpoint_sha256"] == digest
    leaks = [
        f.relative_to(out).as_posix()
        for f in sorted(out.rglob("*"))
        if f.is_file() and path.name.encode() in f.read_bytes()
    ]
    assert leaks == []
