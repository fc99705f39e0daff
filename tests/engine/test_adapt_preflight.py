"""``adapt`` checks every input before any image is decoded, and prints its plan (issue 21, 2).

Refusals run on a data folder of undecodable images with ``--strict``: a run that
reached decoding would fail there with "unreadable image", so the expected message
proves the check came first. ``OUT`` lives in a folder that must stay empty.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from sourcefree.cli.app import main
from sourcefree.engine.checkpoints import KEEP
from sourcefree.engine.trainer import Trainer
from sourcefree.errors import SignatureError, WriteError
from sourcefree.package.inspect import size_text
from sourcefree.package.loader import load_package, sign_package
from sourcefree.package.signing import fingerprint, keygen, load_public_key
from sourcefree.pipeline import runplan
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.pipeline.prepare import (
    CHECKPOINT_WEIGHTS_FACTOR,
    REPORT_BYTES,
    DiskNeed,
    check_disk_space,
    disk_needs,
    preflight,
)

SHORT_SHOT = ("--set", "epochs=2", "--set", "batch_size=16")
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str]]:
    """Three vendors' key pairs: name -> (private, public, fingerprint)."""
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b", "c"):
        private, public = keygen(folder / name)
        out[name] = (private, public, fingerprint(load_public_key(public)))
    return out


@pytest.fixture(scope="module")
def signed(
    source_pkg: Path,
    keys: dict[str, tuple[Path, Path, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """Copies of the source package signed by vendor a and by vendor b."""
    folder = tmp_path_factory.mktemp("signed")
    out = {}
    for name in ("a", "b"):
        pkg = folder / f"fer-{name}"
        shutil.copytree(source_pkg, pkg)
        sign_package(pkg, keys[name][0])
        out[name] = pkg
    return out


@pytest.fixture(scope="module")
def undecodable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder whose images all fail to decode."""
    folder = tmp_path_factory.mktemp("undecodable") / "data"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(b"not a png " * 10)
    return folder


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["adapt", *map(str, args), "--device", "cpu", "--no-progress"])


def _refused(result: Result, message: str, run: Path) -> None:
    """Exit 2 with ``message``, before decoding, no traceback, nothing written."""
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "unreadable image" not in result.output, "the check must come before decoding"
    assert "Traceback" not in result.output
    assert os.listdir(run) == [], "no OUT, lock, stage or run directory"


# -- keys and signatures ------------------------------------------------------------------


def test_signed_package_adapts_and_only_the_key_fingerprint_is_reported(
    signed: dict[str, Path],
    keys: dict[str, tuple[Path, Path, str]],
    target_dir: Path,
    tmp_path: Path,
) -> None:
    _, public, fp = keys["a"]
    out = tmp_path / "out"
    result = _cli(
        signed["a"], target_dir, "-m", "adabn", "-o", out, "--key", public, "--require-signature"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [s["signer"] for s in report["sources"]] == [fp]
    for name in ("report.json", "report.html"):
        text = (out / name).read_text()
        assert str(public.parent) not in text and public.name not in text, "no key path"
    assert "plan: adabn on 64 target images, device cpu, amp off" in result.output
    assert "phase 1 'bn-stats': 1 epoch x 1 step of batch" in result.output


def test_unverified_source_refs_have_no_signer() -> None:
    from sourcefree.pipeline.report import SourceRef

    assert SourceRef("n", "1", "0" * 64).to_dict() == {
        "name": "n",
        "version": "1",
        "sha256": "0" * 64,
    }
    assert SourceRef("n", "1", "0" * 64, "ed25519:ab").to_dict()["signer"] == "ed25519:ab"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong key", "the package signature does not verify with the given public key"),
        ("unsigned", "package 'fer-small' is not signed"),
        ("not a key", "the public key is not a PEM public key"),
        ("folder as key", "is not a regular file"),
        ("require without key", "--require-signature without --key"),
    ],
)
def test_key_refusals_exit_2_before_decoding(
    case: str,
    message: str,
    signed: dict[str, Path],
    source_pkg: Path,
    keys: dict[str, tuple[Path, Path, str]],
    undecodable: Path,
    tmp_path: Path,
) -> None:
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    options: dict[str, tuple[Path, list[str | Path]]] = {
        "wrong key": (signed["a"], ["--key", keys["b"][1]]),
        "unsigned": (source_pkg, ["--key", keys["a"][1], "--require-signature"]),
        "not a key": (signed["a"], ["--key", bad_key]),
        "folder as key": (signed["a"], ["--key", tmp_path]),
        "require without key": (signed["a"], ["--require-signature"]),
    }
    pkg, key_args = options[case]
    run = tmp_path / "run"
    run.mkdir()
    result = _cli(pkg, undecodable, "-m", "adabn", "-o", run / "out", "--strict", *key_args)
    _refused(result, message, run)


def test_each_of_several_sources_verifies_with_one_of_the_keys(
    signed: dict[str, Path], keys: dict[str, tuple[Path, Path, str]], tmp_path: Path
) -> None:
    both = [keys["b"][1], keys["a"][1]]
    request = AdaptRequest(
        [signed["a"], signed["b"]], tmp_path, method="la-cmfer", out=tmp_path / "o", keys=both
    )
    got = preflight(request)
    assert [p.signer for p in got.packages] == [keys["a"][2], keys["b"][2]]
    wrong = [keys["a"][1], keys["c"][1]]
    with pytest.raises(SignatureError) as caught:
        preflight(
            AdaptRequest(
                [signed["a"], signed["b"]],
                tmp_path,
                method="la-cmfer",
                out=tmp_path / "o",
                keys=wrong,
            )
        )
    text = str(caught.value)
    assert "does not verify" in text and "fer-b" in text
    assert f"tried each of the 2 keys given: {keys['a'][2]}, {keys['c'][2]}" in text


def test_cli_key_is_repeatable_and_one_right_key_passes(
    signed: dict[str, Path],
    keys: dict[str, tuple[Path, Path, str]],
    undecodable: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    args: list[str | Path] = ["--key", keys["c"][1], "--key", keys["a"][1], "--require-signature"]
    result = _cli(signed["a"], undecodable, "-m", "adabn", "-o", out, "--strict", *args)
    assert result.exit_code == 2 and "unreadable image" in result.output, (
        "keys passed, decoding ran"
    )


def test_a_loaded_package_is_verified_again_with_the_keys(
    signed: dict[str, Path], keys: dict[str, tuple[Path, Path, str]], tmp_path: Path
) -> None:
    loaded = load_package(signed["b"])  # no key: signature not checked
    assert loaded.signer is None
    request = AdaptRequest(loaded, tmp_path, method="tent", out=tmp_path / "o", keys=keys["b"][1])
    assert request.keys == (keys["b"][1],), "one key given alone is a tuple of one"
    (pkg,) = preflight(request).packages
    assert pkg.signer == keys["b"][2] and pkg.sha256 == loaded.sha256
    with pytest.raises(SignatureError, match="does not verify"):
        preflight(
            AdaptRequest(loaded, tmp_path, method="tent", out=tmp_path / "o", keys=[keys["a"][1]])
        )


def test_request_command_repeats_the_keys(tmp_path: Path) -> None:
    request = AdaptRequest(
        "pkg",
        "data",
        method="tent",
        out="out",
        keys=["a.pub", b"PEM", "b.pub"],
        require_signature=True,
        plan_probe=False,
    )
    command = request.command(resume=True)
    assert "--key a.pub --key b.pub" in command and "PEM" not in command
    assert "--require-signature" in command and "--no-plan-probe" in command
    assert "--key" not in AdaptRequest("p", "d", method="tent", out="o").command()


# -- disk space ---------------------------------------------------------------------------


def _package_bytes(pkg: Path) -> int:
    return sum(f.stat().st_size for f in pkg.iterdir() if f.name != "signature")


def test_disk_needs_are_the_package_and_the_checkpoint_store_peak(
    source_pkg: Path, tmp_path: Path
) -> None:
    pkgs = list(preflight(AdaptRequest(source_pkg, tmp_path, method="tent", out="o")).packages)
    weights = (source_pkg / "model.safetensors").stat().st_size
    out = tmp_path / "out"
    fresh = disk_needs(AdaptRequest(source_pkg, tmp_path, method="tent", out=out), pkgs, out)
    assert [n.where for n in fresh] == [tmp_path, tmp_path / ".out.work"]
    assert fresh[0].bytes == _package_bytes(source_pkg) + REPORT_BYTES
    assert fresh[1].bytes == (KEEP + 1) * CHECKPOINT_WEIGHTS_FACTOR * weights
    resumed = AdaptRequest(source_pkg, tmp_path, method="tent", out=out, resume=True)
    assert disk_needs(resumed, pkgs, out)[1].bytes == CHECKPOINT_WEIGHTS_FACTOR * weights
    multi = AdaptRequest(source_pkg, tmp_path, method="auto", out=out)
    assert len(disk_needs(multi, pkgs, out)) == 1, "candidates write no checkpoint"


def test_a_real_checkpoint_fits_the_estimate(
    source_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    """SGD with momentum over the whole backbone (shot): the largest optimizer state per weight."""
    work = tmp_path / "work"
    adapt(
        AdaptRequest(
            source_pkg,
            target_dir,
            method="shot",
            out=tmp_path / "out",
            device="cpu",
            overrides=SHORT_SHOT[1::2],
            workdir=work,
            keep_workdir=True,
            plan_probe=False,
        )
    )
    weights = (source_pkg / "model.safetensors").stat().st_size
    ckpts = [p for p in (work / "checkpoints").iterdir() if p.name.startswith("ckpt-")]
    assert 0 < len(ckpts) <= KEEP
    for ckpt in ckpts:
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        assert weights < size <= CHECKPOINT_WEIGHTS_FACTOR * weights


def test_not_enough_space_exits_2_before_decoding(
    source_pkg: Path, undecodable: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: Usage(10**12, 10**12 - 1000, 1000))
    run = tmp_path / "run"
    run.mkdir()
    result = _cli(source_pkg, undecodable, "-m", "tent", "-o", run / "out", "--strict")
    request = AdaptRequest(source_pkg, run, method="tent", out=run / "out")
    total = sum(n.bytes for n in disk_needs(request, preflight(request).packages, run / "out"))
    message = f"this run writes about {size_text(total)} there and 1000 B is free"
    _refused(result, message, run)
    assert "Fix: free space on that disk, or pass another -o OUT" in result.output


def test_writes_on_one_disk_are_added_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    needs = [DiskNeed(tmp_path / "a", 600, "package"), DiskNeed(tmp_path / "b" / "c", 500, "ckpt")]
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: Usage(10**6, 10**6 - 1100, 1100))
    check_disk_space(needs)  # 1100 bytes fit
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: Usage(10**6, 10**6 - 1099, 1099))
    with pytest.raises(WriteError, match="writes about 1,100 bytes there and 1,099 bytes is free"):
        check_disk_space(needs)


# -- the run's plan -----------------------------------------------------------------------


def _shot(source_pkg: Path, target_dir: Path, out: Path, **fields: Any) -> AdaptRequest:
    return AdaptRequest(
        source_pkg,
        target_dir,
        method="shot",
        out=out,
        device="cpu",
        overrides=SHORT_SHOT[1::2],
        **fields,
    )


def test_plan_is_logged_before_training_and_is_what_the_trainer_runs(
    source_pkg: Path,
    target_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[list[str], list[tuple[str, int, int]]]] = []
    run = Trainer.run

    def recorded(self: Trainer, **kwargs: Any) -> Any:
        lines = [r.getMessage() for r in caplog.records if r.name == "sourcefree"]
        seen.append((lines, [(log.name, log.epochs, log.steps_per_epoch) for log in self.logs]))
        return run(self, **kwargs)

    monkeypatch.setattr(Trainer, "run", recorded)
    caplog.set_level(logging.INFO, logger="sourcefree")
    result = adapt(_shot(source_pkg, target_dir, tmp_path / "out"))
    ((lines, trainer_phases),) = seen
    assert lines[0] == "plan: shot on 64 target images, device cpu, amp off"
    assert lines[1:3] == [
        "  phase 1 'target-bn': 1 epoch x 1 step of batch 256, no gradients",
        "  phase 2 'adapt': 2 epochs x 4 steps of batch 16, trains",
    ]
    assert "estimated training time: not measured (a run of 9 steps" in lines[3]
    plan = result.report.to_dict()["plan"]
    planned = [(p["name"], p["epochs"], p["steps_per_epoch"]) for p in plan["phases"]]
    reported = [(p["name"], p["epochs"], p["steps_per_epoch"]) for p in result.report.phases]
    assert planned == trainer_phases == reported
    assert plan["probe"] is None and plan["estimated_train_s"] is None
    assert plan["actual_train_s"] > 0


def _curves(phases: Any) -> list[list[Any]]:
    """The losses and metrics of each phase (its timings left out)."""
    return [[p[k] for k in ("epoch_loss", "loss_curve", "epoch_metrics")] for p in phases]


@pytest.mark.parametrize("method", ["shot", "tent"])
def test_the_probe_leaves_the_results_bitwise_identical(
    method: str,
    source_pkg: Path,
    target_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """shot: augmentations draw random numbers; tent: BatchNorm statistics move as it trains."""
    monkeypatch.setattr(runplan, "MAX_PROBE_SHARE", 1.0)  # probe this short run too
    settings = {"shot": SHORT_SHOT[1::2], "tent": ("batch_size=16", "recalibrate=false")}

    def run(name: str, **fields: Any) -> Any:
        return adapt(
            AdaptRequest(
                source_pkg,
                target_dir,
                method=method,
                out=tmp_path / name,
                device="cpu",
                overrides=settings[method],
                gate=False,  # the gate scores models: not what this compares
                **fields,
            )
        )

    probed, plain = run("probed"), run("plain", plan_probe=False)
    assert probed.package.weights_bytes == plain.package.weights_bytes
    assert _curves(probed.report.phases) == _curves(plain.report.phases)
    with_probe, without = probed.report.to_dict()["plan"], plain.report.to_dict()["plan"]
    assert with_probe["probe"]["batch"] == 16 and with_probe["probe"]["train_pass_s"] > 0
    assert with_probe["estimated_train_s"] > 0
    assert all(p["estimated_s"] > 0 for p in with_probe["phases"])
    assert without["probe"] is None and without["note"] == "--no-plan-probe"


def test_quiet_hides_the_plan(source_pkg: Path, target_dir: Path, tmp_path: Path) -> None:
    args = [str(source_pkg), str(target_dir), "-m", "adabn", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, ["-q", "adapt", *args, "--device", "cpu", "--no-plan-probe"])
    assert result.exit_code == 0, result.output
    assert "plan:" not in result.output


def test_rng_states_are_restored_after_planning() -> None:
    def draws() -> tuple[list[float], list[float], float]:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    def seeded(then: Callable[[], None]) -> tuple[list[float], list[float], float]:
        torch.manual_seed(1)
        np.random.seed(1)
        random.seed(1)
        then()
        return draws()

    def consumed() -> None:
        with runplan.rng_preserved(torch.device("cpu")):
            draws()

    assert seeded(consumed) == seeded(lambda: None)
