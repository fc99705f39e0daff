"""The GPU check (issue 19): the one command to run on a lent GPU machine.

``benchmarks/gpu_check.sh`` calls this driver. In order, each step in a fresh
process, everything under ``--out`` (``$OUT``):

1. install the project without network (``.whl/*.whl`` first, then
   ``pip install --no-index --no-deps --no-build-isolation .``);
2. ``pytest -m gpu`` on the kernel, trainer and clustering tests (junit XML);
3. ``benchmarks/kernels.py`` on CUDA: eager vs ``torch.compile`` vs Triton, with the
   fraction of the roofline from ceilings measured in the same run;
4. end to end: ``sourcefree adapt`` with ``shot`` and ``clup`` (short schedules) on
   synthetic images (``sourcefree synth``): CUDA with bf16 autocast, CUDA without
   it, and the machine's CPU cores; images/s per phase from report.json, and
   whether bf16 and fp32 accuracies agree within 0.01;
5. the runtime: onnxruntime's CUDA provider when it works there, else a line
   saying it was not available (never CPU numbers under a GPU heading).

``--dry-run`` runs the same steps on the CPU at toy sizes and writes an explicit
``skipped: ...`` status for every step that needs CUDA. Output: ``summary.json``,
``summary.md``, ``gpu_check.log`` (every command's output), ``pytest.xml`` and
``kernels.json``: at most 8 files, none in a subfolder, as the device tool fetches
them. A wall-clock budget (``--budget-s``, default 460 s) skips what would not fit,
with a ``skipped: time budget`` status. This file imports no sourcefree code at the
top: the install step runs before anything needs it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "skipped: no CUDA"
ACCURACY_TOLERANCE = 0.01
METHOD_SETS = {
    "full": {
        "shot": ["epochs=2"],
        "clup": ["ssl.epochs=1", "finetune.epochs=2", "kmeans_n_init=1"],
    },
    # The CPU comparison runs the same phases once (rates per phase are per image).
    "cpu": {
        "shot": ["epochs=1"],
        "clup": ["ssl.epochs=1", "finetune.epochs=1", "kmeans_n_init=1"],
    },
    "dry": {
        "shot": ["epochs=1", "batch_size=32"],
        "clup": [
            "ssl.epochs=1",
            "ssl.batch_size=64",
            "ssl.hidden_dim=64",
            "finetune.epochs=1",
            "kmeans_n_init=1",
            "kmeans_max_iter=20",
        ],
    },
}


@dataclass
class Check:
    """Shared state of one GPU check: where things go, the clock and the results."""

    out: Path
    work: Path
    dry_run: bool
    budget_s: float
    python: str = sys.executable
    started: float = field(default_factory=time.monotonic)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.out / "gpu_check.log"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def run(
        self, args: Sequence[str], timeout: float, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        """Run a command, its output appended to the log: (exit code, stdout, output tail)."""
        limit = max(1.0, min(timeout, self.left()))
        with self.log.open("a", encoding="utf-8") as log:
            log.write(f"\n$ {' '.join(args)}\n")
            log.flush()
            try:
                proc = subprocess.run(
                    list(args),
                    cwd=ROOT,
                    env={**os.environ, "ORT_DISABLE_TELEMETRY": "1", **(env or {})},
                    capture_output=True,
                    text=True,
                    timeout=limit,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                text = _text(exc.stdout) + _text(exc.stderr)
                log.write(text + f"\n[timed out after {limit:.0f} s]\n")
                return 124, _text(exc.stdout), text[-2000:]
            text = proc.stdout + proc.stderr
            log.write(text + f"\n[exit {proc.returncode}]\n")
        return proc.returncode, proc.stdout, text[-2000:]


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _python_probe(check: Check) -> dict[str, Any]:
    """Versions and devices as the (installed) interpreter sees them."""
    code = (
        "import json, importlib.util as u, torch\n"
        "v = lambda m: (__import__(m).__version__ if u.find_spec(m) else None)\n"
        "ort = None\n"
        "if u.find_spec('onnxruntime'):\n"
        "    import onnxruntime as o; ort = [o.__version__, o.get_available_providers()]\n"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(),\n"
        "  'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,\n"
        "  'triton': v('triton'), 'onnxruntime': ort, 'lightly': v('lightly'),\n"
        "  'cryptography': v('cryptography'), 'sourcefree': v('sourcefree')}))\n"
    )
    rc, stdout, text = check.run([check.python, "-c", code], 120)
    if rc != 0:
        return {"error": text[-500:]}
    info: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return info


def step_install(check: Check) -> dict[str, Any]:
    """Wheels from .whl/ (packages the GPU image lacks), then the project itself, offline."""
    if check.dry_run:
        return {"status": "skipped: dry run uses the current environment"}
    pip = [check.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    result: dict[str, Any] = {"wheels": [Path(w).name for w in wheels]}
    if wheels:
        rc, _, text = check.run([*pip, "--no-cache-dir", "--no-compile", *wheels], 300)
        if rc != 0:
            return {**result, "status": f"failed: wheels (exit {rc})", "tail": text[-800:]}
    rc, _, text = check.run([*pip, "--no-build-isolation", "--no-cache-dir", str(ROOT)], 300)
    if rc != 0:
        return {**result, "status": f"failed: project (exit {rc})", "tail": text[-800:]}
    return {**result, "status": "ok"}


def step_pytest(check: Check, cuda: bool) -> dict[str, Any]:
    """``pytest -m gpu`` on the tests that have GPU cases; counts from the junit XML."""
    if not cuda:
        return {"status": NO_CUDA}
    xml = check.out / "pytest.xml"
    paths = ["tests/kernels", "tests/engine/test_amp_switch.py", "tests/test_clustering.py"]
    args = [check.python, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", *paths]
    args += ["-o", "addopts=--import-mode=importlib -p no:cacheprovider", f"--junitxml={xml}"]
    rc, _, text = check.run(args, 300)
    counts = _junit_counts(xml)
    status = "ok" if rc == 0 else f"failed (exit {rc})"
    return {"status": status, **counts, "tail": text[-1500:]}


def _junit_counts(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    keys = ("tests", "failures", "errors", "skipped")
    return {k: int(suite.get(k, "0")) for k in keys}


def step_kernels(check: Check, cuda: bool) -> dict[str, Any]:
    """benchmarks/kernels.py: CUDA at full size, or tiny shapes on the CPU in a dry run."""
    out = check.out / "kernels.json"
    args = [check.python, "benchmarks/kernels.py", "--out", str(out)]
    if check.dry_run or not cuda:
        args += ["--device", "cpu", "--tiny", "--no-compile"]
    else:
        args += ["--device", "cuda", "--reps", "3"]
    rc, _, text = check.run(args, 150)
    if not out.is_file():
        return {"status": f"failed (exit {rc})", "tail": text[-1500:]}
    data = json.loads(out.read_text(encoding="utf-8"))
    done = "ok" if rc == 0 else f"failed (exit {rc}; the rows measured before are kept)"
    result: dict[str, Any] = {
        "status": done if cuda or rc != 0 else f"ok on the CPU ({NO_CUDA})",
        "ceilings": data["meta"]["ceilings"],
        "matmul_precision": data["meta"]["matmul_precision"],
        "rows": data["rows"],
        "markdown": data["markdown"],
    }
    return result


def make_source(out: Path, images: int, epochs: int, seed: int = 0) -> None:
    """Train the demo's smallcnn on synthetic ``studio`` faces and export a source package."""
    import numpy as np

    from sourcefree.data.synthetic import CLASSES, generate
    from sourcefree.export import source_package
    from sourcefree.package.manifest import InputSpec
    from sourcefree.vendor.training import (
        TrainConfig,
        class_feature_means,
        to_tensor,
        train_classifier,
    )

    spec = InputSpec(size=(32, 32))
    train = generate("studio", images, 32, seed=seed)
    cfg = TrainConfig(epochs=epochs, seed=seed)
    model = train_classifier(train.images, train.labels, len(CLASSES), spec, cfg)
    counts = np.bincount(train.labels, minlength=len(CLASSES)).tolist()
    means = class_feature_means(model, to_tensor(train.images, spec), train.labels, len(CLASSES))
    source_package(
        model,
        architecture="smallcnn",
        labels=list(CLASSES),
        input_spec=spec,
        out=out,
        source_stats={"class_counts": counts, "class_feature_means": means},
        name="gpu-check-smallcnn",
        overwrite=True,
    )


def _target(check: Check, images: int) -> tuple[Path, Path] | str:
    """``sourcefree synth`` in parallel shards under one folder; one labels CSV beside it."""
    data, labels = check.work / "target", check.work / "target-labels.csv"
    shards = max(1, min(8, (os.cpu_count() or 1), images // 100))
    rows: list[list[str]] = []
    procs = []
    for i in range(shards):
        n = images // shards + (1 if i < images % shards else 0)
        args = [check.python, "-m", "sourcefree", "synth", str(data / f"s{i}")]
        args += ["--domain", "wild-mild", "--n", str(n), "--seed", str(100 + i)]
        pipe = subprocess.PIPE
        procs.append(subprocess.Popen(args, cwd=ROOT, stdout=pipe, stderr=subprocess.STDOUT))
    for i, proc in enumerate(procs):
        text, _ = proc.communicate(timeout=max(1.0, check.left()))
        with check.log.open("a", encoding="utf-8") as log:
            log.write(_text(text))
        if proc.returncode != 0:
            return f"failed: synth shard {i} (exit {proc.returncode})"
        shard_csv = data / f"s{i}" / "labels.csv"
        with shard_csv.open(newline="", encoding="utf-8") as fh:
            rows += [[f"s{i}/{p}", lab] for p, lab in list(csv.reader(fh))[1:]]
        shard_csv.unlink()  # labels stay outside the folder that adaptation reads
    with labels.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["path", "label"], *rows])
    return data, labels


def _adapt_run(
    check: Check, pkg: Path, data: Path, labels: Path, method: str, device: str, amp: str
) -> dict[str, Any]:
    out = check.work / f"{method}-{device}-{amp}"
    sets = METHOD_SETS["dry" if check.dry_run else "cpu" if device == "cpu" else "full"][method]
    args = [check.python, "-m", "sourcefree", "adapt", str(pkg), str(data), "-m", method]
    args += ["-o", str(out), "--device", device, "--amp", amp]
    args += ["--no-progress", "--no-gate", "--overwrite"]
    if device == "cuda" or check.dry_run:  # accuracy: bf16 vs fp32 (the CPU run only times)
        args += ["--eval-labels", str(labels)]
    for s in sets:
        args += ["--set", s]
    t0 = time.monotonic()
    rc, _, text = check.run(args, 400)
    row: dict[str, Any] = {"method": method, "device": device, "amp_requested": amp}
    row["wall_s"] = round(time.monotonic() - t0, 1)
    if rc != 0 or not (out / "report.json").is_file():
        return {**row, "status": f"failed (exit {rc})", "tail": text[-1200:]}
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    row.update(
        status="ok",
        amp=report.get("amp"),
        memory_format=report.get("memory_format"),
        accuracy=report.get("evaluation", {}).get("adapted", {}).get("accuracy"),
        timings_s=report.get("timings_s"),
        phases=[
            {k: p.get(k) for k in ("name", "images", "seconds", "images_per_s")}
            for p in report.get("phases", [])
        ],
    )
    shutil.rmtree(out, ignore_errors=True)
    return row


def compare_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: CUDA/CPU speed-up per phase, and bf16 vs fp32 accuracy within 0.01."""
    rows: list[dict[str, Any]] = []
    for method in sorted({r["method"] for r in runs}):

        def get(device: str, amp: str, m: str = method) -> dict[str, Any] | None:
            for r in runs:
                ok = r.get("status") == "ok"
                if ok and r["method"] == m and r["device"] == device and r["amp_requested"] == amp:
                    return r
            return None

        bf16, fp32, cpu = get("cuda", "auto"), get("cuda", "off"), get("cpu", "auto")
        row: dict[str, Any] = {"method": method}
        if bf16 is not None and fp32 is not None:
            a, b = bf16["accuracy"], fp32["accuracy"]
            row["bf16_accuracy"], row["fp32_accuracy"] = a, b
            if a is None or b is None:
                row["accuracy_check"] = "no accuracy in a report"
            else:
                ok = abs(a - b) <= ACCURACY_TOLERANCE
                row["accuracy_check"] = f"{'pass' if ok else 'FAIL'}: |{a:.4f} - {b:.4f}|"
        else:
            row["accuracy_check"] = "skipped: needs both CUDA runs"
        if bf16 is not None and cpu is not None:
            cpu_rate = {p["name"]: p["images_per_s"] for p in cpu["phases"]}
            row["speedup_per_phase"] = {
                p["name"]: round(p["images_per_s"] / cpu_rate[p["name"]], 2)
                for p in bf16["phases"]
                if p.get("images_per_s") and cpu_rate.get(p["name"])
            }
        rows.append(row)
    return rows


def step_e2e(check: Check, cuda: bool) -> dict[str, Any]:
    """Source package, synthetic target, then each method on CUDA (bf16, fp32) and CPU."""
    images = 200 if check.dry_run else 20000
    pkg = check.work / "source-pkg"
    epochs, n_src = (1, 200) if check.dry_run else (3, 3000)
    code = "import sys, pathlib; sys.path.insert(0, 'benchmarks'); import gpu_check as g; "
    code += f"g.make_source(pathlib.Path({str(pkg)!r}), {n_src}, {epochs})"
    rc, _, text = check.run([check.python, "-c", code], 300)
    if rc != 0:
        return {"status": f"failed: source package (exit {rc})", "tail": text[-1200:]}
    target = _target(check, images)
    if isinstance(target, str):
        return {"status": target}
    data, labels = target
    runs: list[dict[str, Any]] = []
    for method in ("shot", "clup"):
        for device, amp in (("cuda", "auto"), ("cuda", "off"), ("cpu", "auto")):
            base = {"method": method, "device": device, "amp_requested": amp}
            if device == "cuda" and not cuda:
                runs.append({**base, "status": NO_CUDA})
            elif check.left() < 60:  # keep time for the runtime step
                runs.append({**base, "status": f"skipped: time budget ({check.left():.0f} s left)"})
            else:
                runs.append(_adapt_run(check, pkg, data, labels, method, device, amp))
    failed = [r for r in runs if str(r["status"]).startswith("failed")]
    return {
        "status": "ok" if not failed else f"failed: {len(failed)} run(s)",
        "images": images,
        "cpu_threads": os.cpu_count(),
        "sets": {k: METHOD_SETS[k] for k in (("dry",) if check.dry_run else ("full", "cpu"))},
        "runs": runs,
        "comparison": compare_runs(runs),
    }


RUNTIME_CODE = """
import json, sys, time, numpy as np, onnxruntime as ort
from sourcefree.errors import SourcefreeError
from sourcefree.runtime.predictor import Predictor
pkg, batch = sys.argv[1], np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), np.uint8)
out = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
for dev in ("cuda", "cpu"):
    try:
        p = Predictor(pkg, device=dev)
    except SourcefreeError as exc:
        out[dev] = {"status": "not available: " + str(exc)[:300]}
        continue
    p.predict(batch)
    t0 = time.perf_counter()
    for _ in range(5):
        p.predict(batch)
    rate = 5 * len(batch) / (time.perf_counter() - t0)
    out[dev] = {"status": "ok", "device": p.device, "providers": p.providers,
                "images_per_s": round(rate, 1)}
print(json.dumps(out))
"""


def step_runtime(check: Check, cuda: bool) -> dict[str, Any]:
    """onnxruntime on CUDA when its provider works there; otherwise say that it did not."""
    if not cuda:
        return {"status": NO_CUDA}
    pkg = check.work / "source-pkg"
    if not (pkg / "manifest.json").is_file():
        return {"status": "skipped: no source package (the end-to-end step failed)"}
    rc, stdout, text = check.run([check.python, "-c", RUNTIME_CODE, str(pkg)], 120)
    if rc != 0:
        return {"status": f"failed (exit {rc})", "tail": text[-1200:]}
    data: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    gpu = data["cuda"]
    if gpu.get("status") == "ok" and "CUDAExecutionProvider" not in gpu.get("providers", []):
        gpu = {"status": f"not available: the session fell back to {gpu.get('providers')}"}
    data["cuda"] = gpu
    data["status"] = "ok" if gpu.get("status") == "ok" else gpu["status"]
    return data


def markdown(summary: dict[str, Any]) -> str:
    """The human-readable summary: one table of steps, then the numbers."""
    env = summary["environment"]
    lines = [
        f"# GPU check {summary['date']} ({'dry run' if summary['dry_run'] else 'full'})",
        "",
        f"GPU: {env.get('gpu') or 'none'}; torch {env.get('torch')}, triton "
        f"{env.get('triton')}, CPU threads {os.cpu_count()}; {summary['seconds']:.0f} s.",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    for name, step in summary["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', '')} |")
    kernels = summary["steps"].get("kernels", {})
    if "markdown" in kernels:
        lines += ["", "## Kernels", "", kernels["markdown"]]
    e2e = summary["steps"].get("e2e", {})
    if e2e.get("runs"):
        lines += ["", f"## End to end ({e2e['images']} images)", ""]
        lines += ["| method | device | amp | layout | phase | images/s | accuracy | status |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for r in e2e["runs"]:
            head = f"| {r['method']} | {r['device']} | {r.get('amp', r['amp_requested'])} "
            head += f"| {r.get('memory_format', '')} "
            phases = r.get("phases") or [{"name": "", "images_per_s": ""}]
            for p in phases:
                lines.append(
                    f"{head}| {p['name']} | {p['images_per_s']} | {r.get('accuracy', '')} "
                    f"| {r['status']} |"
                )
        for c in e2e.get("comparison", []):
            lines.append(
                f"\n{c['method']}: bf16 vs fp32 accuracy {c['accuracy_check']}; "
                f"CUDA/CPU images/s per phase {c.get('speedup_per_phase', 'n/a')}"
            )
    runtime = summary["steps"].get("runtime", {})
    lines += ["", f"Runtime (onnxruntime on CUDA): {runtime.get('status', 'n/a')}"]
    return "\n".join(lines) + "\n"


def run_check(check: Check) -> dict[str, Any]:
    """Every step in order, each timed; returns (and writes) the summary."""
    check.out.mkdir(parents=True, exist_ok=True)
    check.work.mkdir(parents=True, exist_ok=True)
    check.log.write_text("", encoding="utf-8")

    def timed(name: str, fn: Any, *args: Any) -> dict[str, Any]:
        t0 = time.monotonic()
        if check.left() < 20 and name != "install":
            result: dict[str, Any] = {"status": f"skipped: time budget ({check.left():.0f} s left)"}
        else:
            result = fn(check, *args)
        result["seconds"] = round(time.monotonic() - t0, 1)
        check.steps[name] = result
        return result

    timed("install", step_install)
    env = _python_probe(check)
    cuda = bool(env.get("cuda")) and not check.dry_run
    timed("pytest_gpu", step_pytest, cuda)
    timed("kernels", step_kernels, cuda)
    timed("e2e", step_e2e, cuda)
    timed("runtime", step_runtime, cuda)
    summary = {
        "format": "sourcefree-gpu-check-v1",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dry_run": check.dry_run,
        "machine": {"cpu_threads": os.cpu_count(), "platform": platform.platform()},
        "environment": env,
        "seconds": round(time.monotonic() - check.started, 1),
        "steps": check.steps,
    }
    (check.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    (check.out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, no install")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--budget-s", type=float, default=460.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work if args.work is not None else Path(tmp)
        check = Check(args.out.absolute(), work.absolute(), args.dry_run, args.budget_s)
        summary = run_check(check)
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    failed = [k for k, v in summary["steps"].items() if str(v["status"]).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
