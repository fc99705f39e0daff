"""Vendor: train a model on your own (here: synthetic) faces and export a signed package.

Run: python examples/vendor_export.py OUT_DIR
Writes OUT_DIR/package (the source package) and OUT_DIR/vendor.key / vendor.pub.
Only weights, a graph and aggregate statistics leave; no image does. The
statistics include a calibration from held-out validation faces (accuracy and
two ATC thresholds), so that customers can estimate accuracy without labels
and the do-no-harm gate can compare the adapted model with yours.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sourcefree.data.synthetic import CLASSES, generate
from sourcefree.export import source_package
from sourcefree.manifest import InputSpec
from sourcefree.selection import calibrate
from sourcefree.signing import keygen, sign_package
from sourcefree.training import TrainConfig, class_feature_means, to_tensor, train_classifier


def main(out: Path, n: int = 2000, epochs: int = 4) -> Path:
    spec = InputSpec(size=(32, 32))
    faces = generate("studio", n, 32, seed=0)  # stands in for the vendor's private faces
    held_out = generate("studio", max(100, n // 4), 32, seed=1)  # never trained on
    model = train_classifier(
        faces.images, faces.labels, len(CLASSES), spec, TrainConfig(epochs=epochs)
    )
    stats = {
        "class_counts": np.bincount(faces.labels, minlength=len(CLASSES)).tolist(),
        "class_feature_means": class_feature_means(
            model, to_tensor(faces.images, spec), faces.labels, len(CLASSES)
        ),
        "calibration": calibrate(model, held_out.images, held_out.labels, spec).to_dict(),
    }
    package = out / "package"
    source_package(
        model,
        architecture="smallcnn",
        labels=CLASSES,
        input_spec=spec,
        out=package,
        source_stats=stats,
        name="fer-smallcnn",
        overwrite=True,
    )
    private_key, public_key = keygen(out / "vendor", overwrite=True)
    print(f"package {package} signed by {sign_package(package, private_key)}")
    print(f"give customers {package} and {public_key}; keep {private_key} secret")
    return package


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "vendor-out"))
