"""``sourcefree demo``: the product's main job end to end on synthetic faces.

Vendor: synthesise ``studio`` faces, train the small CNN, export a package with
aggregate source statistics, create a key and sign. Customer: verify the
signature, adapt the package on site to private ``wild-mild`` photos (CluP by
default; the photos' labels judge the run afterwards, so ``adapted/report.html``
shows accuracy), evaluate source and adapted packages. Application: serve the adapted
package through the runtime (onnxruntime, no torch).
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


def run_demo(
    out: Path, *, overwrite: bool = True, seed: int = 0, method: str = "clup"
) -> dict[str, Any]:
    """Run the demo into ``out``; return the report written to ``out/report.json``."""

    from sourcefree.data.synthetic import write_domain
    from sourcefree.fsutil import check_output_dir
    from sourcefree.package.loader import load_package
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt
    from sourcefree.runtime.evaluation import evaluate
    from sourcefree.runtime.predictor import Predictor

    out = out.absolute()
    check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pkg_dir, pub, val_acc = _vendor_side(out, seed)
    pkg = load_package(pkg_dir, public_key=pub, require_signature=True)
    click.echo(f"[customer] signature verified; package sha256 {pkg.sha256[:16]}")
    photos = out / "customer-photos"
    write_domain(photos, "wild-mild", N_TARGET, SIZE, seed=seed + 2000, overwrite=True)
    # Labels of the customer's photos exist here only to score the demo; they are
    # kept outside the folder that adaptation reads.
    labels_csv = out / "customer-labels.csv"
    (photos / "labels.csv").replace(labels_csv)
    _relative_paths(labels_csv, photos)
    source_metrics = evaluate(pkg, photos, labels_csv)

    click.echo(f"[customer] adapting on site with {method} ...")
    t_adapt = time.perf_counter()
    result = adapt(
        AdaptRequest(
            pkg,
            photos,
            method=method,
            out=out / "adapted",
            overwrite=True,
            seed=seed,
            progress=True,
            # Judged after the run, for the report only: labels never reach the method.
            eval_labels=labels_csv,
        )
    )
    adapt_seconds = time.perf_counter() - t_adapt
    gate = result.report.to_dict()["gate"]
    click.echo(f"[customer] do-no-harm gate: exported the {gate['decision']} model")
    adapted_metrics = evaluate(result.package, photos, labels_csv)

    predictor = Predictor(result.package, device="auto")
    sample = sorted(photos.glob("*.png"))[:4]
    served = predictor.predict(sample)
    click.echo(f"[application] served {len(sample)} photos on {predictor.device}: {served.labels}")
    elapsed = time.perf_counter() - t0

    report: dict[str, Any] = {
        "source_validation": {"accuracy": round(val_acc, 4)},
        "source_only": {
            "accuracy": round(source_metrics.accuracy, 4),
            "mean_class_recall": round(source_metrics.mean_class_recall, 4),
            "domain": "wild-mild",
            "images": source_metrics.images,
        },
        "adapted": {
            "method": method,
            "accuracy": round(adapted_metrics.accuracy, 4),
            "mean_class_recall": round(adapted_metrics.mean_class_recall, 4),
            "adapt_seconds": round(adapt_seconds, 1),
            "exported": gate["decision"],
        },
        "runtime_device": predictor.device,
        "seconds": round(elapsed, 1),
    }
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    click.echo("")
    click.echo(f"{'model':30s} {'data':12s} {'accuracy':>9s} {'mean recall':>12s}")
    click.echo(f"{'source (vendor validation)':30s} {'studio':12s} {val_acc:9.3f}")
    exported = f"adapted ({method})" if gate["decision"] == "adapted" else "exported (gate: source)"
    for name, m in (("source package", source_metrics), (exported, adapted_metrics)):
        click.echo(f"{name:30s} {'wild-mild':12s} {m.accuracy:9.3f} {m.mean_class_recall:12.3f}")
    click.echo(f"report: {out / 'report.json'}  ({elapsed:.0f} s)")
    click.echo(f"adaptation report (open in a browser): {result.out / 'report.html'}")
    return report


def _vendor_side(out: Path, seed: int) -> tuple[Path, Path, float]:
    """The vendor: train on 'studio' faces, export with aggregate stats, sign.

    Returns the package folder, the public key and the source validation accuracy.
    """
    from sourcefree.data.synthetic import CLASSES, generate
    from sourcefree.export import source_package
    from sourcefree.package.loader import sign_package
    from sourcefree.package.manifest import InputSpec
    from sourcefree.package.signing import keygen
    from sourcefree.pipeline.selection import calibrate
    from sourcefree.vendor.training import (
        TrainConfig,
        class_feature_means,
        predict_logits,
        to_tensor,
        train_classifier,
    )

    labels = list(CLASSES)
    spec = InputSpec(size=(SIZE, SIZE))
    click.echo(f"[vendor] synthesising {N_SOURCE} 'studio' faces and training a small CNN ...")
    train = generate("studio", N_SOURCE, SIZE, seed=seed)
    val = generate("studio", N_SOURCE_VAL, SIZE, seed=seed + 1000)
    model = train_classifier(train.images, train.labels, len(labels), spec, TrainConfig(seed=seed))
    val_pred = predict_logits(model, to_tensor(val.images, spec)).argmax(1).numpy()
    val_acc = float((val_pred == val.labels).mean())
    click.echo(f"[vendor] source validation accuracy {val_acc:.3f}")
    # ATC thresholds from the validation images: label-free accuracy estimates on site.
    calibration = calibrate(model, val.images, val.labels, spec).to_dict()

    counts = np.bincount(train.labels, minlength=len(labels)).tolist()
    means = class_feature_means(model, to_tensor(train.images, spec), train.labels, len(labels))
    pkg_dir = out / "vendor-package"
    source_package(
        model,
        architecture="smallcnn",
        labels=labels,
        input_spec=spec,
        out=pkg_dir,
        source_stats={
            "class_counts": counts,
            "class_feature_means": means,
            "calibration": calibration,
        },
        name="fer-smallcnn",
        overwrite=True,
    )
    priv, pub = keygen(out / "vendor-key", overwrite=True)
    signer = sign_package(pkg_dir, priv)
    click.echo(f"[vendor] exported and signed {pkg_dir.name} ({signer})")

    return pkg_dir, pub, val_acc


def _relative_paths(labels_csv: Path, photos: Path) -> None:
    """Rewrite the labels CSV so its paths are relative to the CSV's own folder."""
    import csv
    import io

    with open(labels_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(rows[0])
    for path, label in rows[1:]:
        writer.writerow([f"{photos.name}/{path}", label])
    atomic_write_bytes(labels_csv, buf.getvalue().encode("utf-8"))
