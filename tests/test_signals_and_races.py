"""Signals, races, full disks and read-only folders: typed errors, nothing half-written.

The signal tests run the real CLI in a subprocess whose one patched function
writes a marker file and sleeps at a chosen point (inside a staging directory,
say); the test waits for the marker, sends the signal and checks the exit code
and what is left on disk.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from sourcefree.cli.app import main
from sourcefree.errors import EXIT_RESUMABLE, Interrupted, SourcefreeError, WriteError
from sourcefree.fsutil import (
    atomic_write_bytes,
    claimed_output,
    interruptible,
    staged_directory,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and fcntl")

LABELS = ("surprise", "fear", "happiness")

# The child restores Python's own SIGINT handler: a test run started from a background
# job of a non-interactive shell inherits SIGINT ignored, and the child would then sleep
# through the SIGINT the test sends.
HARNESS = """
import pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import {module} as where
original = where.{attr}
def paused(*args, **kwargs):
    if {when}:
        pathlib.Path({marker!r}).touch()
        time.sleep(600)
    return original(*args, **kwargs)
where.{attr} = paused
from sourcefree.cli.app import main
main(args=sys.argv[1:], prog_name="sourcefree")
"""


def _stop_cli_at(
    patch: str,
    args: list[str],
    tmp: Path,
    sig: int = signal.SIGTERM,
    when: str = "True",
    at_pause: Callable[[], None] | None = None,
) -> tuple[int, str]:
    """Run ``sourcefree ARGS``; when ``patch`` (module:attr) is reached, send ``sig``."""
    module, attr = patch.split(":")
    marker = tmp / "paused.marker"
    code = HARNESS.format(module=module, attr=attr, when=when, marker=str(marker))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        while not marker.exists():
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"the command ended before the pause ({proc.returncode}):\n{err}")
            time.sleep(0.05)
        if at_pause is not None:
            at_pause()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    marker.unlink()
    return proc.returncode, err


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _staging(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.staging"))


def _vendor_weights(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from sourcefree.engine.models import get_architecture

    torch.manual_seed(0)
    save_file(get_architecture("smallcnn").build(3, len(LABELS)).state_dict(), str(path))
    return path


def _export_args(weights: Path, out: Path) -> list[str]:
    return [
        "export",
        "--arch",
        "smallcnn",
        "--weights",
        str(weights),
        "--labels",
        ",".join(LABELS),
        "--input-size",
        "32",
        "--out",
        str(out),
    ]


def _images(folder: Path, count: int = 6) -> Path:
    folder.mkdir()
    rows = ["path,label"]
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i % 256, 90, 200 - 20 * i)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{LABELS[i % len(LABELS)]}")
    (folder.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


# -- 1. signals --------------------------------------------------------------------------


def test_sigterm_during_export_leaves_no_staging_and_no_package(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    weights = _vendor_weights(work / "W.safetensors")
    out = work / "pkg"

    def staging_exists() -> None:
        assert _staging(work), "the signal must arrive while the staging directory exists"

    code, err = _stop_cli_at(
        "sourcefree.package.loader:load_package",
        _export_args(weights, out),
        tmp_path,
        when="str(args[0]).endswith('.staging')",
        at_pause=staging_exists,
    )
    assert code == 143 == 128 + signal.SIGTERM, err
    assert "error: interrupted by SIGTERM" in err and "Traceback" not in err
    assert _entries(work) == ["W.safetensors"], "no package, no staging, no temp file"


def test_sigint_during_export_overwrite_keeps_the_previous_package(
    pkg_copy: Path, tmp_path: Path
) -> None:
    weights = _vendor_weights(tmp_path / "W.safetensors")
    before = {p.name: p.read_bytes() for p in pkg_copy.iterdir()}
    code, err = _stop_cli_at(
        "sourcefree.package.loader:load_package",
        [*_export_args(weights, pkg_copy), "--overwrite"],
        tmp_path,
        sig=signal.SIGINT,
        when="str(args[0]).endswith('.staging')",
    )
    assert code == 130, err
    assert "error: interrupted by SIGINT" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in pkg_copy.iterdir()} == before
    assert _entries(tmp_path) == ["W.safetensors", "pkg"]


def test_sigterm_during_sign_leaves_no_signature(pkg_copy: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    assert CliRunner().invoke(main, ["keygen", str(keys / "v")]).exit_code == 0
    before = _entries(pkg_copy)
    code, err = _stop_cli_at(
        "sourcefree.package.signing:sign_bytes",
        ["sign", str(pkg_copy), "--key", str(keys / "v.key")],
        tmp_path,
    )
    assert code == 143 and "Traceback" not in err, err
    assert _entries(pkg_copy) == before, "no signature, no temp file"


def test_sigterm_during_evaluate_exits_143_in_one_line(source_pkg: Path, tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    code, err = _stop_cli_at(
        "sourcefree.runtime.evaluation:compute_metrics",
        ["evaluate", str(source_pkg), str(data), "--labels", str(tmp_path / "labels.csv")],
        tmp_path,
    )
    assert code == 143, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM")
    assert "Traceback" not in err


def test_sigterm_in_the_report_stage_of_adapt_then_resume(source_pkg: Path, tmp_path: Path) -> None:
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt

    data = _images(tmp_path / "data", 12)
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "adapted"
    args = ["adapt", str(source_pkg), str(data), "-m", "adabn", "-o", str(out), "--no-progress"]

    def staging_exists() -> None:
        assert _staging(runs), "the signal must arrive while OUT is being staged"

    code, err = _stop_cli_at(
        "sourcefree.pipeline.report_html:render_report", args, tmp_path, at_pause=staging_exists
    )
    assert code == EXIT_RESUMABLE, err
    assert "--resume" in err and "Traceback" not in err
    assert _entries(runs) == [".adapted.work"], "OUT absent, no staging, no lock; run dir kept"
    done = adapt(AdaptRequest(source_pkg, data, method="adabn", out=out, resume=True, device="cpu"))
    assert done.report.resumed is True
    assert done.report.checkpoints_written == 0, "training is not run again"
    assert _entries(runs) == ["adapted"]
    assert _entries(out) == ["package", "report.html", "report.json"]


def _signal_self(partial: Path | None = None) -> None:
    """Write ``partial`` (a half-done output), then SIGTERM this process; the handler raises."""
    if partial is not None:
        partial.write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the signal ends it


def test_interruptible_raises_once_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as err, interruptible():
        _signal_self()
    assert err.value.exit_code == 143 and isinstance(err.value, KeyboardInterrupt)
    assert not isinstance(err.value, SourcefreeError), "no `except SourcefreeError` eats it"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_interruptible_keeps_an_ignored_signal_ignored() -> None:
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with interruptible():
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: nothing happens
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


def test_signal_in_a_staged_directory_removes_it(tmp_path: Path) -> None:
    with pytest.raises(Interrupted), staged_directory(tmp_path / "out") as stage:
        _signal_self(stage / "a.bin")
    assert _entries(tmp_path) == []


def test_a_signal_during_an_atomic_write_waits_for_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync

    def fsync_then_signal(fd: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # blocked until the file is in place
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_signal)
    with pytest.raises(Interrupted), interruptible():
        atomic_write_bytes(tmp_path / "f.csv", b"whole")
    assert _entries(tmp_path) == ["f.csv"] and (tmp_path / "f.csv").read_bytes() == b"whole"


# -- 2. one run per output directory ----------------------------------------------------------


def test_second_adapt_into_a_claimed_output_is_refused(source_pkg: Path, tmp_path: Path) -> None:
    from sourcefree.cli.commands_adapt import adapt_command

    out, other = tmp_path / "out", tmp_path / "other-workdir"
    args = [str(source_pkg), str(tmp_path), "-m", "adabn", "-o", str(out), "--no-progress"]
    with claimed_output(out) as lock:  # as a first, still running adapt holds it
        for extra in ([], ["--overwrite"]):
            result = CliRunner().invoke(adapt_command, [*args, "--workdir", str(other), *extra])
            assert result.exit_code == 2, result.output
            assert f"is claimed by another run (pid {os.getpid()})" in result.output
        assert _entries(tmp_path) == [lock.name], "OUT and the second run dir are not created"
    assert _entries(tmp_path) == [], "the claim's lock file goes with it"


def test_a_failed_adapt_releases_its_claim(source_pkg: Path, tmp_path: Path) -> None:
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt

    with pytest.raises(SourcefreeError):
        adapt(
            AdaptRequest(
                source_pkg, tmp_path / "missing-data", method="adabn", out=tmp_path / "a" / "out"
            )
        )
    assert not (tmp_path / "a").exists(), "the parent it created is removed again"
    with claimed_output(tmp_path / "a" / "out"):
        pass


def test_claim_ignores_a_stale_lock_file_and_refuses_a_planted_link(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("12345\n")  # left by a killed run: not locked
    with claimed_output(out):
        pass
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(WriteError, match="symbolic link"), claimed_output(out):
        pass
    assert victim.read_text() == "keep"


# -- 3. full disks and read-only folders ----------------------------------------------------


def _fail(code: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


def test_full_disk_in_an_atomic_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _fail(errno.ENOSPC))
    with pytest.raises(WriteError) as err:
        atomic_write_bytes(target, b"new")
    assert str(err.value).startswith(f"cannot write {str(target)!r}. No space is left")
    assert "Fix: free space" in str(err.value)
    assert _entries(tmp_path) == ["report.json"] and target.read_bytes() == b"old"


@pytest.mark.parametrize(
    ("where", "code", "why"),
    [
        ("fsync", errno.ENOSPC, "No space is left on the device"),
        ("mkdtemp", errno.EROFS, "The folder is read-only"),
        ("mkdtemp", errno.EACCES, "The folder is read-only for this user"),
        ("chmod", errno.EPERM, "read-only for this user"),
    ],
)
def test_staged_directory_write_failures_are_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, code: int, why: str
) -> None:
    monkeypatch.setattr(tempfile if where == "mkdtemp" else os, where, _fail(code))
    with pytest.raises(WriteError, match=why), staged_directory(tmp_path / "out") as stage:
        (stage / "a.bin").write_bytes(b"x")
    assert _entries(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_staged_directory_in_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(WriteError, match="read-only"), staged_directory(folder / "out"):
        pass
    assert _entries(folder) == []


def test_full_disk_while_exporting_a_package(
    source_pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourcefree.engine.models import load_classifier
    from sourcefree.export import source_package
    from sourcefree.package.loader import load_package

    pkg = load_package(source_pkg)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    monkeypatch.setattr(Path, "write_bytes", _fail(errno.ENOSPC))
    with pytest.raises(WriteError, match=r"model\.safetensors'\. No space is left"):
        source_package(
            model,
            architecture="smallcnn",
            labels=list(LABELS),
            input_spec=pkg.manifest.input,
            out=tmp_path / "pkg",
        )
    assert _entries(tmp_path) == []


def test_full_disk_at_the_adapt_report(
    source_pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt

    data = _images(tmp_path / "data", 12)
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setattr(Path, "write_text", _fail(errno.ENOSPC))
    with pytest.raises(WriteError, match=r"report\.html'\. No space is left"):
        adapt(AdaptRequest(source_pkg, data, method="adabn", out=runs / "out", device="cpu"))
    assert _entries(runs) == [".out.work"], "no OUT, no staging, no lock; run dir kept"


# -- 4. predict -o and keygen into missing or read-only folders ----------------------------


@pytest.fixture
def one_image(tmp_path: Path) -> Path:
    path = tmp_path / "face.png"
    Image.new("RGB", (32, 32), (120, 80, 60)).save(path)
    return path


def test_predict_into_a_missing_folder(source_pkg: Path, one_image: Path, tmp_path: Path) -> None:
    out = tmp_path / "missing" / "preds.csv"
    result = CliRunner().invoke(main, ["predict", str(source_pkg), str(one_image), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "Its folder does not exist. Fix: create the folder first" in result.output
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_predict_into_an_unwritable_folder(
    source_pkg: Path, one_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    out = tmp_path / "preds.csv"
    monkeypatch.setattr(tempfile, "mkstemp", _fail(code))
    result = CliRunner().invoke(main, ["predict", str(source_pkg), str(one_image), "-o", str(out)])
    assert result.exit_code == 2 and "error: cannot write" in result.output, result.output
    assert ("No space" if code == errno.ENOSPC else "read-only") in result.output
    assert "predicted" not in result.output, "refused before any work"
    assert _entries(tmp_path) == ["face.png"]


def test_predict_full_disk_at_the_csv_write(
    source_pkg: Path, one_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "preds.csv"
    monkeypatch.setattr(os, "fsync", _fail(errno.ENOSPC))
    result = CliRunner().invoke(main, ["predict", str(source_pkg), str(one_image), "-o", str(out)])
    assert result.exit_code == 2 and "No space is left" in result.output, result.output
    assert _entries(tmp_path) == ["face.png"]


def test_predict_output_that_is_a_folder(source_pkg: Path, one_image: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["predict", str(source_pkg), str(one_image), "-o", str(tmp_path)]
    )
    assert result.exit_code == 2 and "A folder of that name exists" in result.output


def test_keygen_into_a_missing_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keygen", str(tmp_path / "missing" / "v")])
    assert result.exit_code == 2 and "create the folder first" in result.output, result.output
    assert _entries(tmp_path) == []


@pytest.mark.parametrize("where", ["mkstemp", "second-fsync"])
def test_keygen_unwritable_leaves_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp", _fail(errno.EACCES))
    else:
        real, calls = os.fsync, []

        def fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 2:  # the public key's: the private one is already written
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    result = CliRunner().invoke(main, ["keygen", str(tmp_path / "v")])
    assert result.exit_code == 2 and "error: cannot write" in result.output, result.output
    assert _entries(tmp_path) == [], "no key file, no half pair, no temp file"


def test_keygen_with_a_folder_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keygen", str(tmp_path) + "/.."])
    assert result.exit_code == 2 and "names a folder" in result.output, result.output
