"""Images per second of a full SwAV warm-up step of the demo's model, and where the time goes.

One step is what CluP's ``warm-up`` phase does per batch (``adapters/clup.py``):

* ``load``: gather the batch's uint8 images and normalise them (``TargetData.tensor``),
  then move them to the device;
* ``augment``: the multi-crop views (2 global + 4 local crops, batched tensor ops);
* ``forward``: backbone + projection head + prototypes for every crop;
* ``loss+backward``: the fused Sinkhorn + swapped-prediction loss
  (``sourcefree.kernels.swav_loss``), the backward pass through prototypes, head
  and backbone, and the SGD step.

Every stage is timed inside the same steps (CUDA-synchronised on GPU), so the stage
shares and the end-to-end images/s come from one run. The bottleneck is the stage
with the largest share. The model is the demo's (``smallcnn``, 32 px, 7 classes);
the images are ``wild-mild`` synthetic faces. A GPU row is written only when CUDA is
present; it is never estimated.

    python benchmarks/ssl_throughput.py [--steps 20] [--batch-size 128] [--threads 2]

Writes ``benchmarks/results/ssl_throughput.json`` and the "## SwAV step throughput"
section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sourcefree.adapters.clup import CluP, CluPConfig, multi_crop
from sourcefree.data.synthetic import CLASSES, generate
from sourcefree.engine.method import MethodContext, SourceModel, TargetData
from sourcefree.engine.models import build_classifier, load_classifier
from sourcefree.export import source_package
from sourcefree.fsutil import replace_marked_block
from sourcefree.kernels import swav_loss
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ssl_throughput.json"
DOCS = ROOT / "docs" / "benchmarks.md"
START = "<!-- ssl-throughput:start -->"
END = "<!-- ssl-throughput:end -->"
STAGES = ("load", "augment", "forward", "loss+backward")
SIZE = 32


def _now(device: torch.device) -> float:
    """A timestamp after all queued device work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def build(device: torch.device, n_images: int, seed: int, workdir: Path) -> tuple[CluP, TargetData]:
    """A CluP instance on ``device`` with the demo's model and synthetic target images.

    The weights are random (throughput does not depend on them); they are exported
    as a source package because the method reads the architecture from it.
    """
    spec = InputSpec(size=(SIZE, SIZE))
    torch.manual_seed(seed)
    model = build_classifier("smallcnn", len(CLASSES)).eval()
    out = workdir / "source"
    source_package(model, architecture="smallcnn", labels=list(CLASSES), input_spec=spec, out=out)
    pkg = load_package(out)
    target = generate("wild-mild", n_images, SIZE, seed=seed)
    data = TargetData(images=target.images, spec=spec, fingerprint="ssl-throughput")
    source = SourceModel(pkg, load_classifier(pkg.manifest.architecture, pkg.weights_bytes))
    source.model.to(device)
    method = CluP(CluPConfig(), MethodContext((source,), data, device, seed))
    return method, data


def measure(
    device: torch.device, steps: int, warmup: int, batch_size: int, seed: int = 0
) -> dict[str, Any]:
    """Time ``steps`` SwAV steps (after ``warmup``) stage by stage."""
    with tempfile.TemporaryDirectory() as tmp:
        method, data = build(device, max(4 * batch_size, 512), seed, Path(tmp))
    ssl = method.config.ssl
    method.model.train()
    method.projector.train()
    params = [
        *method.model.backbone.parameters(),
        *method.projector.parameters(),
        *method.prototypes.parameters(),
    ]
    opt = torch.optim.SGD(params, lr=ssl.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    totals: list[float] = []

    for step in range(warmup + steps):
        marks = [_now(device)]
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x = data.tensor(idx).to(device)
        marks.append(_now(device))
        high, low = multi_crop(x.cpu(), gen, method._mean, method._std, ssl)
        high = [h.to(device) for h in high]
        low = [v.to(device) for v in low]
        marks.append(_now(device))
        with torch.no_grad():
            method.prototypes.normalize()  # type: ignore[operator]
        zh, zl = method._embed_groups(high, low)
        p_high = [method.prototypes(z, 1) for z in zh]
        p_low = [method.prototypes(z, 1) for z in zl]
        marks.append(_now(device))
        loss = swav_loss(
            p_high,
            p_low,
            None,
            temperature=ssl.temperature,
            epsilon=ssl.epsilon,
            iterations=ssl.sinkhorn_iterations,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        marks.append(_now(device))
        if step >= warmup:
            for stage, a, b in zip(STAGES, marks, marks[1:], strict=False):
                times[stage].append(b - a)
            totals.append(marks[-1] - marks[0])

    medians = {s: statistics.median(v) for s, v in times.items()}
    total = statistics.median(totals)
    share = {s: medians[s] / sum(medians.values()) for s in STAGES}
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": batch_size,
        "steps": steps,
        "crops": f"{ssl.global_crops} x {SIZE} px + {ssl.local_crops} x "
        f"{round(SIZE * ssl.local_size_ratio)} px",
        "median_step_s": round(total, 5),
        "images_per_s": round(batch_size / total, 1),
        "stage_median_s": {s: round(v, 5) for s, v in medians.items()},
        "stage_share": {s: round(v, 3) for s, v in share.items()},
        "bottleneck": max(share, key=lambda s: share[s]),
    }


def markdown(payload: dict[str, Any]) -> str:
    """The table of the "## SwAV step throughput" section."""
    lines = [
        f"`python benchmarks/ssl_throughput.py {payload['argv']}`: one CluP SwAV warm-up "
        f"step of the demo's `smallcnn` ({SIZE} px), median over "
        f"{payload['rows'][0]['steps']} steps after warm-up, torch {payload['torch']}, "
        f"{payload['threads']} CPU threads. Share = the stage's median / sum of medians.",
        "",
        "| device | batch | crops | images/s | load | augment | forward | loss+backward "
        "| bottleneck |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        sh = r["stage_share"]
        lines.append(
            f"| {r['device_name']} | {r['batch_size']} | {r['crops']} | {r['images_per_s']:.0f} | "
            + " | ".join(f"{100 * sh[s]:.0f} %" for s in STAGES)
            + f" | {r['bottleneck']} |"
        )
    if not any(r["device"] == "cuda" for r in payload["rows"]):
        lines.append("| GPU | - | - | - | - | - | - | - | no GPU was available in this run |")
    return "\n".join(lines)


def write_docs(block: str) -> None:
    """Replace this benchmark's block in docs/benchmarks.md, leaving other sections alone."""
    replace_marked_block(DOCS, START, END, block, "SwAV step throughput")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=20, help="timed steps per device")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (CluP: 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for dev in devices:
        row = measure(dev, args.steps, args.warmup, args.batch_size)
        print(json.dumps(row), flush=True)
        rows.append(row)
    payload = {
        "benchmark": "ssl_throughput",
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    block = markdown(payload)
    print(block)
    if not args.no_docs:
        write_docs(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
