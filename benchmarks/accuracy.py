"""Adapted accuracy of registered methods on synthetic shifts: methods x presets x seeds.

For every seed: the vendor's ``smallcnn`` is trained on ``studio`` (5000 images,
32 px, :func:`sourcefree.vendor.training.train_classifier`) and exported as a source
package with the aggregate ``source_stats`` a vendor may ship (class counts, class
feature means); the target set is 2000 images of each preset. Every method variant then
adapts a fresh copy of the source model in-process (``Method`` + ``Trainer``, CPU)
and is evaluated on the same target images with their labels. Labels are used for
evaluation only: never to choose K, Q, an epoch or a checkpoint.

A variant is ``NAME`` or ``NAME:key=value,key=value`` (config overrides, as with
``--set``), e.g. ``clup:ssl.method=deepclusterv2,score=confidence``; ``source-only`` is
the vendor's model unchanged.

Multi-source variants (``la-cmfer``, and ``source-avg``: the mean of the vendors'
softmax outputs without adaptation) take one package per ``--vendors`` preset
(default ``studio nir``): a ``smallcnn`` trained per preset and seed like the studio
one (the studio package is shared with the single-source variants). Their rows
also carry ``source_avg_accuracy`` of the same seed; another ``--vendors`` set names
its rows (``la-cmfer [studio]``: LA-CMFER with the studio package alone). For methods
that select pseudo-labels (CluP), the precision and coverage of the selection are
reported against the labels too.

Writes ``benchmarks/results/accuracy.json`` after every run (rows are merged with
those already there by (variant, preset, seed), so runs of other methods accumulate
and a partial run keeps its rows) and the "## Accuracy" section of ``docs/benchmarks.md``
(the table over all rows in the file).

Training lengths: by default every method runs the shortened schedule of :data:`SHORT`
(rows tagged "(short)"), so the whole table fits in 90 minutes on 2 CPU cores; ``--full``
runs the methods' own defaults (what ``sourcefree adapt`` does; about 2 h 45 min for
the whole table); ``--quick`` is the smaller version (seed 0 only unless ``--seeds``).

Vendor architecture: ``--arch timm:NAME`` (with repeatable ``--arch-option KEY=VALUE``,
as ``sourcefree export`` takes them) trains and exports that model instead of
``smallcnn`` (issue 22). Its rows carry an ``arch`` field and end in ``@ARCH`` (e.g.
``tent @timm:resnet26d``), and their gains are over the source-only row of the same
architecture, so they never mix with the smallcnn rows.

    python benchmarks/accuracy.py            # whole table: every method, 5 presets, 3 seeds
    python benchmarks/accuracy.py --quick    # the same on seed 0
    python benchmarks/accuracy.py --full --methods clup-grid --presets wild-mild  # CluP grid
    python benchmarks/accuracy.py --full --methods shot clup --presets wild-mild --seeds 0
    python benchmarks/accuracy.py --methods source-only adabn tent shot clup \\
        --presets wild-mild --arch timm:vit_tiny_patch16_224 \\
        --arch-option img_size=32 --arch-option patch_size=4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from sourcefree.cli.commands_export import _arch_options
from sourcefree.data.synthetic import AU_NAMES, CLASSES, generate
from sourcefree.engine import config as cfgmod
from sourcefree.engine.method import MethodContext, SourceModel, TargetData
from sourcefree.engine.models import Architecture, Classifier, load_classifier, resolve_architecture
from sourcefree.engine.registry import get_method, list_methods
from sourcefree.engine.reproducibility import seed_everything
from sourcefree.engine.trainer import Trainer
from sourcefree.errors import SourcefreeError
from sourcefree.export import source_package
from sourcefree.fsutil import replace_marked_block
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec
from sourcefree.vendor.training import (
    TrainConfig,
    au_frequencies,
    class_feature_means,
    detect_aus,
    predict_logits,
    to_tensor,
    train_au_detector,
    train_classifier,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "accuracy.json"
DOCS = ROOT / "docs" / "benchmarks.md"
START = "<!-- accuracy:start -->"
END = "<!-- accuracy:end -->"

SIZE = 32
N_SOURCE = 5000
N_TARGET = 2000
DEFAULT_METHODS = ("source-only", *list_methods(), "source-avg")
"""The whole table: every registered method, plus the two references without adaptation."""
DEFAULT_PRESETS = ("wild-mild", "nir", "fer-like", "wild-mild-imbalanced", "prior-shift")
#: CluP's warm-up x score grid (issue 4): ``--methods`` these, ``--presets wild-mild``.
CLUP_GRID = (
    "clup",
    "clup:score=confidence",
    "clup:ssl.method=deepclusterv2",
    "clup:ssl.method=deepclusterv2,score=confidence",
)
#: The benchmark's default schedule: shorter training per method than the method's own
#: defaults (methods not listed run their defaults); ``--full`` turns it off.
SHORT: dict[str, tuple[str, ...]] = {
    "clup": ("ssl.epochs=2", "finetune.epochs=6"),
    "shot": ("epochs=3",),
    "shot-im": ("epochs=3",),
    "difc": ("epochs=3",),
    "pocan": ("epochs=2",),
    "la-cmfer": ("epochs=3",),
    "adafer": ("epochs=3",),
}
SHORT_TAG = "(short)"


def expand_methods(methods: list[str]) -> list[str]:
    """``clup-grid`` -> the four CluP variants; other names stay; duplicates drop."""
    out: list[str] = []
    for m in methods:
        for v in CLUP_GRID if m == "clup-grid" else (m,):
            if v not in out:
                out.append(v)
    return out


def _metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    recalls = [float((pred[truth == c] == c).mean()) for c in np.unique(truth)]
    return {
        "accuracy": float((pred == truth).mean()),
        "mean_class_recall": float(np.mean(recalls)),
    }


def _split(variant: str) -> tuple[str, list[str]]:
    name, _, rest = variant.partition(":")
    return name, [kv for kv in rest.split(",") if kv]


MULTI_SOURCE = ("la-cmfer", "source-avg")
"""Variants that adapt (or average) one package per ``--vendors`` preset."""
DEFAULT_VENDORS = ("studio", "nir")
"""Vendors' presets of the multi-source rows; another ``--vendors`` set names its rows."""
#: Keys of a results file that describe one run, not the rows: a merge keeps them per file.
RUN_KEYS = ("argv", "seeds", "presets", "methods", "vendors", "schedule", "quick", "wall_seconds",
            "source_train_seconds", "arch")  # fmt: skip
DEFAULT_ARCH = "smallcnn"
"""The vendors' architecture unless ``--arch``: its rows carry no ``arch`` field or tag."""
VendorArch = tuple[str, dict[str, Any] | None]
"""An architecture name and its ``--arch-option`` options (None: timm's defaults)."""


def arch_label(arch: VendorArch) -> str:
    """``timm:NAME``, then its options in brackets: how rows of that architecture are named."""
    name, options = arch
    if not options:
        return name
    return f"{name}({','.join(f'{k}={json.dumps(v)}' for k, v in sorted(options.items()))})"


def parse_arch(name: str, pairs: list[str] | None) -> VendorArch:
    """``--arch`` and its ``--arch-option KEY=VALUE`` pairs, checked as ``sourcefree export``
    checks them (allowlisted options, known timm model); ValueError names the problem."""
    try:
        options = _arch_options(tuple(pairs or ()))
        resolve_architecture(name, options)
    except click.BadParameter as err:
        raise ValueError(f"--arch-option: {err.format_message()}") from None
    except SourcefreeError as err:
        raise ValueError(f"--arch {name}: {err}") from None
    return name, options


def tag_arch(row: dict[str, Any], arch: VendorArch) -> dict[str, Any]:
    """Name a row of another architecture after it (``shot (short) @timm:resnet26d``)."""
    if arch != (DEFAULT_ARCH, None):
        row["arch"] = arch_label(arch)
        row["variant"] += f" @{row['arch']}"
    return row


def _package_dir_name(label: str) -> str:
    """A folder (and so package) name for ``label``: the characters package names allow,
    at most 64 of them (a long label keeps a hash of the whole so two never collide)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    if len(name) <= 64:
        return name
    return f"{name[:55]}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"


def _source(
    seed: int,
    workdir: Path,
    preset: str = "studio",
    au: bool = False,
    arch: VendorArch = (DEFAULT_ARCH, None),
) -> tuple[Path, float]:
    """Train a vendor's model (``arch``; default smallcnn) on ``preset`` and export it with
    its source_stats.

    The package carries what a vendor may ship (DESIGN.md section 3): class counts
    (DIFC margins) and class feature means (LA-CMFER alignment). With ``au`` (runs
    that include ``adafer``) it also ships an action-unit detector trained on the same
    images' ground-truth AU intensities (``train_au_detector``: smallcnn, robust
    augmentation) and the per-class frequencies of the AUs that detector finds on
    them (threshold 0.5). The returned seconds are the classifier's training time
    (0 when a cached classifier was reused).

    A package from an earlier run (``--cache``) is verified and reused. One without
    the detector that ``adafer`` needs keeps its classifier (the other methods' rows
    of that seed were measured with it) and gains the detector.
    """
    out = workdir / f"{preset}-{seed}"
    if arch != (DEFAULT_ARCH, None):  # a cache keeps one package per architecture
        out = workdir / _package_dir_name(f"{preset}-{seed}-{arch_label(arch)}")
    name, options = arch
    model_arch: str | Architecture = resolve_architecture(name, options) if options else name
    cached = load_package(out) if (out / "manifest.json").exists() else None
    if cached is not None and (not au or cached.au_detector is not None):
        return out, 0.0
    spec = InputSpec(size=(SIZE, SIZE))
    train = generate(preset, N_SOURCE, SIZE, seed=1000 + seed)
    seconds = 0.0
    if cached is not None:
        model = load_classifier(cached.manifest.architecture, cached.weights_bytes)
    else:
        t0 = time.perf_counter()
        cfg = TrainConfig(seed=seed, arch=model_arch)
        model = train_classifier(train.images, train.labels, len(CLASSES), spec, cfg)
        seconds = time.perf_counter() - t0
    source_stats = {
        "class_counts": np.bincount(train.labels, minlength=len(CLASSES)).tolist(),
        "class_feature_means": class_feature_means(
            model.eval(), to_tensor(train.images, spec), train.labels, len(CLASSES)
        ),
    }
    detector = None
    if au:
        t_au = time.perf_counter()
        detector = train_au_detector(
            train.images, train.aus, spec, TrainConfig(seed=seed, robust=True)
        )
        found = detect_aus(detector, to_tensor(train.images, spec))
        source_stats["au_frequencies"] = au_frequencies(found, train.labels, len(CLASSES))
        print(f"seed {seed}: AU detector trained in {time.perf_counter() - t_au:.0f} s")
    source_package(
        model.eval(),
        architecture=name,
        architecture_options=options,
        labels=list(CLASSES),
        input_spec=spec,
        out=out,
        source_stats=source_stats,
        au_detector=detector,
        au_names=AU_NAMES if detector is not None else None,
        overwrite=True,
    )
    return out, seconds


def _predict(model: Classifier, images: np.ndarray, spec: InputSpec) -> np.ndarray:
    logits = predict_logits(model.eval(), to_tensor(images, spec))
    return logits.argmax(1).numpy()


def run_variant(
    variant: str,
    pkg_path: Path | list[Path],
    preset: str,
    seed: int,
    extra: tuple[str, ...],
) -> dict[str, Any]:
    """Adapt (or not) and evaluate one variant on one preset and seed.

    ``pkg_path`` is a list of packages for the multi-source variants.
    """
    paths = pkg_path if isinstance(pkg_path, list) else [pkg_path]
    pkgs = [load_package(p) for p in paths]
    pkg = pkgs[0]
    spec = pkg.manifest.input
    target = generate(preset, N_TARGET, SIZE, seed=2000 + seed)
    truth = target.labels.astype(np.int64)
    models = [load_classifier(p.manifest.architecture, p.weights_bytes) for p in pkgs]
    model = models[0]
    name, overrides = _split(variant)
    row: dict[str, Any] = {"variant": variant, "preset": preset, "seed": seed}
    t0 = time.perf_counter()
    if len(pkgs) > 1:
        row["vendors"] = [p.manifest.name for p in pkgs]
        probs = [
            torch.softmax(predict_logits(m.eval(), to_tensor(target.images, spec)), 1)
            for m in models
        ]
        row["source_accuracy_by_vendor"] = [
            round(_metrics(p.argmax(1).numpy(), truth)["accuracy"], 4) for p in probs
        ]
        avg = _metrics(torch.stack(probs).mean(0).argmax(1).numpy(), truth)
        row["source_avg_accuracy"] = avg["accuracy"]
        if name == "source-avg":
            row.update(avg)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            return row
    if name == "source-only":
        row.update(_metrics(_predict(model, target.images, spec), truth))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    cls = get_method(name)
    cfg = cfgmod.load_config(cls.config_class, overrides=[*overrides, *extra])
    data = TargetData(images=target.images, spec=spec, fingerprint=f"{preset}-{seed}")
    device = torch.device("cpu")
    seed_everything(seed)
    ctx = MethodContext(
        tuple(SourceModel(p, m) for p, m in zip(pkgs, models, strict=True)), data, device, seed
    )
    try:
        method = cls(cfg, ctx)
        result = Trainer(method, data, device=device, seed=seed).run()
    except SourcefreeError as err:  # a typed refusal (adabn without BatchNorm) is a row too
        row["refused"] = err.what
        return row
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["phase_seconds"] = {log.name: round(log.seconds, 1) for log in result.phases}
    row.update(_metrics(_predict(method.export_model(), target.images, spec), truth))
    row["config"] = cfgmod.to_dict(cfg)
    # Pseudo-label quality, for reporting only (the run is over; nothing feeds back).
    selection = method.pseudo_label_selection()
    idx, labels = selection if selection is not None else (None, None)
    if isinstance(idx, torch.Tensor) and isinstance(labels, torch.Tensor) and idx.numel():
        correct = truth[idx.numpy()] == labels.numpy()
        row["pseudo_label_precision"] = float(correct.mean())
        row["pseudo_label_coverage"] = float(idx.numel() / len(truth))
        row["selected_per_class"] = np.bincount(labels.numpy(), minlength=len(CLASSES)).tolist()
    return row


def _read(path: Path) -> dict[str, Any]:
    """A results file as a dict ({} when missing or unreadable)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The well-formed rows of a results payload."""
    rows = payload.get("rows", [])
    return [r for r in rows if isinstance(r, dict) and {"variant", "preset", "seed"} <= set(r)]


def _previous_rows(path: Path) -> list[dict[str, Any]]:
    """Rows already in the results file (other methods' runs), or none."""
    return _rows(_read(path))


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows keyed by (variant, preset, seed); this run's rows replace earlier ones."""
    out = {(r["variant"], r["preset"], r["seed"]): r for r in old}
    out.update({(r["variant"], r["preset"], r["seed"]): r for r in new})
    return list(out.values())


def merge_files(paths: list[Path], out: Path, *, docs: bool) -> int:
    """Fold the rows of ``paths`` into ``out`` (later files win on the same key)."""
    payload = _read(out)
    rows = _rows(payload)
    runs: dict[str, Any] = dict(payload.get("runs", {}))
    for path in paths:
        other = _read(path)
        if not other:
            raise SystemExit(f"--merge: {path} is missing or not a results file")
        rows = _merge(rows, _rows(other))
        runs.update(other.get("runs", {}))  # a merged file brings the runs it came from
        runs[path.name] = {k: other[k] for k in RUN_KEYS if k in other}
        payload.update({k: v for k, v in other.items() if k not in (*RUN_KEYS, "rows", "summary")})
    for key in RUN_KEYS:  # the merged file describes its runs in "runs", not the last one's
        payload.pop(key, None)
    payload["runs"] = runs
    payload["rows"] = rows
    payload["summary"] = summarise(rows)
    payload["argv"] = "--merge " + " ".join(p.name for p in paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    if docs:
        write_docs(markdown(payload))
    print(markdown(payload))
    return 0


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _outcome(row: dict[str, Any]) -> str:
    """One run's result as the progress line prints it."""
    if "refused" in row:
        return f"refused: {row['refused']}"
    prec = row.get("pseudo_label_precision")
    return (
        f"acc {row['accuracy']:.4f} mcr {row['mean_class_recall']:.4f}"
        + (f" PL prec {prec:.4f}" if prec is not None else "")
        + f" ({row['seconds']} s)"
    )


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (variant, preset), with the source-only reference."""
    out = []
    keys = dict.fromkeys((r["variant"], r["preset"]) for r in rows)
    for variant, preset in keys:
        group = [r for r in rows if r["variant"] == variant and r["preset"] == preset]
        s: dict[str, Any] = {"variant": variant, "preset": preset}
        s["seeds"] = sorted(r["seed"] for r in group)
        for k in ("accuracy", "mean_class_recall", "pseudo_label_precision", "seconds"):
            vals = [float(r[k]) for r in group if k in r]
            if vals:
                s[k] = _mean_std(vals)
        arch = group[0].get("arch")  # the source-only row of the same vendor architecture
        reference = "source-only" + (f" @{arch}" if arch else "")
        src = {
            r["seed"]: r["accuracy"]
            for r in rows
            if r["variant"] == reference and r["preset"] == preset
        }
        gains = [
            r["accuracy"] - src[r["seed"]] for r in group if r["seed"] in src and "accuracy" in r
        ]
        refused = sorted({r["refused"] for r in group if "refused" in r})
        if refused:
            s["refused"] = "; ".join(refused)
        if gains and variant != reference:
            s["gain_over_source"] = _mean_std(gains)
            s["min_gain_over_source"] = round(min(gains), 4)
            s["source_accuracy_by_seed"] = {str(k): round(v, 4) for k, v in src.items()}
        out.append(s)
    return out


def _fmt(s: dict[str, Any], key: str) -> str:
    if key not in s:
        return "-"
    return f"{s[key]['mean']:.3f} ± {s[key]['std']:.3f}"


def markdown(payload: dict[str, Any]) -> str:
    """The table of the "## Accuracy" section."""
    tagged = any("arch" in r for r in payload.get("rows", []))
    arch_note = " (rows tagged `@ARCH`: that vendor architecture, `--arch`)" if tagged else ""
    lines = [
        f"`python benchmarks/accuracy.py`: studio -> target, {SIZE} px, "
        f"{N_TARGET} target images, smallcnn source{arch_note} trained on {N_SOURCE} "
        "studio images per seed, CPU. Rows accumulate over runs (last run: "
        f"`{payload['argv']}`, {payload['machine']['threads']} threads). Mean ± std over "
        "the seeds listed; `gain` = adapted - source-only accuracy of the same seed (min "
        f"over seeds in brackets); `PL prec.` = precision of the selected pseudo-labels "
        "(labels used for evaluation only); "
        f"{SHORT_TAG} = the benchmark's default schedule, shorter than the methods' own "
        "defaults (rows without the tag ran those, `--full`): "
        + "; ".join(f"{m} {', '.join(o)}" for m, o in SHORT.items())
        + ".",
        "",
        "| preset | method | seeds | accuracy | mean class recall | gain (min) | PL prec. "
        "| s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in payload["summary"]:
        gain = "-"
        if "gain_over_source" in s:
            g = s["gain_over_source"]
            gain = f"{g['mean']:+.3f} ({s['min_gain_over_source']:+.3f})"
        secs = f"{s['seconds']['mean']:.0f}" if "seconds" in s else "-"
        accuracy = f"refused: {s['refused']}" if "refused" in s else _fmt(s, "accuracy")
        lines.append(
            f"| {s['preset']} | `{s['variant']}` | {','.join(map(str, s['seeds']))} | "
            f"{accuracy} | "
            f"{_fmt(s, 'mean_class_recall')} | {gain} | "
            f"{_fmt(s, 'pseudo_label_precision')} | {secs} |"
        )
    return "\n".join(lines)


def write_docs(block: str) -> None:
    """Replace this benchmark's block in docs/benchmarks.md, leaving other sections alone."""
    replace_marked_block(DOCS, START, END, block, "Accuracy")


def _parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="variants (default: every method and source-avg); 'clup-grid' expands to "
        "CluP's warm-up x score grid",
    )
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2")
    p.add_argument(
        "--vendors",
        nargs="+",
        default=list(DEFAULT_VENDORS),
        help=f"presets of the vendors' packages for {', '.join(MULTI_SOURCE)}",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the methods' own training lengths (default: the shorter SHORT schedule)",
    )
    p.add_argument(
        "--quick", action="store_true", help="the smaller version: seed 0 only unless --seeds"
    )
    p.add_argument(
        "--arch",
        default=DEFAULT_ARCH,
        help="the vendors' architecture, e.g. timm:resnet26d (default: smallcnn); its rows "
        "are tagged '@ARCH'",
    )
    p.add_argument(
        "--arch-option",
        action="append",
        metavar="KEY=VALUE",
        help="a timm.create_model option of --arch (repeatable; VALUE is read as JSON)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep the vendors' packages here and reuse them in later runs (same recipe "
        "and seed; parallel runs can share one source model per seed this way)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="run nothing: fold the rows of these result files (e.g. from parallel "
        "runs with --out) into --out and rewrite the docs table",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        arch = parse_arch(args.arch, args.arch_option)
    except ValueError as err:
        p.error(str(err))
    args.methods = expand_methods(args.methods)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.merge:
        return merge_files(args.merge, args.out, docs=not args.no_docs)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "benchmark": "accuracy",
        "argv": " ".join(sys.argv[1:] if argv is None else argv) or "defaults",
        "seeds": args.seeds,
        "presets": args.presets,
        "methods": args.methods,
        "schedule": "full" if args.full else "short",
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
    }
    if arch != (DEFAULT_ARCH, None):
        payload["arch"] = arch_label(arch)
    t_all = time.perf_counter()
    multi = any(_split(v)[0] in MULTI_SOURCE for v in args.methods)
    single = any(_split(v)[0] not in MULTI_SOURCE for v in args.methods)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = str(args.cache) if args.cache else tmp_dir
        trained: dict[tuple[str, int], Path] = {}
        train_seconds: dict[str, float] = {}
        for seed in args.seeds:
            for vendor in [*(["studio"] if single else []), *(args.vendors if multi else [])]:
                if (vendor, seed) not in trained:
                    au = vendor == "studio" and any(_split(v)[0] == "adafer" for v in args.methods)
                    trained[vendor, seed], secs = _source(seed, Path(tmp), vendor, au, arch=arch)
                    train_seconds[f"{vendor}-{seed}"] = round(secs, 1)
                    print(f"seed {seed}: {vendor} vendor trained in {secs:.0f} s", flush=True)
        sources = {seed: trained["studio", seed] for seed in args.seeds if single}
        vendors = {seed: [trained[v, seed] for v in args.vendors] for seed in args.seeds if multi}
        payload["source_train_seconds"] = train_seconds
        if multi:
            payload["vendors"] = args.vendors
        for variant in args.methods:
            for preset in args.presets:
                for seed in args.seeds:
                    many = _split(variant)[0] in MULTI_SOURCE
                    pkgs = vendors[seed] if many else sources[seed]
                    extra = () if args.full else SHORT.get(_split(variant)[0], ())
                    row = run_variant(variant, pkgs, preset, seed, extra)
                    row["threads"] = args.threads
                    if extra:
                        # Short runs are their own rows: never merged with full-length ones
                        # (a variant SHORT does not shorten keeps its plain name).
                        row["variant"] = f"{variant} {SHORT_TAG}"
                    if many and tuple(args.vendors) != DEFAULT_VENDORS:
                        # Another set of vendors is another row (e.g. "la-cmfer [studio]").
                        row["variant"] += f" [{'+'.join(args.vendors)}]"
                    rows.append(tag_arch(row, arch))
                    print(f"{preset} {variant} seed {seed}: {_outcome(row)}", flush=True)
                    merged = _merge(_previous_rows(args.out), rows)
                    payload["rows"] = merged
                    payload["summary"] = summarise(merged)
                    payload["wall_seconds"] = round(time.perf_counter() - t_all, 1)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if not args.no_docs:
        write_docs(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
