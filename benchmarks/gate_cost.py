"""Cost of the do-no-harm gate next to the adaptation it judges (issue 24).

For each target size N: ``wild-mild`` faces are synthesised at ``--size`` px and
``sourcefree adapt -m adabn`` (the cheapest method) runs on them in this
process; report.json's ``timings_s`` give ``train`` (the method) and ``export``
(everything after training: scoring the source and the adapted model for the
gate, then the ONNX export and its parity check). The vendor's package is
built once: a smallcnn with random weights, BatchNorm statistics of ``studio``
faces and an ATC calibration on 500 labelled ``studio`` faces, so the gate takes
its calibrated path. Its accuracy does not matter here, only the cost.

    python benchmarks/gate_cost.py --n 8000 32000 [--size 64] [--gate-sample all]
    python benchmarks/gate_cost.py --quick          (a few hundred 32 px images)

Writes ``benchmarks/results/gate_cost.json`` (``gate_cost-quick.json`` with
``--quick``) and the table in docs/benchmarks.md (not with ``--quick`` or
``--no-docs``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sourcefree.data.synthetic import CLASSES, generate, write_domain
from sourcefree.engine.models import build_classifier
from sourcefree.export import source_package
from sourcefree.fsutil import replace_marked_block
from sourcefree.package.manifest import InputSpec
from sourcefree.pipeline.adaptation import AdaptRequest, adapt
from sourcefree.pipeline.selection import calibrate
from sourcefree.vendor.training import to_tensor

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
START = "<!-- gate-cost:start -->"
END = "<!-- gate-cost:end -->"


def vendor(out: Path, size: int, seed: int = 0) -> Path:
    """A calibrated smallcnn package (random weights, studio BatchNorm statistics)."""
    if (out / "manifest.json").exists():
        return out
    spec = InputSpec(size=(size, size))
    studio = generate("studio", 500, size, seed=seed)
    x = to_tensor(studio.images, spec)
    torch.manual_seed(seed)
    model = build_classifier("smallcnn", len(CLASSES))
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    cal = calibrate(model, x, studio.labels)
    source_package(
        model,
        architecture="smallcnn",
        labels=list(CLASSES),
        input_spec=spec,
        out=out,
        source_stats={"class_counts": [1] * len(CLASSES), "calibration": cal.to_dict()},
    )
    return out


def measure(
    work: Path, n: int, size: int, method: str, gate_sample: str | None, seed: int
) -> dict[str, Any]:
    """One ``adapt`` run on N synthesised images; its timings and the gate's sample."""
    data = work / f"wild-{n}-{size}"
    if not data.exists():
        write_domain(data, "wild-mild", n, size, seed=1000 + seed)
    pkg = vendor(work / f"vendor-{size}", size, seed)
    result = adapt(
        AdaptRequest(
            pkg,
            data,
            method=method,
            out=work / f"out-{n}-{size}",
            device="cpu",
            seed=seed,
            overwrite=True,
            gate_sample=gate_sample,
        )
    )
    report = result.report.to_dict()
    t, gate = report["timings_s"], report["gate"]
    return {
        "images": n,
        "size": size,
        "method": method,
        "gate_sample": gate_sample or "default",
        "sample_size": gate.get("sample_size"),
        "decision": gate["decision"],
        "train_s": t["train"],
        "after_training_s": t["export"],
        "ratio": round(t["export"] / t["train"], 2) if t["train"] > 0 else None,
        "total_s": t["total"],
    }


def markdown(payload: dict[str, Any]) -> str:
    """The docs table: training vs the stage after it (gate + export), per N."""
    lines = [
        f"Measured {payload['date']} on {payload['machine']} ({payload['cpus']} CPU cores, "
        f"shared; load average {payload['load_before']} before the runs), torch "
        f"{payload['torch']}: `{payload['argv']}`. `after training` is report.json's "
        "`timings_s.export`: the gate's scoring of the source and the adapted model, "
        "then the export.",
        "",
        "| images | px | method | gate sample | scored | train s | after training s "
        "| after / train | total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['images']} | {r['size']} | {r['method']} | {r['gate_sample']} "
            f"| {r['sample_size']} | {r['train_s']:.1f} | {r['after_training_s']:.1f} "
            f"| {r['ratio']} | {r['total_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, nargs="+", default=[8000, 32000], help="target sizes")
    p.add_argument("--size", type=int, default=64, help="image side in px")
    p.add_argument("--method", default="adabn")
    p.add_argument("--gate-sample", default=None, help="adapt --gate-sample (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep data and vendor here")
    p.add_argument("--quick", action="store_true", help="300 images at 32 px, no docs")
    p.add_argument("--results", type=Path, default=None, help="JSON output path")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file of the table")
    p.add_argument("--no-docs", action="store_true", help="do not edit the docs")
    args = p.parse_args(argv)
    sizes, size = ([300], 32) if args.quick else (args.n, args.size)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [measure(work, n, size, args.method, args.gate_sample, args.seed) for n in sizes]
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": load,
        "torch": torch.__version__,
        "argv": " ".join(["python benchmarks/gate_cost.py", *(argv or sys.argv[1:])]),
        "rows": rows,
    }
    name = "gate_cost-quick.json" if args.quick else "gate_cost.json"
    out = args.results or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(payload)
    print(table)
    if not (args.quick or args.no_docs):
        replace_marked_block(args.docs, START, END, table, "Cost of the do-no-harm gate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
