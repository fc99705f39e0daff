"""Customer: verify a vendor's package, adapt it on site to unlabelled faces, export.

Run: python examples/customer_adapt.py PACKAGE VENDOR_PUB FACES_DIR OUT_DIR [METHOD]

PACKAGE is the vendor's signed package (examples/vendor_export.py writes one),
FACES_DIR a folder of your unlabelled face images (read recursively), METHOD a
registered method (`sourcefree methods`; default clup). Writes OUT_DIR/package
(the adapted package, signed with a site key: OUT_DIR/site.key stays on site,
OUT_DIR/site.pub goes to your applications) and OUT_DIR/report.json + report.html
(aggregates only).
Nothing leaves the machine: no image, feature, centroid or path is exported.

Without private faces at hand, make a stand-in folder first:
    sourcefree synth faces/ --domain wild-mild
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sourcefree import AdaptRequest, adapt
from sourcefree.package import sign_package
from sourcefree.package.loader import load_package
from sourcefree.package.signing import keygen


def main(
    package: str,
    vendor_pub: str,
    faces: str,
    out: str,
    method: str = "clup",
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    # 1. Refuse anything the vendor did not sign (hashes and the Ed25519 signature).
    source = load_package(package, public_key=vendor_pub, require_signature=True)
    print(f"verified {source.manifest.name} {source.manifest.version} ({source.sha256[:12]})")
    # 2. Adapt on site. Interrupted runs continue with the same request and resume=True.
    request = AdaptRequest(
        source, faces, method=method, out=out, overrides=overrides, progress=True
    )
    result = adapt(request)
    # 3. Sign the adapted package with the site's own key for its applications.
    private_key, public_key = keygen(Path(out) / "site", overwrite=True)
    sign_package(result.out / "package", private_key)
    print(f"adapted package: {result.out / 'package'} (signed; applications verify {public_key})")
    print(f"report:          {result.out / 'report.json'} (and report.html)")
    return result.report.to_dict()


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    pkg, pub, faces_dir, out_dir = sys.argv[1:5]
    main(pkg, pub, faces_dir, out_dir, sys.argv[5] if len(sys.argv) == 6 else "clup")
