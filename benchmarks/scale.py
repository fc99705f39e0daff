"""Cost against the number of target images: time per image and peak memory (issues 18, 23).

(a) ``--n`` synthetic ``wild-mild`` faces of ``--size`` px (64; what ``sourcefree
synth`` writes) adapted by ``sourcefree adapt -m METHOD`` in a subprocess, for each
of ``--methods``: ``adabn``, ``shot`` with 1 epoch and ``clup`` with the short
schedule of benchmarks/accuracy.py (``SHORT``). The vendor's package is the
smallcnn of benchmarks/gate_cost.py. Per run: milliseconds per image of each
stage that report.json's ``timings_s`` splits out (``load``: reading and decoding
the target; ``train``, split into the steps of every phase and the rest of the
training stage: whole-set passes such as SHOT's labelling pass and CluP's
clustering, and checkpoints; ``export``: the do-no-harm gate and the export),
the peak anonymous memory (``RssAnon`` of /proc/PID/status, sampled every
``--interval`` s) of the adapt process and, separately, the peak sum over its
child processes (the decode workers), and the exit status (0, or 4 when the
gate kept the source model). Decoding is not timed apart from reading in
report.json: ``load`` holds both.
(b) Decoding throughput of the smallest set with 1 worker and with every usable
core (benchmarks/decode.py's ``throughput``).
(c) ``--photos`` JPEGs of ``--photo-side`` px (benchmarks/decode.py's
``write_photos``) decoded to ``--photo-size`` px with 1 worker: full vs
reduced-scale decoding.
(d) Face preprocessing (issue 23): the first ``--face-photos`` of those photos,
and ``--real-photos`` real ones (scikit-image's astronaut and LFW faces, upscaled
to ``--photo-side`` px), decoded with ``input.faces`` ``none``, ``detect`` and
``align`` (no face: kept whole) with 1 worker and with every usable core; the
milliseconds per image, and the extra over ``none``, are the cost of detection
and alignment. The no-face and no-eyes counts come from the read report.
(e) Engine overhead: one SHOT epoch through ``sourcefree adapt -m shot --set
epochs=1`` (report.json's training stage) against :func:`plain_shot_epoch`, a
plain PyTorch loop doing the same computation on the same images, with the same
number of torch threads.

    python benchmarks/scale.py                 # N = 4k, 16k, 64k at 64 px (hours on 2 cores)
    python benchmarks/scale.py --full          # adds N = 256k
    python benchmarks/scale.py --quick         # a smoke run: N = 200, 400 at 32 px

Writes ``benchmarks/results/scale.json`` (``scale-quick.json`` with ``--quick``), the
block of the "Scale" section of docs/benchmarks.md and the plot ``scale.svg`` beside it
(not with ``--quick`` or ``--no-docs``; ``--svg`` writes the plot anywhere).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F  # noqa: N812

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.* are importable from the root
    sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import SHORT  # noqa: E402
from benchmarks.decode import throughput, timed_load, write_photos  # noqa: E402
from benchmarks.face_detection import Setting, lfw, prepare  # noqa: E402
from benchmarks.gate_cost import vendor  # noqa: E402
from sourcefree.adapters.shot import ShotConfig  # noqa: E402
from sourcefree.data import read_image_folder  # noqa: E402
from sourcefree.data.dataset import ImageDataset  # noqa: E402
from sourcefree.data.decode import usable_cores  # noqa: E402
from sourcefree.data.faces import FaceDetectorError  # noqa: E402
from sourcefree.data.synthetic import write_domain  # noqa: E402
from sourcefree.engine.method import batchnorm_layers  # noqa: E402
from sourcefree.engine.models import Classifier, load_classifier  # noqa: E402
from sourcefree.fsutil import replace_marked_block  # noqa: E402
from sourcefree.ops.pseudo_labels import centroid_pseudo_labels  # noqa: E402
from sourcefree.package.loader import load_package  # noqa: E402
from sourcefree.package.manifest import FaceSpec, InputSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
#: The plot, written beside the docs file.
SVG_NAME = "scale.svg"
START = "<!-- scale:start -->"
END = "<!-- scale:end -->"
HEADING = "Scale"
METHODS = ("adabn", "shot", "clup")
#: ``--set`` overrides of each method: SHOT one epoch, CluP the accuracy benchmark's short run.
METHOD_SETS: dict[str, tuple[str, ...]] = {
    "adabn": (),
    "shot": ("epochs=1",),
    "clup": SHORT["clup"],
}
FACE_MODES = ("none", "detect", "align")
#: Options whose values are local paths: never written into the JSON or the docs.
PATH_OPTIONS = ("--workdir", "--results", "--docs", "--svg")


# --- memory -------------------------------------------------------------------------


def rss_anon_kb(pid: int) -> int:
    """``RssAnon`` of a process in kB (0 when it is gone or the field is missing)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc/PID/task/TID/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def watch(proc: subprocess.Popen[bytes], interval: float) -> dict[str, Any]:
    """Sample ``proc`` until it exits: peak RssAnon of it and of its children's sum (MiB)."""
    own = children = samples = 0
    while proc.poll() is None:
        own = max(own, rss_anon_kb(proc.pid))
        children = max(children, sum(rss_anon_kb(k) for k in descendants(proc.pid)))
        samples += 1
        time.sleep(interval)
    return {
        "peak_rss_anon_mb": round(own / 1024, 1),
        "peak_children_rss_anon_mb": round(children / 1024, 1),
        "memory_samples": samples,
    }


# --- adapt runs ---------------------------------------------------------------------


def run_adapt(
    pkg: Path, data: Path, out: Path, method: str, sets: Sequence[str], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``sourcefree adapt`` in a subprocess, watched; (wall, memory, exit) and its report."""
    cmd = [sys.executable, "-m", "sourcefree", "adapt", str(pkg), str(data), "-m", method]
    cmd += ["-o", str(out), "--device", "cpu", "--no-progress", "--overwrite"]
    cmd += [f"--set={s}" for s in sets]
    if args.adapt_workers is not None:
        cmd += ["--workers", str(args.adapt_workers)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = out.parent / f"{out.name}.stderr"
    started = time.perf_counter()
    with log.open("wb") as err, subprocess.Popen(cmd, env=env, stdout=err, stderr=err) as proc:
        memory = watch(proc, args.interval)
    wall = time.perf_counter() - started
    run = {"exit_status": proc.returncode, "wall_s": round(wall, 3), **memory}
    report_file = out / "report.json"
    if proc.returncode not in (0, 4) or not report_file.exists():
        tail = log.read_text(errors="replace")[-2000:]
        print(f"adapt -m {method} exited {proc.returncode}:\n{tail}", file=sys.stderr)
        return run, None
    report: dict[str, Any] = json.loads(report_file.read_text())
    return run, report


def phase_seconds(report: dict[str, Any]) -> dict[str, float]:
    """Seconds of each phase's steps (phases of one name summed)."""
    out: dict[str, float] = {}
    for p in report["phases"]:
        out[p["name"]] = round(out.get(p["name"], 0.0) + float(p["seconds"]), 3)
    return out


def adapt_row(
    n: int, method: str, run: dict[str, Any], report: dict[str, Any] | None, size: int
) -> dict[str, Any]:
    """One table row: ms per image of each stage, peak memory, exit status."""
    row: dict[str, Any] = {
        "method": method,
        "images": n,
        "size": size,
        "ok": report is not None,
        "date": time.strftime("%Y-%m-%d"),
    }
    row.update(run)
    if report is None:
        return row
    t = report["timings_s"]
    phases = phase_seconds(report)
    steps = sum(phases.values())
    images = int(report["target"]["images"])

    def ms(seconds: float) -> float:
        return round(1000.0 * seconds / images, 4)

    row.update(
        images=images,
        overrides=list(METHOD_SETS[method]),
        timings_s=t,
        phase_s=phases,
        ms_per_image={
            "load": ms(t["load"]),
            "train_steps": ms(steps),
            "train_outside_steps": ms(max(0.0, t["train"] - steps)),
            "train": ms(t["train"]),
            "export": ms(t["export"]),
            "total": ms(t["total"]),
        },
        gate=(report.get("gate") or {}).get("decision"),
    )
    return row


def synth(work: Path, n: int, size: int, seed: int) -> Path:
    """``n`` wild-mild faces at ``size`` px, as benchmarks/decode.py's throughput() names them."""
    folder = work / f"px{size}" / f"faces-{n}"
    if not folder.exists():
        write_domain(folder, "wild-mild", n, size, seed=seed)
    return folder


def scale_rows(args: argparse.Namespace, work: Path, pkg: Path) -> list[dict[str, Any]]:
    """(a): every method on every N."""
    rows = []
    for n in args.n:
        data = synth(work, n, args.size, args.seed)
        for method in args.methods:
            out = work / "runs" / f"{method}-{n}"
            out.parent.mkdir(parents=True, exist_ok=True)
            run, report = run_adapt(pkg, data, out, method, METHOD_SETS[method], args)
            row = adapt_row(n, method, run, report, args.size)
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k not in ("timings_s", "phase_s")}))
    return rows


def _ratio(a: float, b: float) -> float | None:
    """``a / b`` rounded to 3 decimals; None when ``b`` is 0 (nothing was measured)."""
    return round(a / b, 3) if b > 0 else None


def ratios(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: time per image and peak RssAnon at the largest N over the smallest N."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        ok = sorted(
            (r for r in rows if r["method"] == method and r["ok"]), key=lambda r: r["images"]
        )
        if len(ok) < 2 or ok[0]["images"] == ok[-1]["images"]:
            continue
        lo, hi = ok[0], ok[-1]
        out[method] = {
            "from_images": lo["images"],
            "to_images": hi["images"],
            "time_per_image": _ratio(hi["ms_per_image"]["total"], lo["ms_per_image"]["total"]),
            "train_time_per_image": _ratio(
                hi["ms_per_image"]["train"], lo["ms_per_image"]["train"]
            ),
            "peak_rss_anon": _ratio(hi["peak_rss_anon_mb"], lo["peak_rss_anon_mb"]),
            "peak_rss_anon_added_mb": round(hi["peak_rss_anon_mb"] - lo["peak_rss_anon_mb"], 1),
        }
    return out


# --- photos and faces ---------------------------------------------------------------


def photo_rows(
    args: argparse.Namespace, work: Path, *, time_it: bool = True
) -> tuple[dict[str, Any], ImageDataset]:
    """(c): full vs reduced-scale decoding of the large JPEGs (1 worker); and the photos.

    ``time_it=False``: write and list the photos only (for the face rows).
    """
    folder = work / f"photos-{args.photos}-{args.photo_side}"
    write_photos(folder, args.photos, args.photo_side, args.seed + 1)
    data = read_image_folder(folder)
    spec = InputSpec(size=(args.photo_size, args.photo_size))
    out: dict[str, Any] = {
        "images": len(data),
        "photo_side": args.photo_side,
        "size": args.photo_size,
    }
    if not time_it:
        return out, data
    for name, reduced in (("full", False), ("reduced", True)):
        loaded, seconds = timed_load(
            data, args.repeats, spec=spec, workers=1, reduced_decode=reduced
        )
        out[name] = {
            "seconds": round(seconds, 3),
            "ms_per_image": round(1000 * seconds / len(loaded.indices), 3),
        }
    out["speedup"] = round(out["full"]["seconds"] / out["reduced"]["seconds"], 2)
    return out, data


def write_real_photos(out: Path, n: int, side: int) -> int:
    """Up to ``n`` real photos of ``side`` px (JPEG quality 90): the astronaut, then LFW faces.

    The LFW crops (25 px grey) are padded by a quarter of their side, as
    benchmarks/face_detection.py does, then upscaled bicubically to ``side``.
    Returns how many photos the folder holds.
    """
    if out.exists():
        return len(list(out.glob("*.jpg")))
    skimage_data = importlib.import_module("skimage.data")  # a dev dependency
    photos = [Image.fromarray(np.asarray(skimage_data.astronaut()))]
    faces, _ = lfw()
    for face in faces[: max(0, n - 1)]:
        grown = prepare(face, Setting(upscale=1, resample="bicubic", pad=0.25))
        photos.append(Image.fromarray(grown).convert("RGB"))
    out.mkdir(parents=True)
    for i, photo in enumerate(photos[:n]):
        photo = photo.resize((side, side), Image.Resampling.BICUBIC)
        photo.save(out / f"{i:05d}.jpg", quality=90)
    return min(n, len(photos))


def face_rows(data: ImageDataset, name: str, size: int, repeats: int) -> list[dict[str, Any]]:
    """(d) on one set of photos: every face mode with 1 worker and with every usable core."""
    rows: list[dict[str, Any]] = []
    for mode in FACE_MODES:
        spec = InputSpec(size=(size, size), faces=FaceSpec(mode=mode, no_face="whole"))
        for workers in sorted({1, usable_cores()}):
            loaded, seconds = timed_load(data, repeats, spec=spec, workers=workers)
            images = len(loaded.indices)
            row = {
                "photos": name,
                "mode": mode,
                "workers": workers,
                "images": images,
                "no_face": loaded.report.no_face,
                "no_eyes": loaded.report.no_eyes,
                "seconds": round(seconds, 3),
                "ms_per_image": round(1000 * seconds / images, 3),
            }
            base = next((r for r in rows if r["mode"] == "none" and r["workers"] == workers), None)
            if base is not None:
                row["extra_ms_per_image"] = round(row["ms_per_image"] - base["ms_per_image"], 3)
            rows.append(row)
    return rows


def faces(args: argparse.Namespace, work: Path, photos: ImageDataset) -> dict[str, Any]:
    """(d): face detection and alignment cost per image, synthetic and real photos."""
    out: dict[str, Any] = {"rows": [], "notes": []}
    synthetic = photos.subset(range(min(args.face_photos, len(photos))))
    try:
        out["rows"] += face_rows(synthetic, "synthetic", args.photo_size, args.repeats)
    except FaceDetectorError as exc:
        out["notes"].append(f"face rows not measured: {exc.what}")
        return out
    if args.real_photos > 0:
        folder = work / f"real-{args.real_photos}-{args.photo_side}"
        try:
            write_real_photos(folder, args.real_photos, args.photo_side)
        except ImportError:
            out["notes"].append("real photos not measured: scikit-image is not installed")
            return out
        real = read_image_folder(folder)
        out["rows"] += face_rows(real, "real", args.photo_size, args.repeats)
    return out


# --- engine overhead ----------------------------------------------------------------


def _normalised(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, ``(x / 255 - mean) / std``."""
    return (pixels.permute(0, 3, 1, 2).float().div(255.0) - mean) / std


def plain_shot_epoch(
    model: Classifier, images: np.ndarray, spec: InputSpec, cfg: ShotConfig, seed: int
) -> dict[str, float]:
    """One SHOT epoch as a user would write it in plain PyTorch; seconds of each part.

    The same computation as ``sourcefree adapt -m shot --set epochs=1``: AdaBN
    (BatchNorm statistics re-estimated over the target, exact average), a labelling
    pass in eval mode (centroid pseudo-labels, the SDK's function), then shuffled
    batches (drop last) with ``beta * CE + entropy - diversity`` on the frozen head,
    SGD (Nesterov) on the backbone with the inverse-decay schedule.
    """
    pixels = torch.from_numpy(images)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    n, lbs, bs = len(pixels), cfg.label_batch_size, cfg.batch_size
    t0 = time.perf_counter()
    model.eval()
    for bn in batchnorm_layers(model):
        bn.train()
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for i in range(0, n, lbs):
            model(_normalised(pixels[i : i + lbs], mean, std))
    for bn in batchnorm_layers(model):
        bn.momentum = 0.1
    model.eval()
    t1 = time.perf_counter()
    feats, probs = [], []
    with torch.no_grad():
        for i in range(0, n, lbs):
            logits, f = model(_normalised(pixels[i : i + lbs], mean, std))
            feats.append(f)
            probs.append(torch.softmax(logits, dim=1))
    labels = centroid_pseudo_labels(torch.cat(feats), torch.cat(probs)).labels
    t2 = time.perf_counter()
    for param in model.head.parameters():
        param.requires_grad_(False)
    opt_cfg = cfg.optim
    params = list(model.backbone.parameters())
    opt = torch.optim.SGD(
        [{"params": params, "lr": opt_cfg.lr * opt_cfg.backbone_lr_scale}],
        momentum=opt_cfg.momentum,
        nesterov=True,
        weight_decay=opt_cfg.weight_decay,
    )
    base_lr = opt_cfg.lr * opt_cfg.backbone_lr_scale
    steps = 1 if n <= bs else n // bs
    model.train()
    model.head.eval()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    eps = cfg.entropy_eps
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = base_lr * (1 + opt_cfg.gamma * step / steps) ** (-opt_cfg.power)
        idx = order[step * bs : (step + 1) * bs]
        logits, _ = model(_normalised(pixels[idx], mean, std))
        prob = torch.softmax(logits, dim=1)
        entropy = -(prob * torch.log(prob + eps)).sum(dim=1).mean()
        p_mean = prob.mean(dim=0)
        diversity = -(p_mean * torch.log(p_mean + eps)).sum()
        loss = cfg.beta * F.cross_entropy(logits, labels[idx]) + cfg.im_weight * (
            entropy - diversity
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    model.eval()
    t3 = time.perf_counter()
    return {
        "total_s": round(t3 - t0, 3),
        "adabn_s": round(t1 - t0, 3),
        "labelling_s": round(t2 - t1, 3),
        "steps_s": round(t3 - t2, 3),
        "steps": steps,
    }


def overhead(args: argparse.Namespace, work: Path, pkg_dir: Path) -> dict[str, Any]:
    """(e): engine vs plain loop, alternated ``--overhead-repeats`` times; best of each."""
    n = min(args.n)
    data = synth(work, n, args.size, args.seed)
    pkg = load_package(pkg_dir)
    spec = pkg.manifest.input
    images = read_image_folder(data).load(spec=spec).images
    cfg = ShotConfig(epochs=1)
    engine: list[dict[str, Any]] = []
    plain: list[dict[str, float]] = []
    for _ in range(args.overhead_repeats):
        out = work / "runs" / f"overhead-{n}"
        out.parent.mkdir(parents=True, exist_ok=True)
        run, report = run_adapt(pkg_dir, data, out, "shot", ("epochs=1",), args)
        if report is None:
            return {"images": n, "ok": False, "exit_status": run["exit_status"]}
        phases = phase_seconds(report)
        engine.append(
            {
                "train_s": report["timings_s"]["train"],
                "steps_s": phases.get("adapt", 0.0),
                "target_bn_s": phases.get("target-bn", 0.0),
                "outside_steps_s": round(report["timings_s"]["train"] - sum(phases.values()), 3),
                "batch_size": report["config"].get("batch_size"),
            }
        )
        model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
        plain.append(plain_shot_epoch(model, images, spec, cfg, args.seed))
    best_engine = min(engine, key=lambda r: r["train_s"])
    best_plain = min(plain, key=lambda r: r["total_s"])
    return {
        "images": n,
        "ok": True,
        "threads": args.threads,
        "batch_size": cfg.batch_size,
        "repeats": args.overhead_repeats,
        "engine": best_engine,
        "plain": best_plain,
        "ratio": round(best_engine["train_s"] / best_plain["total_s"], 3),
        "steps_ratio": round(
            min(r["steps_s"] for r in engine) / min(r["steps_s"] for r in plain), 3
        ),
    }


# --- outputs ------------------------------------------------------------------------

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _panel(
    rows: Sequence[dict[str, Any]], value: str, title: str, left: float, methods: Sequence[str]
) -> list[str]:
    """One line chart of ``value(row)`` against N (log scale) at x offset ``left``."""
    w, h, top, pad = 300.0, 200.0, 40.0, 50.0
    ns = sorted({r["images"] for r in rows})
    ys = [_value(r, value) for r in rows]
    y_max = max(ys) * 1.1 if ys and max(ys) > 0 else 1.0
    lo, hi = np.log(ns[0]), np.log(ns[-1])

    def x_of(n: int) -> float:
        frac = 0.5 if hi == lo else (np.log(n) - lo) / (hi - lo)
        return left + pad + float(frac) * w

    def y_of(v: float) -> float:
        return top + h - v / y_max * h

    out = [
        f'<text x="{left + pad + w / 2}" y="{top - 22}" text-anchor="middle" '
        f'font-weight="bold">{title}</text>',
        f'<line x1="{left + pad}" y1="{top + h}" x2="{left + pad + w}" y2="{top + h}" '
        'stroke="black"/>',
        f'<line x1="{left + pad}" y1="{top}" x2="{left + pad}" y2="{top + h}" stroke="black"/>',
        f'<text x="{left + pad + w / 2}" y="{top + h + 34}" text-anchor="middle">'
        "target images N (log scale)</text>",
    ]
    for n in ns:
        out.append(f'<text x="{x_of(n):.1f}" y="{top + h + 16}" text-anchor="middle">{n}</text>')
    for k in range(5):
        v = y_max * k / 4
        out.append(
            f'<text x="{left + pad - 6}" y="{y_of(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
        )
    for i, method in enumerate(methods):
        pts = sorted((r["images"], _value(r, value)) for r in rows if r["method"] == method)
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x_of(n):.1f},{y_of(v):.1f}" for n, v in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [
            f'<circle cx="{x_of(n):.1f}" cy="{y_of(v):.1f}" r="3" fill="{colour}"/>' for n, v in pts
        ]
        out.append(
            f'<text x="{left + pad + w - 4}" y="{top + 14 + 14 * i}" fill="{colour}" '
            f'text-anchor="end">{method}</text>'
        )
    return out


def _value(row: dict[str, Any], key: str) -> float:
    if key == "ms":
        return float(row["ms_per_image"]["total"])
    return float(row["peak_rss_anon_mb"])


def svg(payload: dict[str, Any]) -> str:
    """Time per image and peak RssAnon against N, one line per method (plain SVG text)."""
    rows = [r for r in payload["rows"] or [] if r["ok"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    body = _panel(rows, "ms", "time per image (ms, whole adapt run)", 0.0, methods)
    body += _panel(rows, "mb", "peak anonymous memory (MiB, RssAnon)", 380.0, methods)
    return "\n".join(
        [
            '<svg xmlns="http://www.w3.org/2000/svg" width="760" height="300" '
            'font-family="sans-serif" font-size="11">',
            '<rect width="100%" height="100%" fill="white"/>',
            *body,
            f'<text x="10" y="292" fill="#555">{payload["date"]}, {payload["machine"]["cores"]} '
            f"CPU cores, {payload['size']} px synthetic faces</text>",
            "</svg>",
            "",
        ]
    )


def _not_measured(payload: dict[str, Any], part: str) -> list[str]:
    return [f"- {part}: not measured yet (`python benchmarks/scale.py --parts {part}`)."]


def _measured_on(payload: dict[str, Any], part: str) -> list[str]:
    """A line naming the date of a part kept from an earlier run, nothing for this run's."""
    when = (payload.get("parts") or {}).get(part)
    if when in (None, "measured"):
        return []
    return [f"- {part}: measured {when}, kept from the earlier results file."]


def _scale_table(payload: dict[str, Any]) -> list[str]:
    if payload["rows"] is None:
        return _not_measured(payload, "scale")
    lines = [
        "| method | images | exit | load | steps | outside steps | export | total "
        "| peak RssAnon MiB | workers' peak MiB | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        when = r.get("date") or payload["date"]
        if not r["ok"]:
            lines.append(
                f"| {r['method']} | {r['images']} | {r['exit_status']} | failed |||||| | {when} |"
            )
            continue
        m = r["ms_per_image"]
        lines.append(
            f"| {r['method']} | {r['images']} | {r['exit_status']} | {m['load']:.3f} "
            f"| {m['train_steps']:.3f} | {m['train_outside_steps']:.3f} | {m['export']:.3f} "
            f"| {m['total']:.3f} | {r['peak_rss_anon_mb']:.0f} "
            f"| {r['peak_children_rss_anon_mb']:.0f} | {when} |"
        )
    lines.append("")
    for method, q in payload["ratios"].items():
        lines.append(
            f"- {method}: time per image at {q['to_images']} over {q['from_images']} images "
            f"{q['time_per_image']}x (training stage {q['train_time_per_image']}x); "
            f"peak RssAnon {q['peak_rss_anon']}x ({q['peak_rss_anon_added_mb']:+.0f} MiB)."
        )
    return lines + _measured_on(payload, "scale")


def _decode_tables(payload: dict[str, Any]) -> list[str]:
    p = payload["photos"]
    lines = [""]
    if payload["decode_throughput"] is not None or p is not None:
        lines += ["| decode | images | workers | ms/image | speedup |", "|---|---|---|---|---|"]
    for r in payload["decode_throughput"] or []:
        lines.append(
            f"| {payload['size']} px PNG faces | {r['images']} | {r['workers']} "
            f"| {1000 * r['seconds'] / r['images']:.3f} | {r.get('speedup', '')} |"
        )
    for name in ("full", "reduced") if p is not None else ():
        speedup = p["speedup"] if name == "reduced" else ""
        lines.append(
            f"| {p['photo_side']} px JPEGs to {p['size']} px, {name} | {p['images']} | 1 "
            f"| {p[name]['ms_per_image']:.3f} | {speedup} |"
        )
    lines += [""]
    for part, key in (("decode", "decode_throughput"), ("photos", "photos")):
        lines += _measured_on(payload, part) if payload[key] is not None else []
        lines += _not_measured(payload, part) if payload[key] is None else []
    return lines + _face_table(payload)


def _face_table(payload: dict[str, Any]) -> list[str]:
    f = payload["faces"]
    if f is None:
        return _not_measured(payload, "faces")
    lines = [
        "",
        "| photos | faces | workers | images | no face | eyes not found | ms/image "
        "| extra ms/image over none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in f["rows"]:
        lines.append(
            f"| {r['photos']} | {r['mode']} | {r['workers']} | {r['images']} | {r['no_face']} "
            f"| {r['no_eyes']} | {r['ms_per_image']:.2f} | {r.get('extra_ms_per_image', '')} |"
        )
    lines.append(
        "- A photo without a face is kept whole (`no_face: whole`), so every photo is timed; "
        "`extra` is the time over the same photos decoded without face preprocessing."
    )
    lines += [f"- {note}" for note in f["notes"]]
    return lines + _measured_on(payload, "faces")


def markdown(payload: dict[str, Any], svg_link: str | None) -> str:
    """The docs block: adapt rows and ratios, decoding, faces, engine overhead."""
    m = payload["machine"]
    lines = [
        f"Measured {payload['date']} on {m['arch']} ({m['cores']} usable CPU cores, "
        f"{payload['threads']} torch threads; load average {m['load_before']} before, "
        f"{m['load_after']} after), torch {payload['torch']}: `{payload['argv']}`. "
        f"{payload['size']} px wild-mild faces; milliseconds per image from report.json "
        "(`load` = reading and decoding, not split further; `steps` = the training steps "
        "of every phase; `outside steps` = the rest of the training stage: whole-set "
        "passes such as SHOT's labelling pass or CluP's clustering, and checkpoints; "
        "`export` = the do-no-harm gate and the export). Peak RssAnon of the adapt "
        f"process, sampled every {payload['interval_s']} s, and of its decode workers "
        f"together (adapt --workers: {payload['adapt_workers'] or 'its default'}). "
        "Exit 4: the gate kept the source model.",
        "",
        *_scale_table(payload),
        *_decode_tables(payload),
    ]
    o = payload["overhead"] or {}
    if not o:
        lines += ["", *_not_measured(payload, "overhead")]
    if o.get("ok"):
        lines += [
            "",
            f"Engine overhead, one SHOT epoch on {o['images']} images (batch "
            f"{o['batch_size']}, {o['threads']} threads, best of {o['repeats']}): "
            f"`sourcefree adapt` training stage {o['engine']['train_s']:.2f} s, plain "
            f"PyTorch loop {o['plain']['total_s']:.2f} s: ratio {o['ratio']:.3f} "
            f"(goal <= 1.15); training steps alone {o['steps_ratio']:.3f}. Outside the "
            f"steps: the engine {o['engine']['outside_steps_s']:.2f} s (labelling pass, "
            f"checkpoints, set-up), the plain loop's labelling pass "
            f"{o['plain']['labelling_s']:.2f} s.",
            *_measured_on(payload, "overhead"),
        ]
    if svg_link:
        lines += ["", f"![time per image and peak memory against N]({svg_link})"]
    return "\n".join(lines)


def public_argv(argv: Sequence[str]) -> str:
    """The command line with the values of path options replaced by ``PATH``."""
    out, hide = ["python benchmarks/scale.py"], False
    for a in argv:
        name = a.split("=", 1)[0]
        if hide:
            out.append("PATH")
        elif name in PATH_OPTIONS and "=" in a:
            out.append(f"{name}=PATH")
        else:
            out.append(a)
        hide = a in PATH_OPTIONS
    return " ".join(out)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count")
    return value


#: Parts of the benchmark (``--parts``) and the payload keys each one writes.
PARTS = ("scale", "decode", "overhead", "photos", "faces")
PART_KEYS = {
    "scale": ("rows",),
    "decode": ("decode_throughput",),
    "overhead": ("overhead",),
    "photos": ("photos",),
    "faces": ("faces",),
}


def run_parts(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """Run the parts ``--parts`` names; each returns its payload keys."""
    out: dict[str, dict[str, Any]] = {}
    chosen = set(args.parts)
    pkg = None
    if chosen & {"scale", "overhead"}:
        pkg = vendor(work / f"vendor-{args.size}", args.size, args.seed)
    if "scale" in chosen and pkg is not None:
        out["scale"] = {"rows": scale_rows(args, work, pkg)}
    if "decode" in chosen:
        synth(work, min(args.n), args.size, args.seed)
        rows = throughput(work / f"px{args.size}", min(args.n), args.repeats, args.seed)
        out["decode"] = {"decode_throughput": rows}
    if "overhead" in chosen and pkg is not None:
        out["overhead"] = {"overhead": overhead(args, work, pkg)}
    if chosen & {"photos", "faces"}:
        photo, photo_data = photo_rows(args, work, time_it="photos" in chosen)
        if "photos" in chosen:
            out["photos"] = {"photos": photo}
        if "faces" in chosen:
            out["faces"] = {"faces": faces(args, work, photo_data)}
    return out


def merged_rows(
    new: list[dict[str, Any]], path: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """``--add-rows``: this run's rows, and the earlier file's for (method, N) not run now."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    if (old.get("size"), old.get("quick")) != (args.size, args.quick) or not old.get("rows"):
        return new
    ran = {(r["method"], r["images"]) for r in new}
    when = (old.get("parts") or {}).get("scale")
    kept = [
        {**r, "date": r.get("date") or (old.get("date") if when in (None, "measured") else when)}
        for r in old["rows"]
        if (r["method"], r["images"]) not in ran
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(new + kept, key=lambda r: (r["images"], order.get(r["method"], len(order))))


def previous_parts(path: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The parts not run now, from an earlier results file of the same settings (if any)."""
    if set(args.parts) == set(PARTS) or not path.exists():
        return {}
    old = json.loads(path.read_text())
    if (old.get("size"), old.get("quick")) != (args.size, args.quick):
        return {}
    dates = old.get("parts") or {name: old.get("date") for name in PARTS}
    kept = {}
    for name in PARTS:
        if name in args.parts or any(old.get(k) is None for k in PART_KEYS[name]):
            continue
        date = old.get("date") if dates.get(name) == "measured" else dates.get(name)
        kept[name] = {"date": date, "values": {k: old[k] for k in PART_KEYS[name]}}
    return kept


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=_positive, nargs="+", default=None, help="target sizes")
    p.add_argument("--full", action="store_true", help="add N = 256,000")
    p.add_argument("--size", type=_positive, default=None, help="image side in px (64)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--photos", type=_positive, default=None, help="JPEG photos (2000)")
    p.add_argument("--photo-side", type=_positive, default=None, help="their side (1024)")
    p.add_argument("--photo-size", type=_positive, default=None, help="decoded to (112)")
    p.add_argument("--face-photos", type=_positive, default=None, help="of them, for faces")
    p.add_argument("--real-photos", type=int, default=None, help="real photos (0: none)")
    p.add_argument("--overhead-repeats", type=_positive, default=None)
    p.add_argument("--repeats", type=_positive, default=None, help="decode runs (best kept)")
    p.add_argument("--threads", type=_positive, default=usable_cores(), help="torch threads")
    p.add_argument(
        "--adapt-workers", type=_positive, default=None, help="adapt --workers (its default)"
    )
    p.add_argument("--interval", type=float, default=0.05, help="memory sampling period, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep data and vendor here")
    p.add_argument("--quick", action="store_true", help="a small smoke run, no docs")
    p.add_argument("--results", type=Path, default=None, help="JSON output path")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file of the block")
    p.add_argument(
        "--svg", type=Path, default=None, help=f"plot path (default: {SVG_NAME} beside --docs)"
    )
    p.add_argument("--no-docs", action="store_true", help="do not edit the docs")
    p.add_argument(
        "--add-rows",
        action="store_true",
        help="keep the results file's scale rows for the (method, N) pairs not run now",
    )
    p.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="run only these parts; the others are kept from the results file (if any)",
    )
    args = p.parse_args(argv)
    quick = {
        "n": [200, 400], "size": 32, "methods": ["adabn", "shot"], "photos": 20,
        "photo_side": 256, "photo_size": 32, "face_photos": 20, "real_photos": 4,
        "overhead_repeats": 1, "repeats": 1,
    }  # fmt: skip
    full = {
        "n": [4000, 16000, 64000] + [256000] * args.full, "size": 64, "methods": list(METHODS),
        "photos": 2000, "photo_side": 1024, "photo_size": 112, "face_photos": 200,
        "real_photos": 20, "overhead_repeats": 2, "repeats": 2,
    }  # fmt: skip
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.real_photos < 0 or not 0 < args.interval <= 5:
        p.error("--real-photos must be >= 0 and --interval in (0, 5]")
    args.n = sorted(set(args.n))
    torch.set_num_threads(args.threads)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        parts = run_parts(args, work)
    out = args.results or RESULTS / ("scale-quick.json" if args.quick else "scale.json")
    kept = previous_parts(out, args)
    if args.add_rows and "scale" in parts:
        parts["scale"]["rows"] = merged_rows(parts["scale"]["rows"], out, args)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "argv": public_argv(raw_argv),
        "machine": {
            "arch": platform.machine(),
            "cores": usable_cores(),
            "load_before": load_before,
            "load_after": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        },
        "torch": torch.__version__,
        "threads": args.threads,
        "adapt_workers": args.adapt_workers,
        "interval_s": args.interval,
        "size": args.size,
        "quick": args.quick,
        "parts": {
            name: ("measured" if name in parts else kept.get(name, {}).get("date"))
            for name in PARTS
        },
        **{key: None for name in PARTS for key in PART_KEYS[name]},
        **{k: v for part in kept.values() for k, v in part["values"].items()},
        **{k: v for part in parts.values() for k, v in part.items()},
    }
    payload["ratios"] = ratios(payload["rows"]) if payload["rows"] is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    docs = not (args.quick or args.no_docs)
    svg_path = args.svg or (args.docs.parent / SVG_NAME if docs else None)
    link = None
    if svg_path is not None and payload["rows"]:
        svg_path.parent.mkdir(parents=True, exist_ok=True)
        svg_path.write_text(svg(payload))
        if svg_path.resolve().parent == args.docs.resolve().parent:
            link = svg_path.name
    block = markdown(payload, link)
    print(block)
    if docs:
        replace_marked_block(args.docs, START, END, block, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
