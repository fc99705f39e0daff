"""K-means and cluster purity speed: sourcefree vs scikit-learn and faiss-cpu, in one run.

K-means: every implementation starts from the same k-means++ centroids and runs
the same number of Lloyd iterations (sklearn ``algorithm="lloyd", n_init=1,
tol=0, init=array``; faiss ``niter``, ``init_centroids``; ours ``n_init=1,
tol=0, init=``). The inertia of each result is re-evaluated on all points with
one shared function. Purity: one ``bincount`` vs the per-(cluster, class) Python
loop of CluP's reference code. All libraries are limited to the same number of
threads (default 2). Times are the best of ``--repeats`` runs, methods
interleaved, because a shared machine is noisy.

    .venv/bin/python benchmarks/clustering.py            # N=100k, D=512, K=1000, 10 iterations
    .venv/bin/python benchmarks/clustering.py --quick    # N=20k, D=128, K=200

A full run writes benchmarks/results/clustering.json; both print a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "clustering.json"


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small problem (N=20k, D=128, K=200)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every library")
    ap.add_argument("--iters", type=int, default=10, help="Lloyd iterations for every library")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (best kept)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON output path (default: {RESULTS.name} for a full run, none for --quick)",
    )
    return ap.parse_args()


def _features(n: int, d: int, k: int) -> Any:
    """Synthetic features: 4K Gaussian blobs of random spread, float32 (N, D)."""
    import torch

    g = torch.Generator().manual_seed(0)
    modes = 4 * k
    centres = torch.randn(modes, d, generator=g)
    which = torch.randint(modes, (n,), generator=g)
    spread = 0.5 + torch.rand(modes, 1, generator=g)
    return (centres[which] + spread[which] * torch.randn(n, d, generator=g)).contiguous()


def _runners(x: Any, init: Any, k: int, iters: int, threads: int) -> dict[str, Callable[[], Any]]:
    """Ours, sklearn and faiss from the same k-means++ centroids: each -> (centroids, iters)."""
    import faiss
    import numpy as np
    import torch
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from sourcefree.ops.clustering import KMeansConfig, kmeans

    x_np, init_np = x.numpy(), init.numpy().copy()
    n, d = x.shape

    def run_ours() -> tuple[Any, int]:
        cfg = KMeansConfig(n_init=1, max_iter=iters, tol=0.0, max_points_per_centroid=None)
        res = kmeans(x, k, cfg, init=init.clone())
        return res.centroids, res.n_iter

    def run_sklearn() -> tuple[Any, int]:
        with threadpool_limits(limits=threads):
            km = KMeans(
                n_clusters=k,
                init=init_np,
                n_init=1,
                max_iter=iters,
                tol=0.0,
                algorithm="lloyd",
                random_state=0,
            ).fit(x_np)
        return torch.from_numpy(km.cluster_centers_.astype(np.float32)), int(km.n_iter_)

    def run_faiss() -> tuple[Any, int]:
        km = faiss.Kmeans(
            d, k, niter=iters, seed=1, max_points_per_centroid=n, verbose=False, spherical=False
        )
        km.train(x_np, init_centroids=init_np)
        return torch.from_numpy(np.asarray(km.centroids).copy()), iters

    return {"sourcefree": run_ours, "sklearn": run_sklearn, "faiss": run_faiss}


def _kmeans_rows(
    x: Any, runners: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, dict[str, Any]]:
    """Best time, iterations and re-evaluated inertia of each implementation (interleaved)."""
    import torch

    from sourcefree.kernels import kmeans_assign

    def inertia_of(centroids: torch.Tensor) -> float:
        _, dist = kmeans_assign(x, centroids.contiguous(), chunk_size=16384)
        return float(dist.sum(dtype=torch.float64).item())

    times: dict[str, list[float]] = {name: [] for name in runners}
    final: dict[str, tuple[torch.Tensor, int]] = {}
    for _ in range(repeats):
        for name, fn in runners.items():
            t = time.perf_counter()
            final[name] = fn()
            times[name].append(time.perf_counter() - t)
    rows: dict[str, dict[str, Any]] = {}
    for name in runners:
        centroids, n_iter = final[name]
        best = min(times[name])
        rows[name] = {
            "best_s": best,
            "all_s": times[name],
            "iterations": n_iter,
            "per_iter_s": best / max(n_iter, 1),
            "inertia": inertia_of(centroids),
        }
    return rows


def _purity(n: int, k: int, n_classes: int, loops: int) -> dict[str, Any]:
    """One ``bincount`` (ours) against the reference's per-(cluster, class) loop."""
    import torch

    from sourcefree.ops.clustering import cluster_purity

    pg = torch.Generator().manual_seed(2)
    cl = torch.randint(k, (n,), generator=pg)
    pred = torch.randint(n_classes, (n,), generator=pg)

    def purity_loop() -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.full((k,), -1, dtype=torch.int64)
        scores = torch.zeros(k)
        for j in range(k):
            in_j = cl == j
            size = in_j.sum()
            for c in range(n_classes):
                score = float(((in_j & (pred == c)).sum() / size).item())
                if score > float(scores[j]):
                    labels[j] = c
                    scores[j] = score
        return labels, scores

    fast_s = []
    for _ in range(20):
        t = time.perf_counter()
        pur = cluster_purity(cl, pred, k, n_classes)
        fast_s.append(time.perf_counter() - t)
    loop_s = []
    for _ in range(loops):
        t = time.perf_counter()
        loop_labels, loop_scores = purity_loop()
        loop_s.append(time.perf_counter() - t)
    identical = bool(
        torch.equal(loop_labels, pur.labels) and torch.allclose(loop_scores, pur.purity)
    )
    return {
        "n": n,
        "k": k,
        "classes": n_classes,
        "bincount_s": min(fast_s),
        "loop_s": min(loop_s),
        "speedup": min(loop_s) / min(fast_s),
        "identical": identical,
    }


def _machine() -> dict[str, Any]:
    import faiss
    import sklearn
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "faiss": faiss.__version__,
    }


def _print(result: dict[str, Any]) -> None:
    km, pur = result["kmeans"], result["purity"]
    rows, threads = km["methods"], result["threads"]
    ours = rows["sourcefree"]
    print(
        f"K-means, N={km['n']}, D={km['d']}, K={km['k']}, {km['iterations']} Lloyd iterations "
        f"from one shared k-means++ init, {threads} threads, best of {km['repeats']}"
    )
    print()
    print("| implementation | s / iteration | iterations | inertia | time vs sourcefree |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['per_iter_s']:.3f} | {row['iterations']} | {row['inertia']:.6g} "
            f"| {row['per_iter_s'] / ours['per_iter_s']:.2f}x |"
        )
    print()
    print(f"| purity, N={pur['n']}, K={pur['k']}, C={pur['classes']} | seconds | speedup |")
    print("|---|---|---|")
    print(f"| one bincount | {pur['bincount_s']:.5f} | {pur['speedup']:.0f}x |")
    print(f"| per-(cluster, class) loop | {pur['loop_s']:.3f} | 1x |")
    print()
    for key, ok in result["targets"].items():
        print(f"- {key}: {'met' if ok else 'MISSED'}")


def main() -> int:
    args = _parse()
    threads = str(args.threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = threads  # before numpy, torch and faiss load their runtimes

    import faiss
    import torch

    from sourcefree.ops.clustering import kmeans_plusplus

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.quick:
        n, d, k, repeats = 20_000, 128, 200, args.repeats or 2
    else:
        n, d, k, repeats = 100_000, 512, 1000, args.repeats or 3
    x = _features(n, d, k)
    t0 = time.perf_counter()
    init = kmeans_plusplus(x, k, torch.Generator().manual_seed(1))
    init_s = time.perf_counter() - t0
    rows = _kmeans_rows(x, _runners(x, init, k, args.iters, args.threads), repeats)
    ours, skl, fai = rows["sourcefree"], rows["sklearn"], rows["faiss"]
    speed_vs_sklearn = skl["per_iter_s"] / ours["per_iter_s"]
    slowdown_vs_faiss = ours["per_iter_s"] / fai["per_iter_s"]
    best_other_inertia = min(skl["inertia"], fai["inertia"])
    inertia_rel = (ours["inertia"] - best_other_inertia) / best_other_inertia
    purity = _purity(n, k, 7, 2 if args.quick else 1)
    result: dict[str, Any] = {
        "benchmark": "clustering",
        "quick": bool(args.quick),
        "machine": _machine(),
        "threads": args.threads,
        "kmeans": {
            "n": n,
            "d": d,
            "k": k,
            "iterations": args.iters,
            "repeats": repeats,
            "dtype": "float32",
            "shared_init": "sourcefree k-means++ (greedy), seed 1",
            "init_s": init_s,
            "methods": rows,
            "speed_vs_sklearn": speed_vs_sklearn,
            "slowdown_vs_faiss": slowdown_vs_faiss,
            "inertia_rel_vs_best_baseline": inertia_rel,
        },
        "purity": purity,
        "targets": {
            "not_slower_than_sklearn": speed_vs_sklearn >= 1.0,
            "within_1_5x_of_faiss": slowdown_vs_faiss <= 1.5,
            "inertia_equal_or_better": inertia_rel <= 1e-4,
            "purity_100x_loop": purity["speedup"] >= 100.0 and purity["identical"],
        },
    }
    out: Path | None = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    _print(result)
    if out is not None:
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
