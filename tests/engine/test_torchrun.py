"""``adapt`` under torchrun with 2 gloo processes on the CPU (loopback only).

torchrun runs tests/engine/torchrun_worker.py, which calls :func:`sourcefree.adapt`
on every rank through the env:// rendezvous that ``sourcefree adapt`` uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load as load_safetensors

from sourcefree.engine.trainer import StepInfo
from sourcefree.errors import RunInterruptedError
from sourcefree.package.loader import load_package
from sourcefree.pipeline.adaptation import AdaptRequest, adapt

WORKER = Path(__file__).with_name("torchrun_worker.py")
TENT = ["batch_size=16", "epochs=2"]
CLUP = [
    "ssl.epochs=1",
    "ssl.batch_size=16",
    "finetune.epochs=1",
    "batch_size=16",
    "kmeans_n_init=2",
    "label_batch_size=16",  # 4 labelling batches: sharded over the ranks
]


def torchrun(spec: dict[str, Any], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """Run the worker on ``nproc`` local processes; JSON-able ``spec`` (paths as str)."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), str(WORKER), json.dumps(spec)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _spec(pkg: Path, data: Path, tmp: Path, method: str, overrides: list[str]) -> dict[str, Any]:
    results = tmp / "results"
    results.mkdir(exist_ok=True)
    return {
        "packages": str(pkg),
        "data": str(data),
        "method": method,
        "out": str(tmp / "out"),
        "overrides": overrides,
        "device": "cpu",
        "results": str(results),
    }


def _summaries(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads((tmp / "results" / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_processes_write_one_package(
    source_pkg: Path, target_dir: Path, tmp_path: Path
) -> None:
    run = torchrun(_spec(source_pkg, target_dir, tmp_path, "tent", TENT))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["package", "report.html", "report.json"]
    package = load_package(out / "package")
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["phases"][0]["images"] == 2 * 64  # two epochs of the global batches
    assert not (tmp_path / ".out.work").exists(), "rank 0 removed the run directory"
    ranks = _summaries(tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["package_sha256"] for r in ranks} == {package.sha256}, "rank 1 got rank 0's package"
    assert all(r["report_world_size"] == 2 for r in ranks)


def _weights(out: Path) -> dict[str, Any]:
    return load_safetensors((out / "package" / "model.safetensors").read_bytes())


@pytest.mark.slow
def test_resume_across_world_sizes(source_pkg: Path, target_dir: Path, tmp_path: Path) -> None:
    # 2 processes stop after step 3 (rank 0 asks; rank 1 agrees), 1 process resumes.
    two = tmp_path / "two"
    two.mkdir()
    spec = _spec(source_pkg, target_dir, two, "tent", TENT)
    spec.update(workdir=str(two / "wd"), stop_at=3)
    run = torchrun(spec)
    assert run.returncode != 0 and "--resume" in run.stderr, run.stderr[-3000:]
    assert sorted(p.name for p in (two / "wd" / "checkpoints").iterdir()) == ["ckpt-00000001"]
    done = adapt(
        AdaptRequest(
            source_pkg,
            target_dir,
            method="tent",
            out=two / "out",
            overrides=TENT,
            workdir=two / "wd",
            resume=True,
            device="cpu",
        )
    )
    assert done.report.resumed is True and done.report.world_size == 1

    # 1 process stops after step 3, 2 processes resume.
    one = tmp_path / "one"
    one.mkdir()

    def stop(info: StepInfo) -> None:
        if info.global_step == 3:
            info.request_stop()

    with pytest.raises(RunInterruptedError):
        adapt(
            AdaptRequest(
                source_pkg,
                target_dir,
                method="tent",
                out=one / "out",
                overrides=TENT,
                workdir=one / "wd",
                device="cpu",
                on_step=stop,
            )
        )
    spec = _spec(source_pkg, target_dir, one, "tent", TENT)
    spec.update(workdir=str(one / "wd"), resume=True)
    run = torchrun(spec)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((one / "out" / "report.json").read_text())
    assert report["resumed"] is True and report["world_size"] == 2
    load_package(one / "out" / "package")
    # Both runs kept the interrupted run's first steps and finished the phase. (BatchNorm
    # in train mode sees 16 images per batch on one process, 8 per rank on two, so the
    # losses of the two world sizes differ slightly.)
    for rep in (done.report.to_dict(), report):
        assert [p[0] for p in rep["phases"][0]["loss_curve"]] == list(range(1, 9))
    assert _weights(two / "out").keys() == _weights(one / "out").keys()


@pytest.mark.slow
def test_clup_two_processes_select_the_same_pseudo_labels(
    source_pkg: Path, target_dir: Path, eval_csv: Path, tmp_path: Path
) -> None:
    one = adapt(
        AdaptRequest(
            source_pkg,
            target_dir,
            method="clup",
            out=tmp_path / "one",
            overrides=CLUP,
            device="cpu",
            eval_labels=eval_csv,
        )
    )
    spec = _spec(source_pkg, target_dir, tmp_path, "clup", CLUP)
    spec["eval_labels"] = str(eval_csv)
    run = torchrun(spec)
    assert run.returncode == 0, run.stderr[-3000:]
    load_package(tmp_path / "out" / "package")
    two = json.loads((tmp_path / "out" / "report.json").read_text())
    assert two["world_size"] == 2
    assert two["method_report"] == one.report.method_report
    assert one.report.evaluation is not None
    assert two["evaluation"]["pseudo_labels"] == one.report.evaluation.pseudo_labels
    names = [p["name"] for p in two["phases"]]
    assert names == [p["name"] for p in one.report.phases]
    assert all(p["done"] for p in two["phases"])
