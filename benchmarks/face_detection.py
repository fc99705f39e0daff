"""Face detection on real photos: the SDK's Haar cascade on scikit-image's ``lfw_subset``.

``skimage.data.lfw_subset()`` holds 200 grey 25x25 crops from LFW: the first
100 are faces, the last 100 are background patches of the same photos. The
crops are barely larger than the cascade's 24 px window, and the faces fill the
whole crop, so each crop is first grown: an edge-replicated border of ``pad``
times the side on every side (0.5: 25 px become 50 px), then upscaled by an
integer factor with PIL's bilinear or bicubic filter. On each setting
:class:`sourcefree.data.faces.FaceDetector` (the SDK's defaults) reports:

- ``face_rate``: share of the faces with at least one box;
- ``false_positive_rate``: share of the non-faces with at least one box;
- mean boxes per face and per non-face image;
- mean ms per image (padding, resizing and detection; OpenCV's thread count and
  the load average are recorded with it).

``skimage.data.astronaut()`` (512x512 RGB, one face) gives the box found on a
full photo. Writes ``benchmarks/results/face_detection.json`` and the table of
the "Face detection on real photos" section of docs/data.md.

    python benchmarks/face_detection.py [--upscales 1 2 4 8] [--pads 0 0.25 0.5]
                                        [--resamples bilinear bicubic] [--limit N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sourcefree.data.faces import CASCADE, FaceDetector
from sourcefree.fsutil import replace_marked_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "face_detection.json"
DOCS = ROOT / "docs" / "data.md"
START = "<!-- face-detection:start -->"
END = "<!-- face-detection:end -->"
HEADING = "Face detection on real photos"

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Setting:
    """How a 25 px crop is grown before detection."""

    upscale: int
    resample: str
    pad: float


def _skimage_data() -> Any:
    """``skimage.data`` (a dev dependency, untyped), imported only when measuring."""
    return importlib.import_module("skimage.data")


def lfw() -> tuple[np.ndarray, np.ndarray]:
    """``lfw_subset`` as uint8 (faces, non-faces); scikit-image returns floats in [0, 1]."""
    images = np.asarray(_skimage_data().lfw_subset())
    if images.dtype != np.uint8:
        images = np.clip(np.round(images.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return images[:100], images[100:]


def prepare(image: np.ndarray, setting: Setting) -> np.ndarray:
    """Pad ``image`` by ``pad`` of its side (edge replicated), then upscale it."""
    border = round(setting.pad * image.shape[0])
    if border:
        image = np.pad(image, border, mode="edge")
    if setting.upscale == 1:
        return image
    height, width = image.shape[:2]
    size = (width * setting.upscale, height * setting.upscale)
    return np.asarray(Image.fromarray(image).resize(size, RESAMPLE[setting.resample]))


def _counts(detector: FaceDetector, images: np.ndarray, setting: Setting) -> list[int]:
    return [len(detector.detect(prepare(image, setting))) for image in images]


def measure(
    detector: FaceDetector, faces: np.ndarray, non_faces: np.ndarray, setting: Setting
) -> dict[str, Any]:
    """Detection rate, false positives, boxes and ms per image for one setting."""
    t0 = time.perf_counter()
    on_faces = _counts(detector, faces, setting)
    on_non_faces = _counts(detector, non_faces, setting)
    elapsed = time.perf_counter() - t0
    side = (faces.shape[1] + 2 * round(setting.pad * faces.shape[1])) * setting.upscale
    return {
        "upscale": setting.upscale,
        "resample": setting.resample,
        "pad": setting.pad,
        "side_px": side,
        "faces": len(on_faces),
        "non_faces": len(on_non_faces),
        "face_rate": sum(n > 0 for n in on_faces) / max(len(on_faces), 1),
        "false_positive_rate": sum(n > 0 for n in on_non_faces) / max(len(on_non_faces), 1),
        "boxes_per_face": sum(on_faces) / max(len(on_faces), 1),
        "boxes_per_non_face": sum(on_non_faces) / max(len(on_non_faces), 1),
        "ms_per_image": 1000.0 * elapsed / max(len(on_faces) + len(on_non_faces), 1),
    }


def astronaut(detector: FaceDetector) -> dict[str, Any]:
    """The boxes found on ``skimage.data.astronaut()`` (one face, 512x512 RGB)."""
    image = np.asarray(_skimage_data().astronaut())
    t0 = time.perf_counter()
    boxes = detector.detect(image)
    ms = 1000.0 * (time.perf_counter() - t0)
    return {
        "size": [int(image.shape[1]), int(image.shape[0])],
        "boxes": [list(b) for b in boxes],
        "ms": ms,
    }


def settings_grid(upscales: list[int], resamples: list[str], pads: list[float]) -> list[Setting]:
    """Every combination; the resampling filter is moot (one row) at upscale 1."""
    out: list[Setting] = []
    for pad in pads:
        for upscale in upscales:
            for resample in resamples[:1] if upscale == 1 else resamples:
                out.append(Setting(upscale, resample, pad))
    return out


def run(settings: list[Setting], limit: int | None = None) -> dict[str, Any]:
    """Measure every setting on ``limit`` faces and ``limit`` non-faces (all 100 by default)."""
    import cv2

    faces, non_faces = lfw()
    if limit is not None:
        faces, non_faces = faces[:limit], non_faces[:limit]
    detector = FaceDetector()
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = [measure(detector, faces, non_faces, s) for s in settings]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "opencv": cv2.__version__,
        "opencv_threads": cv2.getNumThreads(),
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "detector": {
            "cascade": CASCADE,
            "scale_factor": getattr(detector, "scale_factor", None),
            "min_neighbors": getattr(detector, "min_neighbors", None),
            "min_size": getattr(detector, "min_size", None),
        },
        "rows": rows,
        "astronaut": astronaut(detector),
    }


def markdown(payload: dict[str, Any]) -> str:
    """The docs table: one row per setting, then the astronaut's box."""
    det = payload["detector"]
    lines = [
        f"Measured {payload['date']} on {payload['machine']} ({payload['cpus']} CPU cores, "
        f"shared; OpenCV {payload['opencv']} with {payload['opencv_threads']} threads; "
        f"load average {payload['load_before']} before the runs): `{payload['argv']}`. "
        f"Detector: `FaceDetector()` defaults (`{det['cascade']}`, scale factor "
        f"{det['scale_factor']}, {det['min_neighbors']} neighbours, {det['min_size']} px "
        "minimum). Crops are padded (edge replicated, `pad` times the side on each side), "
        "then upscaled; ms include padding and resizing.",
        "",
        "| pad | upscale | filter | side px | faces found | false positives "
        "| boxes / face | boxes / non-face | ms / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['pad']:g} | x{r['upscale']} | {r['resample'] if r['upscale'] > 1 else '-'} "
            f"| {r['side_px']} | {r['face_rate']:.0%} | {r['false_positive_rate']:.0%} "
            f"| {r['boxes_per_face']:.2f} | {r['boxes_per_non_face']:.2f} "
            f"| {r['ms_per_image']:.2f} |"
        )
    a = payload["astronaut"]
    boxes = ", ".join(f"`{tuple(b)}`" for b in a["boxes"]) or "none"
    lines += [
        "",
        f"`skimage.data.astronaut()` ({a['size'][0]}x{a['size'][1]} RGB, one face): "
        f"{len(a['boxes'])} box(es) (left, top, right, bottom): {boxes}, {a['ms']:.0f} ms.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--upscales", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--resamples", nargs="+", choices=sorted(RESAMPLE), default=list(RESAMPLE))
    p.add_argument("--pads", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--limit", type=int, default=None, help="faces and non-faces each (<= 100)")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON output path")
    p.add_argument("--docs", type=Path, default=DOCS, help="markdown file of the table")
    p.add_argument("--no-docs", action="store_true", help="do not edit the docs")
    args = p.parse_args(argv)
    if min(args.upscales) < 1 or min(args.pads) < 0 or (args.limit or 1) < 1:
        p.error("--upscales and --limit must be >= 1, --pads >= 0")
    payload = run(settings_grid(args.upscales, args.resamples, args.pads), args.limit)
    argv_text = " ".join(["python benchmarks/face_detection.py", *(argv or sys.argv[1:])])
    payload = {**payload, "argv": argv_text}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(payload)
    print(table)
    if not args.no_docs:
        replace_marked_block(args.docs, START, END, table, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
