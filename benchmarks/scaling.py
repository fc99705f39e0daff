"""Weak scaling of ``sourcefree adapt -m clup`` under torchrun: 1 vs 2 processes.

Weak scaling keeps the work per process fixed: 1 process adapts N images with a
global batch B; 2 processes adapt 2N images with a global batch 2B (B per rank).
Ideal scaling gives the same training time; efficiency = t(1, N) / t(2, 2N).
A third run, 1 process on the 2N images with batch 2B, is the same job as the
2-process run: its accuracy is the reference for the 2-process accuracy, and its
time gives the 2-process speed-up on a fixed job (strong scaling).

Every run is a real ``torchrun --standalone --nproc-per-node P -m sourcefree adapt``
(OMP_NUM_THREADS=1 per process, as torchrun sets it), on a ``studio``-trained
smallcnn source package and ``wild-mild`` target faces (32 px), with
``--eval-labels`` for the accuracy. Times come from report.json: ``train`` is
the trainer's wall time (all phases and their whole-set hooks), ``total`` adds
reading, export and evaluation. CPU rows use gloo. A GPU row is written only
when CUDA is present (NCCL); it is never estimated.

    python benchmarks/scaling.py [--images 1000] [--ssl-epochs 2] [--finetune-epochs 10]

Writes ``benchmarks/results/scaling.json`` and the table in ``docs/scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scaling.json"
DOCS = ROOT / "docs" / "scaling.md"
START = "<!-- scaling:start -->"
END = "<!-- scaling:end -->"
SIZE = 32
N_SOURCE = 5000  # as sourcefree demo


def source_package(workdir: Path, seed: int) -> Path:
    """A smallcnn trained on synthetic ``studio`` faces, exported once into ``workdir``."""
    from sourcefree.data.synthetic import CLASSES, generate
    from sourcefree.export import source_package as export
    from sourcefree.package.manifest import InputSpec
    from sourcefree.vendor.training import TrainConfig, train_classifier

    out = workdir / "source"
    if (out / "manifest.json").exists():
        return out
    spec = InputSpec(size=(SIZE, SIZE))
    train = generate("studio", N_SOURCE, SIZE, seed=seed)
    model = train_classifier(train.images, train.labels, len(CLASSES), spec, TrainConfig(seed=seed))
    export(model.eval(), architecture="smallcnn", labels=list(CLASSES), input_spec=spec, out=out)
    return out


def target(workdir: Path, n: int, seed: int) -> Path:
    """``n`` wild-mild faces (labels.csv beside the images, ignored by adapt)."""
    from sourcefree.data.synthetic import write_domain

    out = workdir / f"wild-{n}"
    if not out.exists():
        write_domain(out, "wild-mild", n, SIZE, seed=seed)
    return out


def overrides(batch_scale: int, ssl_epochs: int, finetune_epochs: int) -> list[str]:
    """CluP settings with every batch (and the SwAV queue) scaled by ``batch_scale``."""
    return [
        f"ssl.epochs={ssl_epochs}",
        f"finetune.epochs={finetune_epochs}",
        f"ssl.batch_size={64 * batch_scale}",
        f"ssl.queue_length={512 * batch_scale}",
        f"batch_size={32 * batch_scale}",
        f"label_batch_size={128 * batch_scale}",
        "kmeans_n_init=3",
    ]


def run(
    pkg: Path, data: Path, out: Path, nproc: int, sets: list[str], device: str
) -> dict[str, Any]:
    """One ``torchrun ... sourcefree adapt`` run; its timings and accuracy."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "sourcefree", "adapt", str(pkg), str(data)]
    cmd += ["-m", "clup", "-o", str(out), "--device", device, "--no-progress", "--overwrite"]
    cmd += ["--eval-labels", str(data / "labels.csv")]
    for s in sets:
        cmd += ["--set", s]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    evaluation = report["evaluation"]
    # The trained model's accuracy, also when a do-no-harm gate kept the source model.
    gate = report.get("gate") or {}
    trained = (gate.get("accuracy") or {}).get("adapted", evaluation["adapted"]["accuracy"])
    return {
        "device": device,
        "processes": nproc,
        "images": report["target"]["images"],
        "overrides": sets,
        "world_size": report["world_size"],
        "train_s": report["timings_s"]["train"],
        "total_s": report["timings_s"]["total"],
        "wall_s": round(wall, 1),
        "phase_s": {p["name"]: p["seconds"] for p in report["phases"]},
        "accuracy": round(trained, 4),
        "exported_accuracy": round(evaluation["adapted"]["accuracy"], 4),
        "source_accuracy": round(evaluation["source"][0]["accuracy"], 4),
        "pseudo_label_precision": evaluation["pseudo_labels"]["precision"],
        "selected": evaluation["pseudo_labels"]["selected"],
    }


def measure(
    workdir: Path, images: int, ssl_epochs: int, finetune_epochs: int, device: str, seed: int
) -> list[dict[str, Any]]:
    """The three runs: (1 proc, N, B), (2 procs, 2N, 2B), (1 proc, 2N, 2B)."""
    pkg = source_package(workdir, seed)
    small, large = target(workdir, images, seed + 1), target(workdir, 2 * images, seed + 2)
    plan = [
        ("weak-1", 1, small, 1),
        ("weak-2", 2, large, 2),
        ("same-job-1", 1, large, 2),
    ]
    if device == "cuda" and torch.cuda.device_count() < 2:
        plan = [p for p in plan if p[1] == 1]  # one process per GPU
    rows = []
    for name, nproc, data, scale in plan:
        sets = overrides(scale, ssl_epochs, finetune_epochs)
        row = run(pkg, data, workdir / f"out-{device}-{name}", nproc, sets, device)
        row["run"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _row(r: dict[str, Any]) -> str:
    ft = r["phase_s"].get("fine-tune", 0.0)
    ssl = sum(v for k, v in r["phase_s"].items() if k.startswith("warm-up"))
    return (
        f"| {r['device']} | {r['processes']} | {r['images']} | {r['train_s']:.1f} "
        f"| {ssl:.1f} | {ft:.1f} | {r['total_s']:.1f} | {r['accuracy']:.4f} |"
    )


def markdown(payload: dict[str, Any]) -> str:
    """The scaling table and the derived ratios."""
    lines = [
        f"Measured {payload['date']} on {payload['machine']} ({payload['cpus']} CPU cores, "
        f"shared; load average {payload['load_before']} before the runs), torch "
        f"{payload['torch']}, `{payload['argv']}`. Times in seconds from report.json.",
        "",
        "| device | processes | images | train | SSL warm-up steps | fine-tune steps "
        "| total | adapted accuracy (trained model) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["device"], r["run"]): r for r in payload["rows"]}
    for r in payload["rows"]:
        lines.append(_row(r))
    if not any(r["device"] == "cuda" for r in payload["rows"]):
        lines.append("| cuda | 1 | | | | | | no GPU was available |")
        lines.append("| cuda | 2 | | | | | | no GPU was available |")
    lines.append("")
    for dev in ("cpu", "cuda"):
        w1, w2, s1 = by.get((dev, "weak-1")), by.get((dev, "weak-2")), by.get((dev, "same-job-1"))
        if w1 is None or w2 is None or s1 is None:
            continue
        lines.append(
            f"- {dev}: weak-scaling efficiency t(1 proc, {w1['images']}) / "
            f"t(2 procs, {w2['images']}) = {w1['train_s'] / w2['train_s']:.2f} (train time; "
            f"1.00 is ideal). Same job ({w2['images']} images, same global batch) on 1 vs 2 "
            f"processes: speed-up {s1['train_s'] / w2['train_s']:.2f}x, adapted accuracy "
            f"{s1['accuracy']:.4f} vs {w2['accuracy']:.4f} "
            f"(difference {abs(s1['accuracy'] - w2['accuracy']):.4f})."
        )
    return "\n".join(lines)


def write_docs(block: str) -> None:
    text = DOCS.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="N (per process)")
    parser.add_argument("--ssl-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="reuse data between runs")
    parser.add_argument("--no-docs", action="store_true", help="do not edit docs/scaling.md")
    args = parser.parse_args(argv)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = measure(workdir, args.images, args.ssl_epochs, args.finetune_epochs, "cpu", 0)
        if torch.cuda.is_available():
            rows += measure(workdir, args.images, args.ssl_epochs, args.finetune_epochs, "cuda", 0)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": load,
        "torch": torch.__version__,
        "argv": " ".join(["python benchmarks/scaling.py", *(argv or sys.argv[1:])]),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(payload)
    print(table)
    if not args.no_docs:
        write_docs(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
