"""Runtime speed: the same model in torch eager and through the sourcefree runtime (CPU).

Both run in this process with the same thread count, on the same inputs; the
ratio is torch time / runtime time (> 1 means the runtime is faster). Writes
benchmarks/results/runtime.json and benchmarks/results/runtime.md.

Run: python benchmarks/runtime.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sourcefree.engine.models import build_classifier
from sourcefree.export import source_package
from sourcefree.package.manifest import InputSpec
from sourcefree.runtime.predictor import Predictor

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = (("smallcnn", 32), ("resnet18", 64))
BATCHES = (1, 64)


def _time(fn: Callable[[], object], repeats: int, min_seconds: float = 0.3) -> float:
    """Median seconds per call after warm-up; each sample runs at least ``min_seconds``."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / repeats or calls >= 50:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)


def run(threads: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, size in MODELS:
            torch.manual_seed(0)
            model = build_classifier(arch, 7).eval()
            out = Path(tmp) / arch
            source_package(
                model,
                architecture=arch,
                labels=[f"c{i}" for i in range(7)],
                input_spec=InputSpec(size=(size, size)),
                out=out,
            )
            predictor = Predictor(out, device="cpu", threads=threads, batch_size=max(BATCHES))
            for batch in BATCHES:
                x = np.random.default_rng(0).normal(size=(batch, 3, size, size))
                x = x.astype(np.float32)
                xt = torch.from_numpy(x)

                def eager(xt: torch.Tensor = xt, model: torch.nn.Module = model) -> object:
                    with torch.inference_mode():
                        return model(xt)

                def runtime(x: np.ndarray = x, predictor: Predictor = predictor) -> object:
                    return predictor.predict_array(x)

                t_torch = _time(eager, repeats)
                t_rt = _time(runtime, repeats)
                rows.append(
                    {
                        "model": f"{arch} {size}px",
                        "batch": batch,
                        "torch_eager_ms": round(t_torch * 1e3, 3),
                        "runtime_ms": round(t_rt * 1e3, 3),
                        "runtime_images_per_s": round(batch / t_rt, 1),
                        "ratio_torch_over_runtime": round(t_torch / t_rt, 2),
                    }
                )
                print(rows[-1])
    return {
        "benchmark": "runtime",
        "device": "cpu",
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "note": "ratio = torch eager time / sourcefree runtime time; > 1 means the runtime wins",
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CPU, {result['threads']} threads, torch {result['torch']}; "
        "ratio = torch eager / runtime (> 1: runtime faster).",
        "",
        "| model | batch | torch eager (ms) | runtime (ms) | runtime img/s | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['torch_eager_ms']} | {r['runtime_ms']} | "
            f"{r['runtime_images_per_s']} | {r['ratio_torch_over_runtime']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    result = run(args.threads, args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "runtime.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
