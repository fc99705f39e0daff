"""An ``adapt`` output folder passed where a package is expected uses its ``package/``.

``evaluate OUT``, ``predict OUT``, ``verify OUT``, ``inspect OUT``, ``audit OUT`` and
``Predictor(OUT)`` all go through :func:`sourcefree.package.loader.resolve_package_dir`,
which names the package it uses on stderr; anything else is still refused as before.

``adapt --memory-budget``: bad sizes exit 2 before anything is written; a budget too
small for float32 features shows in the output folder's report.json (``memory``), and
the run directory keeps no spill file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sourcefree.cli.app import main
from sourcefree.errors import PackageError
from sourcefree.package.loader import load_package, resolve_package_dir
from sourcefree.pipeline.report import AdaptReport

NOTE = "is an adapt output folder; its package is"


@pytest.fixture(scope="module")
def adapt_out(source_pkg: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(OUT of one small adabn run, its target folder with labels.csv)."""
    from sourcefree.data.synthetic import write_domain
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt

    root = tmp_path_factory.mktemp("adapted")
    data = write_domain(root / "photos", "wild-mild", 12, 32, seed=5)
    out = root / "adapted"
    adapt(AdaptRequest(source_pkg, data, method="adabn", out=out, device="cpu", gate=False))
    return out, data


def _labels_csv(data: Path, dst: Path) -> Path:
    """The generator's labels, restricted to the 3 classes of the test package."""
    rows = (data / "labels.csv").read_text().splitlines()[1:]
    keep = [r for r in rows if r.split(",")[1] in ("surprise", "fear", "happiness")]
    dst.write_text("path,label\n" + "\n".join(keep) + "\n")
    return dst


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_verify_inspect_and_audit_use_the_package_and_say_so(
    adapt_out: tuple[Path, Path],
) -> None:
    out, _ = adapt_out
    sha = load_package(out / "package").sha256
    code, stdout, stderr = _run("verify", str(out), "--sha256", sha)
    assert code == 0, stderr
    assert stdout.startswith("OK ") and f"sha256 {sha}" in stdout
    assert f"{str(out)!r} {NOTE} {str(out / 'package')!r} (using it)" in stderr
    code, stdout, stderr = _run("inspect", str(out), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["sha256"] == sha and NOTE in stderr
    code, stdout, stderr = _run("audit", str(out))
    assert code == 0, stdout + stderr
    assert "report.json" not in stdout, "the package is audited, not the output folder"


def test_predict_and_evaluate_use_the_package(adapt_out: tuple[Path, Path], tmp_path: Path) -> None:
    out, data = adapt_out
    image = sorted(data.glob("*.png"))[0]
    code, stdout, stderr = _run("predict", str(out), str(image))
    assert code == 0, stderr
    assert NOTE in stderr and NOTE not in stdout, "stdout carries data only"
    assert image.name in stdout
    labels = _labels_csv(data, tmp_path / "labels.csv")
    code, stdout, stderr = _run("evaluate", str(out), str(data), "--labels", str(labels), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["images"] > 0 and NOTE in stderr


def test_predictor_takes_an_adapt_output_folder(
    adapt_out: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from sourcefree import Predictor

    out, data = adapt_out
    with caplog.at_level(logging.INFO, logger="sourcefree"):
        predictor = Predictor(out, device="cpu")
    assert predictor.package.path == out / "package"
    assert any(NOTE in r.getMessage() for r in caplog.records)
    assert len(predictor.predict(sorted(data.glob("*.png"))[:2]).labels) == 2


def test_only_a_real_adapt_output_is_resolved(adapt_out: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = adapt_out
    assert resolve_package_dir(out / "package") == out / "package"
    # No report.json: not an adapt output, refused as before with the two choices named.
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "report.json").unlink()
    assert resolve_package_dir(bare) == bare
    with pytest.raises(PackageError, match="package/ folder inside the output of"):
        load_package(bare)
    # A package/ that is a link is never followed.
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(out / "report.json", linked / "report.json")
    os.symlink(out / "package", linked / "package")
    assert resolve_package_dir(linked) == linked
    code, _, stderr = _run("verify", str(linked))
    assert code == 2 and "has no manifest.json" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("size", ["abc", "0", "1.5", "9999T", "8X"])
def test_bad_memory_budget_exits_2(size: str, source_pkg: Path, tmp_path: Path) -> None:
    args = ["adapt", str(source_pkg), str(tmp_path), "-m", "shot", "-o", str(tmp_path / "out")]
    code, stdout, stderr = _run(*args, "--memory-budget", size)
    assert code == 2, stdout + stderr
    assert f"error: --memory-budget {size!r}." in stderr and "Fix: pass a size such as" in stderr
    assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.work").exists()


# 16 images, smallcnn features of D = 128: float32 needs 16 x 128 x 4 = 8,192 bytes, float16
# 16 x (2 x 128 + 4) = 4,160 (the rows and their scales).
@pytest.mark.parametrize(("size", "storage"), [("5000", "float16"), ("1K", "disk")])
def test_shot_under_a_small_memory_budget(
    size: str, storage: str, source_pkg: Path, tmp_path: Path
) -> None:
    from sourcefree.data.synthetic import write_domain

    data = write_domain(tmp_path / "wild", "wild-mild", 16, 32, seed=3)
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["adapt", str(source_pkg), str(data), "-m", "shot", "-o", str(out), "--set", "epochs=1"]
    args += ["--set", "batch_size=8", "--device", "cpu", "--no-gate", "--no-progress"]
    args += ["--no-plan-probe", "--workers", "1", "--workdir", str(work), "--keep-workdir"]
    code, stdout, stderr = _run(*args, "--memory-budget", size)
    assert code == 0, stdout + stderr
    report = json.loads((out / "report.json").read_text())
    assert report["memory"] == {
        "budget_bytes": int(size) if size.isdigit() else 1024,
        "features": {"storage": storage, "bytes": 4160, "within_budget": True},
    }
    assert AdaptReport.from_dict(report).to_dict()["memory"] == report["memory"]
    kept = sorted(p.name for p in work.rglob("*") if p.is_file())
    assert kept and not any("features" in name or name.endswith(".f16") for name in kept), kept
