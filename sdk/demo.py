"""``sourcefree demo``: the product's path end to end on synthetic faces.

Vendor: synthesise ``studio`` faces, train the small CNN, export a package with
aggregate source statistics, create a key and sign. Customer: verify the
signature, hold private ``wild-mild`` photos. Application: serve the package
through the runtime (onnxruntime, no torch) and measure the domain shift.

Adaptation (CluP and the other methods) is not wired into the demo yet: the
demo says so in its output instead of pretending.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from sourcefree.fsutil import atomic_write_bytes

SIZE = 32
N_SOURCE = 5000
N_SOURCE_VAL = 1000
N_TARGET = 2000


def _accuracy(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[str, float]:
    recalls = [
        float((pred[truth == c] == c).mean()) for c in range(num_classes) if (truth == c).any()
    ]
    return {
        "accuracy": round(float((pred == truth).mean()), 4),
        "mean_class_recall": round(float(np.mean(recalls)), 4),
    }


def run_demo(out: Path, *, overwrite: bool = True, seed: int = 0) -> dict[str, Any]:
    """Run the demo into ``out``; return the report that is written to ``out/report.json``."""
    import torch

    from sourcefree.data.synthetic import CLASSES, generate, write_domain
    from sourcefree.export import source_package
    from sourcefree.fsutil import check_output_dir
    from sourcefree.manifest import InputSpec
    from sourcefree.package import load_package
    from sourcefree.runtime import Predictor
    from sourcefree.signing import keygen, sign_package
    from sourcefree.training import (
        TrainConfig,
        class_feature_means,
        predict_logits,
        to_tensor,
        train_classifier,
    )

    out = out.absolute()
    check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    t0 = time.perf_counter()
    labels = list(CLASSES)
    spec = InputSpec(size=(SIZE, SIZE))

    click.echo(f"[vendor] synthesising {N_SOURCE} 'studio' faces and training a small CNN ...")
    train = generate("studio", N_SOURCE, SIZE, seed=seed)
    val = generate("studio", N_SOURCE_VAL, SIZE, seed=seed + 1000)
    model = train_classifier(train.images, train.labels, len(labels), spec, TrainConfig(seed=seed))
    val_pred = predict_logits(model, to_tensor(val.images, spec)).argmax(1).numpy()
    val_metrics = _accuracy(val_pred, val.labels, len(labels))
    click.echo(f"[vendor] source validation accuracy {val_metrics['accuracy']:.3f}")

    counts = np.bincount(train.labels, minlength=len(labels)).tolist()
    means = class_feature_means(model, to_tensor(train.images, spec), train.labels, len(labels))
    pkg_dir = out / "vendor-package"
    source_package(
        model,
        architecture="smallcnn",
        labels=labels,
        input_spec=spec,
        out=pkg_dir,
        source_stats={"class_counts": counts, "class_feature_means": means},
        name="fer-smallcnn",
        overwrite=True,
    )
    key_base = out / "vendor-key"
    for suffix in (".key", ".pub"):
        key_base.with_name(key_base.name + suffix).unlink(missing_ok=True)
    priv, pub = keygen(key_base)
    signer = sign_package(pkg_dir, priv)
    click.echo(f"[vendor] exported and signed {pkg_dir.name} ({signer})")

    pkg = load_package(pkg_dir, public_key=pub, require_signature=True)
    click.echo(f"[customer] signature verified; package sha256 {pkg.sha256[:16]}")
    photos = out / "customer-photos"
    write_domain(photos, "wild-mild", N_TARGET, SIZE, seed=seed + 2000, overwrite=True)
    target = generate("wild-mild", N_TARGET, SIZE, seed=seed + 2000)

    predictor = Predictor(pkg, device="auto")
    files = sorted(p for p in photos.iterdir() if p.suffix == ".png")
    done, failed = predictor.predict_paths(files)
    name_to_index = {label: i for i, label in enumerate(labels)}
    by_name = {p.name: name_to_index[label] for p, label, _ in done}
    truth = _labels_csv(photos / "labels.csv", name_to_index)
    names = sorted(by_name)
    runtime_metrics = _accuracy(
        np.array([by_name[n] for n in names]), np.array([truth[n] for n in names]), len(labels)
    )
    torch_pred = predict_logits(model, to_tensor(target.images, spec)).argmax(1).numpy()
    torch_metrics = _accuracy(torch_pred, target.labels, len(labels))
    elapsed = time.perf_counter() - t0

    report: dict[str, Any] = {
        "source_validation": val_metrics,
        "source_only": {**runtime_metrics, "domain": "wild-mild", "images": len(done)},
        "source_only_torch": torch_metrics,
        "adapted": None,
        "note": "adaptation is not part of this demo yet; it runs the vendor-to-runtime path",
        "runtime_device": predictor.device,
        "skipped_images": len(failed),
        "seconds": round(elapsed, 1),
    }
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    click.echo("")
    click.echo(f"{'model':34s} {'data':12s} {'accuracy':>9s} {'mean recall':>12s}")
    click.echo(
        f"{'source (torch, vendor side)':34s} {'studio val':12s} "
        f"{val_metrics['accuracy']:9.3f} {val_metrics['mean_class_recall']:12.3f}"
    )
    click.echo(
        f"{'source package (onnxruntime)':34s} {'wild-mild':12s} "
        f"{runtime_metrics['accuracy']:9.3f} {runtime_metrics['mean_class_recall']:12.3f}"
    )
    click.echo("")
    click.echo(
        "NOTE: this demo runs the vendor -> package -> runtime path only; on-site "
        "adaptation (CluP) is not wired in yet, so no adapted model is reported."
    )
    click.echo(f"report: {out / 'report.json'}  ({elapsed:.0f} s)")
    return report


def _labels_csv(path: Path, index: dict[str, int]) -> dict[str, int]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    key = "path" if rows and "path" in rows[0] else next(iter(rows[0]))
    return {
        Path(r[key]).name: index[r["label"]] if r["label"] in index else int(r["label"])
        for r in rows
    }
