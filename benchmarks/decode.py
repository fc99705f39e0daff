"""Decoding throughput: worker processes, and reduced-scale JPEG decoding (issue 18).

(a) ``--n`` synthetic ``wild-mild`` faces of 64 px (PNGs, as ``sourcefree synth``
writes them) decoded at 64 px by ``ImageDataset.load`` with 1 worker (in the
process) and with every usable core (a pool: its start is included).
(b) ``--photos`` JPEGs of ``--photo-side`` px (synthetic faces rendered at 128 px,
upscaled bicubically, JPEG quality 90) decoded to ``--size`` px with 1 worker:
full decoding vs reduced-scale decoding (libjpeg's DCT scaling), images/s and the
ratio, and the mean absolute pixel difference between the two.
(c) The accuracy of a small source package on those photos decoded both ways: a
smallcnn trained on ``--train`` ``studio`` faces rendered at ``--size`` px
(:func:`sourcefree.vendor.training.train_classifier`, ``--epochs``), exported, and
run through onnxruntime (:func:`sourcefree.runtime.evaluation.evaluate_inputs`).

Each time is the best of ``--repeats`` runs (the files are read from the page cache
after the first).

    python benchmarks/decode.py            # 20,000 faces; 2,000 photos of 1024 px to 112 px
    python benchmarks/decode.py --quick    # a smoke run: 300 faces, 40 photos of 256 px to 32 px

Writes ``benchmarks/results/decode.json`` (``decode-quick.json`` with ``--quick``)
and the block in docs/benchmarks.md (not with ``--quick`` or ``--no-docs``).
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

import numpy as np
from PIL import Image

from sourcefree.data import read_image_folder
from sourcefree.data.dataset import ImageDataset, LoadedImages
from sourcefree.data.decode import usable_cores
from sourcefree.data.synthetic import CLASSES, generate, write_domain
from sourcefree.fsutil import replace_marked_block
from sourcefree.package.manifest import InputSpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
START = "<!-- decode:start -->"
END = "<!-- decode:end -->"
#: Side at which the photos' faces are rendered before the upscale.
RENDER_SIDE = 128


def timed_load(data: ImageDataset, repeats: int, **kwargs: Any) -> tuple[LoadedImages, float]:
    """The best wall time of ``repeats`` loads, and the last load."""
    t0 = time.perf_counter()
    loaded = data.load(**kwargs)
    best = time.perf_counter() - t0
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        loaded = data.load(**kwargs)
        best = min(best, time.perf_counter() - t0)
    return loaded, best


def write_photos(out: Path, n: int, side: int, seed: int) -> np.ndarray:
    """``n`` JPEGs ``00000.jpg``... of ``side`` px (faces upscaled); their labels (cached)."""
    labels_file = out / "labels.json"
    if labels_file.exists():
        return np.asarray(json.loads(labels_file.read_text()), dtype=np.int64)
    out.mkdir(parents=True, exist_ok=True)
    faces = generate("wild-mild", n, RENDER_SIDE, seed=seed)
    for i, face in enumerate(faces.images):
        photo = Image.fromarray(face).resize((side, side), Image.Resampling.BICUBIC)
        photo.save(out / f"{i:05d}.jpg", quality=90)
    labels_file.write_text(json.dumps(faces.labels.tolist()))
    return faces.labels


def vendor(out: Path, size: int, n_train: int, epochs: int, seed: int) -> Path:
    """A smallcnn source package trained on ``studio`` faces at ``size`` px (cached)."""
    if (out / "manifest.json").exists():
        return out
    from sourcefree.export import source_package
    from sourcefree.vendor.training import TrainConfig, train_classifier

    spec = InputSpec(size=(size, size))
    train = generate("studio", n_train, size, seed=seed)
    cfg = TrainConfig(epochs=epochs, seed=seed)
    model = train_classifier(train.images, train.labels, len(CLASSES), spec, cfg)
    source_package(model, architecture="smallcnn", labels=list(CLASSES), input_spec=spec, out=out)
    return out


def throughput(work: Path, n: int, repeats: int, seed: int) -> list[dict[str, Any]]:
    """(a): 64 px faces decoded with 1 worker and with every usable core."""
    folder = work / f"faces-{n}"
    if not folder.exists():
        write_domain(folder, "wild-mild", n, 64, seed=seed)
    data = read_image_folder(folder)
    rows = []
    for workers in sorted({1, usable_cores()}):
        loaded, seconds = timed_load(data, repeats, size=64, workers=workers)
        images = len(loaded.indices)
        rows.append(
            {
                "images": images,
                "workers": workers,
                "seconds": round(seconds, 3),
                "images_per_s": round(images / seconds, 1),
            }
        )
    rows[-1]["speedup"] = round(rows[0]["seconds"] / rows[-1]["seconds"], 2)
    return rows


def photos(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """(b) and (c): full vs reduced-scale decoding of large JPEGs, speed and accuracy."""
    from sourcefree.package.loader import load_package
    from sourcefree.runtime.evaluation import evaluate_inputs

    folder = work / f"photos-{args.photos}-{args.photo_side}"
    labels = write_photos(folder, args.photos, args.photo_side, args.seed + 1)
    data = read_image_folder(folder)
    pkg = load_package(
        vendor(work / f"vendor-{args.size}", args.size, args.train, args.epochs, args.seed)
    )
    spec = pkg.manifest.input
    out: dict[str, Any] = {"images": len(data), "photo_side": args.photo_side, "size": args.size}
    pixels = {}
    for name, reduced in (("full", False), ("reduced", True)):
        loaded, seconds = timed_load(
            data, args.repeats, spec=spec, workers=1, reduced_decode=reduced
        )
        metrics = evaluate_inputs(pkg, loaded.to_float(spec), labels[loaded.indices], device="cpu")
        pixels[name] = loaded.images
        out[name] = {
            "seconds": round(seconds, 3),
            "images_per_s": round(len(loaded.indices) / seconds, 1),
            "accuracy": round(metrics.accuracy, 4),
        }
    out["speedup"] = round(out["full"]["seconds"] / out["reduced"]["seconds"], 2)
    out["accuracy_change"] = round(out["reduced"]["accuracy"] - out["full"]["accuracy"], 4)
    diff = np.abs(pixels["reduced"].astype(np.int16) - pixels["full"].astype(np.int16))
    out["mean_abs_pixel_difference"] = round(float(diff.mean()), 3)
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The docs block: throughput per worker count, then full vs reduced decoding."""
    p = payload["photos"]
    lines = [
        f"Measured {payload['date']} on {payload['machine']} ({payload['cpus']} usable CPU "
        f"cores; load average {payload['load_before']} before the runs): `{payload['argv']}`. "
        "Best of "
        f"{payload['repeats']} runs each; a pool's time includes starting its workers.",
        "",
        "| decode | images | workers | s | images/s | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["throughput"]:
        lines.append(
            f"| 64 px PNG faces at 64 px | {r['images']} | {r['workers']} | {r['seconds']:.2f} "
            f"| {r['images_per_s']:.0f} | {r.get('speedup', '')} |"
        )
    for name in ("full", "reduced"):
        row = p[name]
        speedup = p["speedup"] if name == "reduced" else ""
        lines.append(
            f"| {p['photo_side']} px JPEGs to {p['size']} px, {name} | {p['images']} | 1 "
            f"| {row['seconds']:.2f} | {row['images_per_s']:.0f} | {speedup} |"
        )
    lines += [
        "",
        f"Accuracy of a smallcnn source package on those {p['images']} photos: "
        f"{p['full']['accuracy']:.4f} decoded at full scale, {p['reduced']['accuracy']:.4f} "
        f"at reduced scale (change {p['accuracy_change']:+.4f}); mean absolute pixel "
        f"difference {p['mean_abs_pixel_difference']} grey levels.",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=20000, help="64 px faces for (a)")
    p.add_argument("--photos", type=int, default=2000, help="JPEG photos for (b) and (c)")
    p.add_argument("--photo-side", type=int, default=1024, help="side of the photos in px")
    p.add_argument("--size", type=int, default=112, help="input side the photos decode to")
    p.add_argument("--train", type=int, default=3000, help="studio faces of the source model")
    p.add_argument("--epochs", type=int, default=4, help="source training epochs")
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep data and vendor here")
    p.add_argument("--quick", action="store_true", help="a small smoke run, no docs")
    p.add_argument("--results", type=Path, default=None, help="JSON output path")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file of the block")
    p.add_argument("--no-docs", action="store_true", help="do not edit the docs")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.photos, args.photo_side, args.size = 300, 40, 256, 32
        args.train, args.epochs, args.repeats = 300, 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = throughput(work, args.n, args.repeats, args.seed)
        photo = photos(args, work)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": usable_cores(),
        "load_before": load,
        "argv": " ".join(["python benchmarks/decode.py", *(argv or sys.argv[1:])]),
        "repeats": args.repeats,
        "throughput": rows,
        "photos": photo,
    }
    out = args.results or RESULTS / ("decode-quick.json" if args.quick else "decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    block = markdown(payload)
    print(block)
    if not (args.quick or args.no_docs):
        replace_marked_block(args.docs, START, END, block, "Decoding throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
