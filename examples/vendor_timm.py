"""Vendor with a timm model: export it as a signed source package (issue 22).

Run: python examples/vendor_timm.py OUT_DIR [timm:NAME]
Writes OUT_DIR/package and OUT_DIR/vendor.key / vendor.pub. The manifest records
``timm:NAME``, the allowlisted ``timm.create_model`` options and the timm version;
customers rebuild the module with their own timm, offline (docs/package-format.md,
"timm architectures"). Here one training step on synthetic faces stands in for
the vendor's own training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import timm
import torch

from sourcefree.data.synthetic import CLASSES, generate
from sourcefree.export import source_package
from sourcefree.package import sign_package
from sourcefree.package.manifest import InputSpec
from sourcefree.package.signing import keygen
from sourcefree.vendor.training import to_tensor


def main(out: Path, name: str = "resnet10t", **options: Any) -> Path:
    spec = InputSpec(size=(32, 32))
    model = timm.create_model(name, pretrained=False, num_classes=len(CLASSES), **options)
    faces = generate("studio", 64, 32, seed=0)  # stands in for the vendor's private faces
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(
        model(to_tensor(faces.images, spec)), torch.from_numpy(faces.labels).long()
    )
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    package = out / "package"
    source_package(
        model.eval(),
        architecture=f"timm:{name}",
        architecture_options=options or None,  # e.g. {"img_size": 32, "patch_size": 4}
        labels=CLASSES,
        input_spec=spec,
        out=package,
        overwrite=True,
    )
    private_key, public_key = keygen(out / "vendor", overwrite=True)
    print(f"package {package} signed by {sign_package(package, private_key)}")
    print(f"give customers {package} and {public_key}; keep {private_key} secret")
    return package


if __name__ == "__main__":
    arch = sys.argv[2] if len(sys.argv) > 2 else "timm:resnet10t"
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "vendor-timm-out"), arch.removeprefix("timm:"))
