"""Vendor: train a model on your own (here: synthetic) faces and export a signed package.

Run: python examples/vendor_export.py OUT_DIR
Writes OUT_DIR/package (the source package) and OUT_DIR/vendor.key / vendor.pub.
Only weights, graphs and aggregate statistics leave; no image does. The
statistics include a calibration from held-out validation faces (accuracy and
two ATC thresholds), so that customers can estimate accuracy without labels
and the do-no-harm gate can compare the adapted model with yours.

The package also ships an action-unit (AU) detector and per-class AU frequencies,
which AdaFER (`sourcefree adapt ... -m adafer`) uses on site: the detector is
trained on the same faces' AU annotations (the synthetic faces carry ground-truth
AU intensities, ``faces.aus``), with generic robustness augmentation since it must
work on the customers' photos; the frequencies are the fraction of each class's
training faces whose AU the detector finds active (output >= 0.5), as in the
AdaFER paper (Sec. 3.2). Both are aggregates or weights: no face leaves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sourcefree.data.synthetic import AU_NAMES, CLASSES, generate
from sourcefree.export import source_package
from sourcefree.package import sign_package
from sourcefree.package.manifest import InputSpec
from sourcefree.package.signing import keygen
from sourcefree.pipeline.selection import calibrate
from sourcefree.vendor.training import (
    TrainConfig,
    au_frequencies,
    class_feature_means,
    detect_aus,
    to_tensor,
    train_au_detector,
    train_classifier,
)

#: An AU is active when the detector's output reaches this value (shipped in the manifest).
AU_THRESHOLD = 0.5


def main(out: Path, n: int = 2000, epochs: int = 4, au_detector: bool = True) -> Path:
    spec = InputSpec(size=(32, 32))
    faces = generate("studio", n, 32, seed=0)  # stands in for the vendor's private faces
    held_out = generate("studio", max(100, n // 4), 32, seed=1)  # never trained on
    model = train_classifier(
        faces.images, faces.labels, len(CLASSES), spec, TrainConfig(epochs=epochs)
    )
    x = to_tensor(faces.images, spec)
    stats = {
        "class_counts": np.bincount(faces.labels, minlength=len(CLASSES)).tolist(),
        "class_feature_means": class_feature_means(model, x, faces.labels, len(CLASSES)),
        "calibration": calibrate(model, held_out.images, held_out.labels, spec).to_dict(),
    }
    detector = None
    if au_detector:
        # AU annotations -> detector (sigmoid per AU; robust augmentation by default).
        detector = train_au_detector(
            faces.images, faces.aus, spec, TrainConfig(epochs=epochs, robust=True)
        )
        # Per-class frequencies of the AUs the detector finds on the training faces.
        found = detect_aus(detector, x)
        stats["au_frequencies"] = au_frequencies(
            found, faces.labels, len(CLASSES), threshold=AU_THRESHOLD
        )
    package = out / "package"
    source_package(
        model,
        architecture="smallcnn",
        labels=CLASSES,
        input_spec=spec,
        out=package,
        source_stats=stats,
        au_detector=detector,
        au_names=AU_NAMES if detector is not None else None,
        au_threshold=AU_THRESHOLD,
        name="fer-smallcnn",
        overwrite=True,
    )
    private_key, public_key = keygen(out / "vendor", overwrite=True)
    print(f"package {package} signed by {sign_package(package, private_key)}")
    print(f"give customers {package} and {public_key}; keep {private_key} secret")
    return package


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "vendor-out"))
