"""Runtime speed: the same model in torch eager and through the sourcefree runtime (CPU).

Both run in this process with the same thread count, on the same inputs; the
ratio is torch time / runtime time (> 1 means the runtime is faster). Then the
deployment variants of ``sourcefree optimize`` (fp16, int8) against the fp32
package in the same run: images/s at batch 64 through the runtime, the speed-up
over fp32 and the top-1 agreement with fp32 on the calibration images
(synthetic ``wild-mild`` faces; with ``--package`` and ``--calibration``, a
package and images of your own, e.g. the demo's adapted package and its
customer photos). Writes benchmarks/results/runtime.json and runtime.md (``--name`` another stem).

Run: python benchmarks/runtime.py [--threads 2] [--repeats 20] [--models smallcnn]
     python benchmarks/runtime.py --package demo-out/adapted/package \
         --calibration demo-out/customer-photos
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

from sourcefree.data.synthetic import write_domain
from sourcefree.engine.models import build_classifier
from sourcefree.export import source_package
from sourcefree.export.optimize import calibration_inputs, optimize_package
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import DEFAULT_MAX_CALIBRATION_IMAGES, InputSpec
from sourcefree.runtime.predictor import Predictor

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = (("smallcnn", 32), ("resnet18", 64))
BATCHES = (1, 64)
#: Batch of the variant rows, and the synthetic calibration images per model.
VARIANT_BATCH = 64
CALIBRATION_IMAGES = 256


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


def variant_rows(
    package: Path, calibration: Path, work: Path, threads: int, repeats: int, label: str
) -> list[dict[str, Any]]:
    """fp32, fp16 and int8 of ``package`` at batch 64: images/s, speed-up, top-1 agreement.

    The variants are written with ``min_agreement=0`` so every row is measured;
    ``sourcefree optimize`` itself refuses one below 0.99.
    """
    pkg = load_package(package)
    x = calibration_inputs(calibration, pkg, DEFAULT_MAX_CALIBRATION_IMAGES, 0.05)
    batch = np.resize(x, (VARIANT_BATCH, *x.shape[1:]))  # the images, repeated to 64
    paths = {"fp32": (package, 1.0)}
    for precision in ("fp16", "int8"):
        done = optimize_package(
            pkg, calibration, work / precision, precision=precision, min_agreement=0.0
        )
        paths[precision] = (done.package.path, done.top1_agreement)
    rows: list[dict[str, Any]] = []
    for precision, (path, agreement) in paths.items():
        predictor = Predictor(path, device="cpu", threads=threads, batch_size=VARIANT_BATCH)

        def runtime(predictor: Predictor = predictor) -> object:
            return predictor.predict_array(batch)

        seconds = _time(runtime, repeats)
        rows.append(
            {
                "model": label,
                "precision": precision,
                "batch": VARIANT_BATCH,
                "runtime_ms": round(seconds * 1e3, 3),
                "runtime_images_per_s": round(VARIANT_BATCH / seconds, 1),
                "top1_agreement_with_fp32": round(agreement, 4),
                "calibration_images": len(x),
            }
        )
        print(rows[-1])
    fp32 = rows[0]["runtime_images_per_s"]
    for row in rows:
        row["speedup_vs_fp32"] = round(row["runtime_images_per_s"] / fp32, 2)
    return rows


def _uncapped_session(graph: bytes, threads: int) -> Any:
    """The package's graph on onnxruntime's default arena (no memory cap): the baseline
    of the capped arena every runtime session uses."""
    from sourcefree.runtime.predictor import import_onnxruntime

    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def run(
    threads: int,
    repeats: int,
    models: tuple[tuple[str, int], ...] = MODELS,
    package: Path | None = None,
    calibration: Path | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    rows = []
    variants: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if package is not None and calibration is not None:
            work = Path(tmp) / "own"
            work.mkdir()
            name = load_package(package).manifest.name
            variants += variant_rows(package, calibration, work, threads, repeats, name)
        for arch, size in models:
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
            uncapped = Predictor(out, device="cpu", threads=threads, batch_size=max(BATCHES))
            uncapped.session = _uncapped_session(uncapped.package.onnx_bytes, threads)
            for batch in BATCHES:
                x = np.random.default_rng(0).normal(size=(batch, 3, size, size))
                x = x.astype(np.float32)
                xt = torch.from_numpy(x)

                def eager(xt: torch.Tensor = xt, model: torch.nn.Module = model) -> object:
                    with torch.inference_mode():
                        return model(xt)

                def runtime(x: np.ndarray = x, predictor: Predictor = predictor) -> object:
                    return predictor.predict_array(x)

                def own_arena(x: np.ndarray = x, predictor: Predictor = uncapped) -> object:
                    return predictor.predict_array(x)

                t_torch = _time(eager, repeats)
                t_rt = _time(runtime, repeats)
                t_own = _time(own_arena, repeats)
                rows.append(
                    {
                        "model": f"{arch} {size}px",
                        "batch": batch,
                        "torch_eager_ms": round(t_torch * 1e3, 3),
                        "runtime_ms": round(t_rt * 1e3, 3),
                        "runtime_images_per_s": round(batch / t_rt, 1),
                        "ratio_torch_over_runtime": round(t_torch / t_rt, 2),
                        "uncapped_arena_ms": round(t_own * 1e3, 3),
                        "ratio_capped_over_uncapped": round(t_rt / t_own, 3),
                    }
                )
                print(rows[-1])
            site = write_domain(Path(tmp) / f"site-{arch}", "wild-mild", CALIBRATION_IMAGES, size)
            work = Path(tmp) / f"variants-{arch}"
            work.mkdir()
            variants += variant_rows(out, site, work, threads, repeats, f"{arch} {size}px")
    return {
        "benchmark": "runtime",
        "device": "cpu",
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "note": (
            "ratio = torch eager time / sourcefree runtime time; > 1 means the runtime wins; "
            "ratio_capped_over_uncapped = runtime time / the same graph on onnxruntime's default "
            "arena without the memory cap (1: the cap costs nothing)"
        ),
        "rows": rows,
        "variants_note": (
            "sourcefree optimize variants through the runtime at batch 64; speedup = images/s "
            "over the fp32 package's in the same run; agreement = share of the calibration "
            "images whose top-1 class equals fp32's (the built-in models are untrained: "
            "their agreement says little, a trained package's does)"
        ),
        "variants": variants,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CPU, {result['threads']} threads, torch {result['torch']}; "
        "ratio = torch eager / runtime (> 1: runtime faster).",
        "",
        "Memory cap: each runtime session takes its CPU tensors from its own arena capped "
        "at half of the RAM; uncapped = the same graph on onnxruntime's default arena, "
        "cap cost = runtime / uncapped (1: no cost).",
        "",
        "| model | batch | torch eager (ms) | runtime (ms) | runtime img/s | ratio "
        "| uncapped (ms) | cap cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['torch_eager_ms']} | {r['runtime_ms']} | "
            f"{r['runtime_images_per_s']} | {r['ratio_torch_over_runtime']} | "
            f"{r.get('uncapped_arena_ms', '-')} | {r.get('ratio_capped_over_uncapped', '-')} |"
        )
    if result.get("variants"):
        lines += [
            "",
            "Deployment variants (`sourcefree optimize`), batch "
            f"{VARIANT_BATCH}, same run; agreement: top-1 equal to fp32 on the calibration "
            "images (untrained built-in models: not indicative).",
            "",
            "| model | precision | runtime (ms) | img/s | speed-up vs fp32 | top-1 agreement |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for v in result["variants"]:
            lines.append(
                f"| {v['model']} | {v['precision']} | {v['runtime_ms']} | "
                f"{v['runtime_images_per_s']} | {v['speedup_vs_fp32']} | "
                f"{v['top1_agreement_with_fp32']:.2%} ({v['calibration_images']} images) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--models",
        nargs="*",
        default=[arch for arch, _ in MODELS],
        choices=[arch for arch, _ in MODELS],
        help="built-in models to run (none: only --package)",
    )
    parser.add_argument("--package", type=Path, help="also measure the variants of this package")
    parser.add_argument("--calibration", type=Path, help="its calibration images (a folder)")
    parser.add_argument(
        "--name", default="runtime", help="results file stem (default: runtime.json, .md)"
    )
    args = parser.parse_args()
    if (args.package is None) != (args.calibration is None):
        parser.error("--package and --calibration go together")
    models = tuple(m for m in MODELS if m[0] in args.models)
    result = run(args.threads, args.repeats, models, args.package, args.calibration)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
