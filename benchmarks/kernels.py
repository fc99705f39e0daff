"""Benchmark the fused ops: eager reference, torch.compile'd reference, Triton kernel (GPU only).

All variants run in one process on identical inputs; ratios are taken within the run.
Variants, through the public dispatchers:

* ``eager``: the PyTorch reference (``SOURCEFREE_DISABLE_TRITON=1``, compile disabled).
* ``compiled``: ``torch.compile`` of the same workload (the reference traced whole).
* ``dispatch``: what the dispatcher does by default (CPU: compiled reference where
  ``dispatch.COMPILE_MIN_NUMEL`` allows, else eager; GPU: the Triton kernels).

On CPU, timings use ``--threads`` threads (default 1; the research notes found
2-thread timings on this shared machine unreliable) and report the median and
best of ``--reps``. On GPU, CUDA events and the fraction of the H100 roofline floor.
GPU rows are left empty when no GPU is present; they are never estimated.

Usage: ``python benchmarks/kernels.py [--quick] [--out benchmarks/results/kernels.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sourcefree.kernels import dispatch, gaussian_mmd, kmeans_assign, margin_ce_im, swav_loss

# H100 SXM figures used for the floors (research/performance.md section 2).
H100_HBM_BPS = 3.35e12
H100_TF32_FLOPS = 495e12

ROOT = Path(__file__).resolve().parents[1]
DOC_START = "<!-- kernels-table:start -->"
DOC_END = "<!-- kernels-table:end -->"


@dataclass
class Case:
    op: str
    shape: str
    note: str
    run: Callable[[], object]
    flops: float = 0.0
    bytes_min: float = 0.0
    baseline: bool = False  # an outside formulation: eager and compiled only


@dataclass
class Row:
    op: str
    shape: str
    device: str
    note: str
    eager_ms: float | None = None
    compiled_ms: float | None = None
    dispatch_ms: float | None = None
    compile_s: float | None = None
    best_ms: dict[str, float] = field(default_factory=dict)
    compiled_speedup: float | None = None
    dispatch_speedup: float | None = None
    floor_ms: float | None = None
    floor_fraction: float | None = None


@contextmanager
def _env(**values: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in ms (CUDA events on GPU)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _cases(device: torch.device, quick: bool) -> list[Case]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    on_gpu = device.type == "cuda"
    cases: list[Case] = []

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    # K-means assignment: N=1M, K=1000, D=512 on GPU; N scaled down on CPU (compute-bound,
    # ~15 s per full pass here), which the note records.
    n = 1_000_000 if on_gpu else (8192 if quick else 65536)
    k, d = 1000, 512
    x, c = randn(n, d), randn(k, d)
    cases.append(
        Case(
            "kmeans_assign",
            f"N={n} K={k} D={d}",
            "" if on_gpu else "N scaled down from 1M on CPU",
            lambda: kmeans_assign(x, c),
            flops=2.0 * n * k * d,
            bytes_min=4.0 * (n * d + k * d + 2 * n),
        )
    )

    # SwAV: 2 high-resolution crops, fwd+bwd of Sinkhorn + swapped CE.
    b = 1024 if quick and not on_gpu else 4096
    kp = 3000
    crops = [torch.nn.functional.normalize(randn(b, 128), dim=1) for _ in range(2)]
    protos = torch.nn.functional.normalize(randn(kp, 128), dim=1)
    scores = [(cr @ protos.t()).requires_grad_() for cr in crops]

    def swav_step() -> object:
        loss = swav_loss(scores)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    # Minimal traffic: per code crop 6 LSE passes over S, CE fwd reads z and S, bwd reads
    # z and S and writes dz: 11 passes of B x K fp32 per (code, prediction) pair, 2 pairs.
    cases.append(
        Case(
            "swav_sinkhorn_ce",
            f"B={b} K={kp} 2 crops",
            "fwd+bwd, eps=0.05, 3 iterations" + (", B scaled down" if b != 4096 else ""),
            swav_step,
            bytes_min=22.0 * 4 * b * kp,
        )
    )

    # The exp-form SwAV Sinkhorn + CE as lightly implements it, for context.
    try:
        from lightly.loss import SwaVLoss
    except ImportError:
        pass
    else:
        lightly_loss = SwaVLoss()

        def lightly_step() -> object:
            loss = lightly_loss(scores, [])
            loss.backward()
            return loss

        cases.append(
            Case(
                "lightly_swav_loss",
                f"B={b} K={kp} 2 crops",
                "baseline: lightly SwaVLoss (exp-form Sinkhorn), fwd+bwd",
                lightly_step,
                bytes_min=22.0 * 4 * b * kp,
                baseline=True,
            )
        )

    # Margin CE + IM (SHOT weights), fwd+bwd.
    for classes in (7, 100, 1000):
        bm = 4096
        logits = randn(bm, classes).requires_grad_()
        target = torch.randint(0, classes, (bm,), generator=gen).to(device)
        margins = torch.rand(classes, generator=gen).to(device) * 0.5

        def margin_step(
            logits: torch.Tensor = logits, target: torch.Tensor = target, m: torch.Tensor = margins
        ) -> object:
            loss = margin_ce_im(logits, target, margins=m, scale=2.0, entropy_eps=1e-5).loss(
                ce_weight=0.3
            )
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        cases.append(
            Case(
                "margin_ce_im",
                f"B={bm} C={classes}",
                "fwd+bwd, LDAM margins, SHOT IM",
                margin_step,
                bytes_min=3.0 * 4 * bm * classes,
            )
        )

    # Multi-kernel MMD, n = m = 1024, d = 512, 5 kernels, per-sample weights, fwd+bwd.
    nm = 256 if quick and not on_gpu else 1024
    src, tgt = randn(nm, 512).requires_grad_(), randn(nm, 512).requires_grad_()
    wts = torch.rand(nm, generator=gen).to(device)

    def mmd_step() -> object:
        val = gaussian_mmd(src, tgt, source_weight=wts)
        val.backward()  # type: ignore[no-untyped-call]
        return val

    pooled = 2 * nm
    cases.append(
        Case(
            "gaussian_mmd",
            f"n=m={nm} d=512 5 kernels",
            "fwd+bwd, weighted" + (", n scaled down" if nm != 1024 else ""),
            mmd_step,
            flops=6.0 * pooled * pooled * 512,
            bytes_min=4.0 * 3 * pooled * 512,
        )
    )
    return cases


def _measure(case: Case, device: torch.device, reps: int) -> Row:
    """Warm every variant up (compiling where needed), then time them round-robin."""
    row = Row(case.op, case.shape, device.type, case.note)
    off = {dispatch.DISABLE_TRITON_ENV: "1", dispatch.DISABLE_COMPILE_ENV: "1"}
    on: dict[str, str | None] = {
        dispatch.DISABLE_TRITON_ENV: None,
        dispatch.DISABLE_COMPILE_ENV: None,
    }
    compiled = torch.compile(case.run)
    variants: dict[str, tuple[dict[str, str | None], Callable[[], object]]] = {
        "eager": (dict(off), case.run),
        "compiled": (dict(off), compiled),
    }
    if not case.baseline:
        dispatch.reset_compiled()
        variants["dispatch"] = (on, case.run)
    for name, (env, fn) in variants.items():
        with _env(**env):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if name == "compiled":
                row.compile_s = time.perf_counter() - t0
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, (env, fn) in variants.items():
            with _env(**env):
                samples[name].append(_once(fn, device))
    med = {name: statistics.median(v) for name, v in samples.items()}
    row.best_ms = {name: min(v) for name, v in samples.items()}
    row.eager_ms, row.compiled_ms = med["eager"], med["compiled"]
    row.compiled_speedup = row.best_ms["eager"] / row.best_ms["compiled"]
    if "dispatch" in med:
        row.dispatch_ms = med["dispatch"]
        row.dispatch_speedup = row.best_ms["eager"] / row.best_ms["dispatch"]
    if device.type == "cuda" and row.dispatch_ms is not None:
        row.floor_ms = 1e3 * max(case.flops / H100_TF32_FLOPS, case.bytes_min / H100_HBM_BPS)
        row.floor_fraction = row.floor_ms / row.best_ms["dispatch"]
    return row


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The results table, CPU rows and (empty unless measured) GPU rows."""
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['threads']} thread(s)), "
        f"torch {meta['torch']}, mode {meta['mode']}, 1-min load average "
        f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}. Median of "
        f"{meta['reps']} round-robin runs in ms; speedups over eager from the best run "
        "of each variant.",
        "",
        "| op | shape | device | eager | compiled | dispatcher | compiled x | dispatcher x "
        "| compile s | floor ms | % of floor | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.shape} | {r.device} | {_fmt(r.eager_ms)} | {_fmt(r.compiled_ms)} "
            f"| {_fmt(r.dispatch_ms)} | {_fmt(r.compiled_speedup)} | {_fmt(r.dispatch_speedup)} "
            f"| {_fmt(r.compile_s, 1)} | {_fmt(r.floor_ms, 3)} "
            f"| {_fmt(None if r.floor_fraction is None else 100 * r.floor_fraction, 0)} "
            f"| {r.note} |"
        )
    if not meta["gpu"]:
        for op in ("kmeans_assign", "swav_sinkhorn_ce", "margin_ce_im", "gaussian_mmd"):
            lines.append(f"| {op} | | cuda (not measured: no GPU) | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def _update_docs(table: str) -> bool:
    doc = ROOT / "docs" / "benchmarks.md"
    if not doc.exists():
        return False
    text = doc.read_text(encoding="utf-8")
    start, end = text.find(DOC_START), text.find(DOC_END)
    if start < 0 or end < start:
        return False
    doc.write_text(text[: start + len(DOC_START)] + "\n" + table + text[end:], encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller CPU sizes, fewer reps")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernels.json")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help=f"replace the table between {DOC_START} and {DOC_END} in docs/benchmarks.md",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "mode": "quick" if args.quick else "full",
        "reps": reps,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_note": None
        if device.type == "cuda"
        else "no GPU available: GPU rows left empty, never estimated",
        "compile_min_numel": dict(dispatch.COMPILE_MIN_NUMEL),
        "floors": "H100: max(FLOPs / 495 TFLOP/s TF32, min bytes / 3.35 TB/s)",
        "loadavg_start": list(os.getloadavg()),
    }
    rows = []
    for case in _cases(device, args.quick):
        t0 = time.perf_counter()
        row = _measure(case, device, reps)
        rows.append(row)
        print(
            f"{row.op:18s} {row.shape:26s} eager {_fmt(row.eager_ms):>9s} ms  compiled "
            f"{_fmt(row.compiled_ms):>9s} ms ({_fmt(row.compiled_speedup)}x)  dispatcher "
            f"{_fmt(row.dispatch_ms):>9s} ms ({_fmt(row.dispatch_speedup)}x)  "
            f"[{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    meta["loadavg_end"] = list(os.getloadavg())
    table = markdown(rows, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "markdown": table}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    print()
    print(table)
    if args.update_docs:
        print("docs/benchmarks.md updated" if _update_docs(table) else "docs markers not found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
