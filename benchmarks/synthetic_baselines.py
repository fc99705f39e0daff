"""Source-only baselines on the synthetic FER domains.

Trains the registry's ``smallcnn`` on ``studio`` (5000 images, 32 px),
re-estimates the BatchNorm statistics on source data after training
(precise-BN, ``drop_last``; momentum reset to 0.1 afterwards), then reports
source-only accuracy and mean class recall on every preset, over 3 seeds,
and AdaBN accuracy (the BatchNorm statistics re-estimated on the 2000 target
images, a copy of the model, no labels): a cheap reference point for adaptation.

Writes ``benchmarks/results/synthetic_baselines.json`` and the table in the
"Synthetic baselines" section of ``docs/benchmarks.md``; ``--grid`` also
renders ``docs/synthetic_presets.png``. Runs in a few minutes on 2 CPU cores.

    python benchmarks/synthetic_baselines.py [--seeds 0 1 2] [--grid]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from sourcefree.data.synthetic import CLASSES, PRESETS, generate
from sourcefree.fsutil import replace_marked_block
from sourcefree.package.manifest import InputSpec
from sourcefree.vendor.training import (
    TrainConfig,
    recalibrate_batchnorm,
    to_tensor,
    train_classifier,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "synthetic_baselines.json"
DOCS = ROOT / "docs" / "benchmarks.md"
GRID = ROOT / "docs" / "synthetic_presets.png"
START = "<!-- synthetic-baselines:start -->"
END = "<!-- synthetic-baselines:end -->"

SIZE = 32
N_SOURCE = 5000
N_VAL = 2000
N_TARGET = 2000
EPOCHS = 6
BATCH = 64
LR = 2e-3


SPEC = InputSpec(size=(SIZE, SIZE))


def train_source(seed: int) -> tuple[nn.Module, float]:
    """Train smallcnn on studio with the SDK's vendor recipe (precise BN included)."""
    data = generate("studio", N_SOURCE, SIZE, seed=1000 + seed)
    start = time.perf_counter()
    cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=seed)
    model = train_classifier(data.images, data.labels, len(CLASSES), SPEC, cfg)
    return model, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and mean class recall (classes present in the labels)."""
    model.eval()
    preds = []
    x = to_tensor(images, SPEC)
    for i in range(0, len(x), 500):
        logits, _ = model(x[i : i + 500])
        preds.append(logits.argmax(1).numpy())
    pred = np.concatenate(preds)
    recalls = [float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)]
    return {
        "accuracy": float(np.mean(pred == labels)),
        "mean_class_recall": float(np.mean(recalls)),
    }


def adabn_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy after re-estimating BN statistics on the target images (a copy of the model)."""
    adapted = copy.deepcopy(model)
    with torch.no_grad():
        recalibrate_batchnorm(adapted, to_tensor(images, SPEC))
    return evaluate(adapted, images, labels)["accuracy"]


_SPEED_CODE = """
import json, os, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from sourcefree.data.synthetic import PRESETS, generate
generate("studio", 256, 32, seed=0)  # warm-up
out = {}
for name in PRESETS:
    best = 0.0
    for rep in range(3):
        start = time.perf_counter()
        generate(name, 1024, 32, seed=rep)
        best = max(best, 1024 / (time.perf_counter() - start))
    out[name] = round(best)
print(json.dumps(out))
"""


def measure_speed() -> dict[str, int]:
    """Images per second of ``generate`` at 32 px on one pinned core, single-threaded BLAS."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _SPEED_CODE], env=env, capture_output=True, text=True, check=True
    )
    speeds: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return speeds


def run(seeds: list[int]) -> dict[str, Any]:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        model, seconds = train_source(seed)
        val = generate("studio", N_VAL, SIZE, seed=2000 + seed)
        row: dict[str, Any] = {
            "seed": seed,
            "train_seconds": round(seconds, 1),
            "source_val": evaluate(model, val.images, val.labels),
            "targets": {},
        }
        for name in PRESETS:
            data = generate(name, N_TARGET, SIZE, seed=3000 + seed)
            row["targets"][name] = evaluate(model, data.images, data.labels)
            row["targets"][name]["adabn_accuracy"] = adabn_accuracy(model, data.images, data.labels)
        print(
            f"seed {seed}: trained in {seconds:.0f} s, source val "
            f"{row['source_val']['accuracy']:.3f}; "
            + ", ".join(
                f"{k} {v['accuracy']:.3f}/{v['adabn_accuracy']:.3f}"
                for k, v in row["targets"].items()
            ),
            flush=True,
        )
        per_seed.append(row)

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}

    summary: dict[str, Any] = {
        "source_val_accuracy": stats([r["source_val"]["accuracy"] for r in per_seed]),
        "targets": {
            name: {
                metric: stats([r["targets"][name][metric] for r in per_seed])
                for metric in ("accuracy", "mean_class_recall")
            }
            for name in PRESETS
        },
    }
    for name in PRESETS:
        summary["targets"][name]["adabn_accuracy"] = stats(
            [r["targets"][name]["adabn_accuracy"] for r in per_seed]
        )
    return {
        "benchmark": "synthetic_baselines",
        "config": {
            "architecture": "smallcnn",
            "size": SIZE,
            "n_source": N_SOURCE,
            "n_val": N_VAL,
            "n_target": N_TARGET,
            "epochs": EPOCHS,
            "batch": BATCH,
            "lr": LR,
            "precise_bn": "re-estimated on source, drop_last, momentum reset to 0.1",
            "adabn": "BN statistics re-estimated on the target images (copy of the model)",
            "seeds": seeds,
            "torch_threads": torch.get_num_threads(),
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "summary": summary,
        "per_seed": per_seed,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    cfg = result["config"]
    seconds = [r["train_seconds"] for r in result["per_seed"]]
    lines = [
        f"Source model: `smallcnn` trained on `studio` ({cfg['n_source']} images, "
        f"{cfg['size']} px, {cfg['epochs']} epochs, precise-BN), "
        f"{len(cfg['seeds'])} seeds (mean ± std), {cfg['n_target']} target images per "
        f"preset and seed. Training took {min(seconds):.0f}-{max(seconds):.0f} s per seed on "
        f"{cfg['torch_threads']} CPU threads (the fastest on an idle machine, the others while "
        "sharing it). Source validation accuracy: "
        f"**{s['source_val_accuracy']['mean']:.3f}** ± {s['source_val_accuracy']['std']:.3f}.",
        "",
        "| target preset | source-only accuracy | mean class recall | AdaBN accuracy |",
        "|---|---|---|---|",
    ]
    for name, m in s["targets"].items():
        acc, mcr = m["accuracy"], m["mean_class_recall"]
        ada = m.get("adabn_accuracy")
        ada_cell = f"{ada['mean']:.3f} ± {ada['std']:.3f}" if ada else "-"
        lines.append(
            f"| `{name}` | {acc['mean']:.3f} ± {acc['std']:.3f} | "
            f"{mcr['mean']:.3f} ± {mcr['std']:.3f} | {ada_cell} |"
        )
    speed = result.get("generator_images_per_second")
    if speed:
        lines += [
            "",
            f"Generator speed at 32 px on one core (best of 3 x 1024 images): "
            f"{min(speed.values())} to {max(speed.values())} images/s across presets "
            "(target: 300).",
        ]
    lines += [
        "",
        "Reproduce: `python benchmarks/synthetic_baselines.py` "
        "(JSON in `benchmarks/results/synthetic_baselines.json`).",
    ]
    return "\n".join(lines)


def update_docs(table: str) -> None:
    """Replace this benchmark's block in docs/benchmarks.md, leaving other sections alone."""
    replace_marked_block(DOCS, START, END, table, "Synthetic baselines")


def render_grid(path: Path, size: int = 64, zoom: int = 2, seed: int = 7) -> None:
    """One row per preset, one column per class, labelled; written as a PNG."""
    cell = size * zoom
    left, top = 150, 22
    canvas = Image.new("RGB", (left + cell * len(CLASSES), top + cell * len(PRESETS)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(CLASSES):
        draw.text((left + j * cell + 6, 5), name, fill="black")
    for i, preset in enumerate(PRESETS):
        data = generate(preset, 300, size, seed=seed)
        draw.text((6, top + i * cell + cell // 2 - 6), preset, fill="black")
        for j in range(len(CLASSES)):
            hits = np.flatnonzero(data.labels == j)
            if hits.size == 0:
                continue
            img = Image.fromarray(data.images[hits[0]]).resize(
                (cell, cell), Image.Resampling.NEAREST
            )
            canvas.paste(img, (left + j * cell, top + i * cell))
    canvas.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--grid", action="store_true", help="also render docs/synthetic_presets.png"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only re-measure generator speed into the existing JSON and table",
    )
    args = parser.parse_args()
    if args.grid:
        render_grid(GRID)
        print(f"wrote {GRID.relative_to(ROOT)}")
    result = json.loads(RESULTS.read_text(encoding="utf-8")) if args.speed_only else run(args.seeds)
    result["generator_images_per_second"] = measure_speed()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    if not args.no_docs:
        update_docs(table)
    print(table)


if __name__ == "__main__":
    main()
