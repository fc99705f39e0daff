"""Benchmark the fused ops: eager reference, torch.compile'd reference, Triton kernel (GPU only).

All variants run in one process on identical inputs; ratios are taken within the run.
Variants, through the public dispatchers:

* ``eager``: the PyTorch reference (``SOURCEFREE_DISABLE_TRITON=1``, compile disabled).
* ``compiled``: ``torch.compile`` of the same workload (the reference traced whole).
* ``dispatch``: what the dispatcher does by default (CPU: compiled reference where
  ``dispatch.COMPILE_MIN_NUMEL`` allows, else eager; GPU: the Triton kernels).

On CPU, timings use ``--threads`` threads (default 1; the research notes found
2-thread timings on this shared machine unreliable) and report the median and
best of ``--reps``. On GPU, CUDA events. The roofline floor of each case is
``max(FLOPs / matmul rate, bytes / copy bandwidth)`` with both ceilings measured
in the same run (:func:`measure_ceilings`: a device-to-device copy, counting bytes
read and written, and an fp32 matmul, TF32 on CUDA, where ``--matmul-precision
high`` also lets the kernels' fp32 dots use TF32). GPU rows are left empty when no
GPU is present; they are never estimated.

Usage: ``python benchmarks/kernels.py [--quick | --tiny] [--no-compile] [--out FILE]``
(``--tiny``: toy shapes for the GPU check's dry run, ``benchmarks/gpu_check.py``).
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


def measure_ceilings(device: torch.device, tiny: bool = False) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per s) and fp32 / bf16 matmul rates (FLOP/s).

    Random data (never zeros), warmed up, median of several timed runs; the fp32
    rate uses TF32 on CUDA when ``torch.get_float32_matmul_precision()`` allows it.
    """
    gpu = device.type == "cuda"
    n = (1 << 16) if tiny else (1 << 28 if gpu else 1 << 24)
    m = 64 if tiny else (8192 if gpu else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.rand(n, device=device, generator=gen)
    dst = torch.empty_like(src)
    a = torch.randn(m, m, device=device, generator=gen)
    b = torch.randn(m, m, device=device, generator=gen)
    ah, bh = a.bfloat16(), b.bfloat16()

    def best(fn: Callable[[], object]) -> float:
        for _ in range(2):
            fn()
        _sync(device)
        return statistics.median(_once(fn, device) for _ in range(3 if tiny else 7)) / 1e3

    out = {
        "copy_bytes_per_s": 2.0 * 4 * n / best(lambda: dst.copy_(src)),
        "fp32_matmul_flops": 2.0 * m**3 / best(lambda: torch.mm(a, b)),
        "bf16_matmul_flops": 2.0 * m**3 / best(lambda: torch.mm(ah, bh)),
    }
    return {k: float(v) for k, v in out.items()}


def _sizes(on_gpu: bool, quick: bool, tiny: bool) -> dict[str, int]:
    if tiny:
        return {"n": 512, "k": 16, "d": 32, "b": 64, "kp": 50, "bm": 256, "nm": 64, "dm": 32}
    return {
        "n": 1_000_000 if on_gpu else (8192 if quick else 65536),
        "k": 1000,
        "d": 512,
        "b": 1024 if quick and not on_gpu else 4096,
        "kp": 3000,
        "bm": 4096,
        "nm": 256 if quick and not on_gpu else 1024,
        "dm": 512,
    }


def _cases(device: torch.device, quick: bool, tiny: bool = False) -> list[Case]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    on_gpu = device.type == "cuda"
    size = _sizes(on_gpu, quick, tiny)
    cases: list[Case] = []

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    # K-means assignment: N=1M, K=1000, D=512 on GPU; N scaled down on CPU (compute-bound,
    # ~15 s per full pass here), which the note records.
    n, k, d = size["n"], size["k"], size["d"]
    x, c = randn(n, d), randn(k, d)
    cases.append(
        Case(
            "kmeans_assign",
            f"N={n} K={k} D={d}",
            "" if on_gpu or tiny else "N scaled down from 1M on CPU",
            lambda: kmeans_assign(x, c),
            flops=2.0 * n * k * d,
            bytes_min=4.0 * (n * d + k * d + 2 * n),
        )
    )

    # SwAV: 2 high-resolution crops, fwd+bwd of Sinkhorn + swapped CE.
    b, kp = size["b"], size["kp"]
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
    for classes in (7,) if tiny else (7, 1000) if on_gpu else (7, 100, 1000):
        bm = size["bm"]
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
    nm, dm = size["nm"], size["dm"]
    src, tgt = randn(nm, dm).requires_grad_(), randn(nm, dm).requires_grad_()
    wts = torch.rand(nm, generator=gen).to(device)

    def mmd_step() -> object:
        val = gaussian_mmd(src, tgt, source_weight=wts)
        val.backward()  # type: ignore[no-untyped-call]
        return val

    pooled = 2 * nm
    cases.append(
        Case(
            "gaussian_mmd",
            f"n=m={nm} d={dm} 5 kernels",
            "fwd+bwd, weighted" + (", n scaled down" if nm != 1024 else ""),
            mmd_step,
            flops=6.0 * pooled * pooled * dm,
            bytes_min=4.0 * 3 * pooled * dm,
        )
    )
    return cases


def _measure(
    case: Case,
    device: torch.device,
    reps: int,
    ceilings: dict[str, float],
    compile_variant: bool = True,
) -> Row:
    """Warm every variant up (compiling where needed), then time them round-robin."""
    row = Row(case.op, case.shape, device.type, case.note)
    off = {dispatch.DISABLE_TRITON_ENV: "1", dispatch.DISABLE_COMPILE_ENV: "1"}
    on: dict[str, str | None] = {
        dispatch.DISABLE_TRITON_ENV: None,
        dispatch.DISABLE_COMPILE_ENV: None,
    }
    variants: dict[str, tuple[dict[str, str | None], Callable[[], object]]] = {
        "eager": (dict(off), case.run),
    }
    if compile_variant:
        variants["compiled"] = (dict(off), torch.compile(case.run))
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
    row.eager_ms = med["eager"]
    if "compiled" in med:
        row.compiled_ms = med["compiled"]
        row.compiled_speedup = row.best_ms["eager"] / row.best_ms["compiled"]
    if "dispatch" in med:
        row.dispatch_ms = med["dispatch"]
        row.dispatch_speedup = row.best_ms["eager"] / row.best_ms["dispatch"]
    if row.dispatch_ms is not None:
        row.floor_ms = 1e3 * max(
            case.flops / ceilings["fp32_matmul_flops"],
            case.bytes_min / ceilings["copy_bytes_per_s"],
        )
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
        f"Ceilings measured in this run on {meta['ceiling_device']}: copy "
        f"{meta['ceilings']['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write), fp32 matmul "
        f"{meta['ceilings']['fp32_matmul_flops'] / 1e12:.1f} TFLOP/s (precision "
        f"{meta['matmul_precision']}); floor = max(FLOPs / matmul, bytes / copy).",
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
            lines.append(
                f"| {op} | | cuda (not yet measured: no GPU lent ({meta['date']})) "
                "| | | | | | | | | |"
            )
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


def _write(out: Path, meta: dict[str, Any], rows: list[Row]) -> str:
    """Write the JSON (after every case, so a run cut short keeps what it measured)."""
    meta["loadavg_end"] = list(os.getloadavg())
    table = markdown(rows, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "rows": [asdict(r) for r in rows], "markdown": table}
    out.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller CPU sizes, fewer reps")
    parser.add_argument("--tiny", action="store_true", help="toy shapes (the GPU check's dry run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument(
        "--matmul-precision",
        choices=["highest", "high", "medium"],
        default="high",
        help="torch.set_float32_matmul_precision for the run (high: TF32 on CUDA)",
    )
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
    torch.set_float32_matmul_precision(args.matmul_precision)
    reps = args.reps or (2 if args.tiny else 3 if args.quick else 5)
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "reps": reps,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_note": None
        if device.type == "cuda"
        else "no GPU available: GPU rows left empty, never estimated",
        "compile_min_numel": dict(dispatch.COMPILE_MIN_NUMEL),
        "matmul_precision": args.matmul_precision,
        "ceiling_device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {args.threads} thread(s)",
        "ceilings": measure_ceilings(device, args.tiny),
        "floors": "max(FLOPs / measured fp32 matmul rate, min bytes / measured copy bandwidth)",
        "loadavg_start": list(os.getloadavg()),
    }
    rows = []
    for case in _cases(device, args.quick, args.tiny):
        t0 = time.perf_counter()
        row = _measure(case, device, reps, meta["ceilings"], not args.no_compile)
        rows.append(row)
        print(
            f"{row.op:18s} {row.shape:26s} eager {_fmt(row.eager_ms):>9s} ms  compiled "
            f"{_fmt(row.compiled_ms):>9s} ms ({_fmt(row.compiled_speedup)}x)  dispatcher "
            f"{_fmt(row.dispatch_ms):>9s} ms ({_fmt(row.dispatch_speedup)}x)  "
            f"[{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
        _write(args.out, meta, rows)
    table = _write(args.out, meta, rows)
    print()
    print(table)
    if args.update_docs:
        print("docs/benchmarks.md updated" if _update_docs(table) else "docs markers not found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
