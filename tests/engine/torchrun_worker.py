"""One rank of ``adapt`` under torchrun, for tests/engine/test_torchrun.py (not collected).

``torchrun --standalone --nproc-per-node N tests/engine/torchrun_worker.py SPEC`` where
SPEC is a JSON object with the arguments of :func:`sourcefree.adapt` plus
``results`` (a folder for this test's per-rank summaries) and ``stop_at`` (rank 0
requests a stop after that global step of the first phase). Exits with the typed
error's code, as ``sourcefree adapt`` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sourcefree.engine import distributed
from sourcefree.engine.trainer import StepInfo
from sourcefree.errors import SourcefreeError
from sourcefree.pipeline.adaptation import AdaptRequest, adapt


def main(spec: dict[str, Any]) -> int:
    results = Path(spec.pop("results"))
    stop_at = spec.pop("stop_at", None)

    def on_step(info: StepInfo) -> None:
        if stop_at is not None and distributed.is_main() and info.global_step == stop_at:
            info.request_stop()

    try:
        result = adapt(
            AdaptRequest(spec.pop("packages"), spec.pop("data"), on_step=on_step, **spec)
        )
    except SourcefreeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    summary = {
        "rank": result.rank,
        "package_sha256": result.package.sha256,
        "report_world_size": result.report.world_size,
        "blobs": sorted(result.package.blobs),
    }
    (results / f"rank{result.rank}.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
