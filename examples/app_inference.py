"""Application: serve a package with onnxruntime only (no torch import anywhere).

Run: python examples/app_inference.py PACKAGE VENDOR.pub IMAGE [IMAGE ...]
"""

from __future__ import annotations

import sys

from sourcefree.runtime import Predictor


def main(package: str, public_key: str, images: list[str]) -> list[str]:
    # The signature must verify with the vendor's key before anything is parsed.
    predictor = Predictor(package, device="auto", public_key=public_key)
    print(f"serving {predictor.package.manifest.name} on {predictor.device}")
    result = predictor.predict(images)
    for path, label, probs in zip(images, result.labels, result.probabilities, strict=True):
        print(f"{path}: {label} ({probs.max():.2f})")
    return result.labels


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
