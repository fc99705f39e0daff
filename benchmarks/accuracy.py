"""Adapted accuracy of registered methods on synthetic shifts: methods x presets x seeds.

For every seed: the vendor's ``smallcnn`` is trained on ``studio`` (5000 images,
32 px, :func:`sourcefree.vendor.training.train_classifier`) and exported as a source
package with the aggregate ``source_stats`` a vendor may ship (class counts, class
feature means). Every method variant then adapts a fresh copy of the source model
in-process (``Method`` + ``Trainer``, CPU) and is scored under two protocols:

- transductive (``accuracy``, the only protocol of rows measured before 2026-12-05):
  on the images it adapted on, the target *train* set of 2000 images of the preset;
- held-out (``heldout_accuracy``): on a disjoint target *test* set of the same preset,
  as the papers score, which adaptation never sees (``--n-test`` images, default 2000).

Seed rule, per benchmark seed ``s``: every vendor's source set is generator seed
``1000 + s``, the target train set ``2000 + s`` (unchanged, so the transductive numbers
stay comparable with older rows) and the target test set ``4000 + s`` (``3000 + s`` is
the studio validation set of benchmarks/selection.py). The generator mixes the preset name
into its seed, and every face draws its own identity (skin, hair, face size), pose,
background and expression strength, so the two sets share the preset's distribution
(class prototypes, nuisance ranges, the four hair colours), not faces; the run checks
that no test image is byte-identical to a train image. Gains are per protocol: over the
source-only row of the same seed on the same images. Labels are used for evaluation
only: never to choose K, Q, an epoch or a checkpoint.

A variant is ``NAME`` or ``NAME:key=value,key=value`` (config overrides, as with
``--set``), e.g. ``clup:ssl.method=deepclusterv2,score=confidence``; ``source-only`` is
the vendor's model unchanged. A variant's overrides win over the short schedule's
(``clup:ssl.epochs=8`` warms up for 8 epochs and keeps the short fine-tune).

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
from sourcefree.data.synthetic import AU_NAMES, CLASSES, SyntheticSet, generate
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
"""Target *train* images per preset and seed: what every method adapts on."""
N_TEST = 2000
"""Held-out target *test* images per preset and seed (``--n-test``): scored only."""
SOURCE_SEED, TRAIN_SEED, TEST_SEED = 1000, 2000, 4000
"""Generator seed offsets of the source, target train and target test sets (+ seed)."""
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
            "source_train_seconds", "arch", "n_test")  # fmt: skip
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
    train = generate(preset, N_SOURCE, SIZE, seed=SOURCE_SEED + seed)
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


def image_digests(images: np.ndarray) -> set[bytes]:
    """SHA-256 of every image's bytes: equal digests, identical images."""
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest() for im in images}


def check_disjoint(train: np.ndarray, test: np.ndarray) -> None:
    """ValueError when a test image is byte-identical to a train image."""
    shared = len(image_digests(train) & image_digests(test))
    if shared:
        raise ValueError(f"{shared} held-out test image(s) are identical to train images")


def target_sets(preset: str, seed: int, n_test: int = N_TEST) -> tuple[SyntheticSet, SyntheticSet]:
    """The target *train* set (what a method adapts on) and the disjoint *test* set
    (scored only) of ``preset`` for benchmark seed ``seed``; see the module's seed rule."""
    train = generate(preset, N_TARGET, SIZE, seed=TRAIN_SEED + seed)
    test = generate(preset, n_test, SIZE, seed=TEST_SEED + seed)
    check_disjoint(train.images, test.images)
    return train, test


def _scores(
    train_pred: np.ndarray, test_pred: np.ndarray, train: SyntheticSet, test: SyntheticSet
) -> dict[str, float]:
    """Both protocols' metrics: transductive (the old keys) and ``heldout_*``."""
    held = _metrics(test_pred, test.labels.astype(np.int64))
    return {
        **_metrics(train_pred, train.labels.astype(np.int64)),
        **{f"heldout_{k}": v for k, v in held.items()},
    }


def _evaluate(
    model: Classifier, train: SyntheticSet, test: SyntheticSet, spec: InputSpec
) -> dict[str, float]:
    """``model`` scored on the train images (transductive) and the test images (held-out)."""
    train_pred = _predict(model, train.images, spec)
    return _scores(train_pred, _predict(model, test.images, spec), train, test)


def _source_average(
    models: list[Classifier], train: SyntheticSet, test: SyntheticSet, spec: InputSpec
) -> tuple[dict[str, float], dict[str, Any]]:
    """The vendors' models without adaptation on both sets: the scores of their mean
    softmax, and the fields every multi-source row carries (each vendor's accuracy)."""
    out: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    for key, data in (("", train), ("heldout_", test)):
        probs = [
            torch.softmax(predict_logits(m.eval(), to_tensor(data.images, spec)), 1) for m in models
        ]
        truth = data.labels.astype(np.int64)
        out[f"{key}source_accuracy_by_vendor"] = [
            round(_metrics(p.argmax(1).numpy(), truth)["accuracy"], 4) for p in probs
        ]
        preds[key] = torch.stack(probs).mean(0).argmax(1).numpy()
    avg = _scores(preds[""], preds["heldout_"], train, test)
    out["source_avg_accuracy"] = avg["accuracy"]
    out["heldout_source_avg_accuracy"] = avg["heldout_accuracy"]
    return avg, out


def run_variant(
    variant: str,
    pkg_path: Path | list[Path],
    preset: str,
    seed: int,
    extra: tuple[str, ...],
    n_test: int = N_TEST,
) -> dict[str, Any]:
    """Adapt (or not) on the target train set and score one variant on one preset and
    seed, on the train images (transductive) and on ``n_test`` held-out test images.

    ``pkg_path`` is a list of packages for the multi-source variants. Only the train
    images reach the method; the test images are predicted after adaptation.
    """
    paths = pkg_path if isinstance(pkg_path, list) else [pkg_path]
    pkgs = [load_package(p) for p in paths]
    pkg = pkgs[0]
    spec = pkg.manifest.input
    train, test = target_sets(preset, seed, n_test)
    truth = train.labels.astype(np.int64)
    models = [load_classifier(p.manifest.architecture, p.weights_bytes) for p in pkgs]
    model = models[0]
    name, overrides = _split(variant)
    row: dict[str, Any] = {"variant": variant, "preset": preset, "seed": seed, "n_test": n_test}
    t0 = time.perf_counter()
    if len(pkgs) > 1:
        row["vendors"] = [p.manifest.name for p in pkgs]
        avg, fields = _source_average(models, train, test, spec)
        row.update(fields)
        if name == "source-avg":
            row.update(avg)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            return row
    if name == "source-only":
        row.update(_evaluate(model, train, test, spec))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row
    cls = get_method(name)
    cfg = cfgmod.load_config(cls.config_class, overrides=[*extra, *overrides])
    data = TargetData(images=train.images, spec=spec, fingerprint=f"{preset}-{seed}")
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
    row.update(_evaluate(method.export_model(), train, test, spec))
    row["config"] = cfgmod.to_dict(cfg)
    # Pseudo-label quality on the train images, for reporting only (the run is over).
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
    held = row.get("heldout_accuracy")
    return (
        f"acc {row['accuracy']:.4f}"
        + (f" held-out {held:.4f}" if held is not None else "")
        + f" mcr {row['mean_class_recall']:.4f}"
        + (f" PL prec {prec:.4f}" if prec is not None else "")
        + f" ({row['seconds']} s)"
    )


METRICS = ("accuracy", "heldout_accuracy", "mean_class_recall", "heldout_mean_class_recall",
           "pseudo_label_precision", "seconds")  # fmt: skip
"""Per-row values a summary averages over seeds (a row without one is left out of it)."""
PROTOCOLS = (("accuracy", ""), ("heldout_accuracy", "heldout_"))
"""(accuracy key, prefix of its gain keys): each protocol's gain is over the source-only
accuracy of the same seed on the same images."""


def _gains(s: dict[str, Any], group: list[dict[str, Any]], source: list[dict[str, Any]]) -> None:
    """Add each protocol's gain over the source-only rows ``source`` of the same seeds."""
    for key, prefix in PROTOCOLS:
        src = {r["seed"]: r[key] for r in source if key in r}
        gains = [r[key] - src[r["seed"]] for r in group if r["seed"] in src and key in r]
        if gains:
            s[f"{prefix}gain_over_source"] = _mean_std(gains)
            s[f"min_{prefix}gain_over_source"] = round(min(gains), 4)
            s[f"{prefix}source_accuracy_by_seed"] = {str(k): round(v, 4) for k, v in src.items()}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (variant, preset), with the source-only reference."""
    out = []
    keys = dict.fromkeys((r["variant"], r["preset"]) for r in rows)
    for variant, preset in keys:
        group = [r for r in rows if r["variant"] == variant and r["preset"] == preset]
        s: dict[str, Any] = {"variant": variant, "preset": preset}
        s["seeds"] = sorted(r["seed"] for r in group)
        for k in METRICS:
            vals = [float(r[k]) for r in group if k in r]
            if vals:
                s[k] = _mean_std(vals)
        held = sorted(r["seed"] for r in group if "heldout_accuracy" in r)
        if held and held != s["seeds"]:  # older seeds of the row: transductive only
            s["heldout_seeds"] = held
        arch = group[0].get("arch")  # the source-only row of the same vendor architecture
        reference = "source-only" + (f" @{arch}" if arch else "")
        refused = sorted({r["refused"] for r in group if "refused" in r})
        if refused:
            s["refused"] = "; ".join(refused)
        if variant != reference:
            _gains(
                s, group, [r for r in rows if r["variant"] == reference and r["preset"] == preset]
            )
        out.append(s)
    return out


def _fmt(s: dict[str, Any], key: str) -> str:
    if key not in s:
        return "-"
    return f"{s[key]['mean']:.3f} ± {s[key]['std']:.3f}"


def _gain(s: dict[str, Any], prefix: str) -> str:
    """``+0.123 (+0.045)``: the mean gain (min over seeds), or ``-``."""
    g = s.get(f"{prefix}gain_over_source")
    return "-" if g is None else f"{g['mean']:+.3f} ({s[f'min_{prefix}gain_over_source']:+.3f})"


def _held(s: dict[str, Any], key: str) -> str:
    """A held-out cell, naming its seeds where they are fewer than the row's."""
    seeds = s.get("heldout_seeds")
    cell = _fmt(s, key)
    return cell if seeds is None or cell == "-" else f"{cell} [{','.join(map(str, seeds))}]"


def markdown(payload: dict[str, Any]) -> str:
    """The table of the "## Accuracy" section."""
    tagged = any("arch" in r for r in payload.get("rows", []))
    arch_note = " (rows tagged `@ARCH`: that vendor architecture, `--arch`)" if tagged else ""
    lines = [
        f"`python benchmarks/accuracy.py`: studio -> target, {SIZE} px, "
        f"{N_TARGET} target train images, smallcnn source{arch_note} trained on {N_SOURCE} "
        "studio images per seed, CPU. Rows accumulate over runs (last run: "
        f"`{payload['argv']}`, {payload['machine']['threads']} threads). Mean ± std over "
        "the seeds listed. Two protocols: `accuracy` is transductive (scored on the train "
        "images the method adapted on); `held-out` scores the same model on a disjoint "
        f"test set of the preset ({N_TEST} images unless the row's `n_test` says otherwise, "
        f"generator seed {TEST_SEED} + seed; the train set is seed {TRAIN_SEED} + seed), "
        "`-` for rows measured before 2026-12-05 (transductive only; `[seeds]` when only "
        "some of a row's seeds have it). `gain` = adapted - source-only accuracy of the "
        "same seed on the same images, per protocol (min over seeds in brackets); `MCR` = "
        "mean class recall; `PL prec.` = precision of the selected pseudo-labels on the "
        "train images (labels used for evaluation only); "
        f"{SHORT_TAG} = the benchmark's default schedule, shorter than the methods' own "
        "defaults (rows without the tag ran those, `--full`): "
        + "; ".join(f"{m} {', '.join(o)}" for m, o in SHORT.items())
        + ".",
        "",
        "| preset | method | seeds | accuracy | held-out | MCR | held-out MCR | gain (min) "
        "| held-out gain (min) | PL prec. | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in payload["summary"]:
        secs = f"{s['seconds']['mean']:.0f}" if "seconds" in s else "-"
        accuracy = f"refused: {s['refused']}" if "refused" in s else _fmt(s, "accuracy")
        lines.append(
            f"| {s['preset']} | `{s['variant']}` | {','.join(map(str, s['seeds']))} | "
            f"{accuracy} | {_held(s, 'heldout_accuracy')} | "
            f"{_fmt(s, 'mean_class_recall')} | {_held(s, 'heldout_mean_class_recall')} | "
            f"{_gain(s, '')} | {_gain(s, 'heldout_')} | "
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
    p.add_argument(
        "--n-test",
        type=int,
        default=N_TEST,
        help=f"held-out target test images per preset and seed (default {N_TEST}; "
        f"generator seed {TEST_SEED} + seed, disjoint from the train images)",
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
    if not 1 <= args.n_test <= 10**6:
        p.error(f"--n-test {args.n_test}: the held-out set needs 1 to 1,000,000 images")
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
        "n_test": args.n_test,
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
                    row = run_variant(variant, pkgs, preset, seed, extra, n_test=args.n_test)
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
