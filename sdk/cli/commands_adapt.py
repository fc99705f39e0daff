"""CLI verbs of the customer's job: ``adapt``, ``methods``, ``evaluate``.

Each command turns typed SDK errors into one ``error:`` line on stderr and the
error's exit code (2, or 75 for an interrupted, resumable run), so the
commands behave the same when invoked on their own (tests) or from the
``sourcefree`` group. Torch is imported only by ``adapt`` and ``methods``.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sourcefree.cli.errors import EXIT_KEPT_SOURCE

# The CLI's one error wrapper (the group's too): error line, exit code, signals.
from sourcefree.cli.errors import typed_errors_command as _typed_errors
from sourcefree.cli.logs import LOG, status_enabled
from sourcefree.data.sources import DEFAULT_FORMAT, formats_help

#: ``--format`` and ``--format-option`` of ``adapt`` and ``evaluate`` (checked by the SDK:
#: an unknown name or option is a typed error that lists the valid ones, exit 2).
FORMAT_HELP = f"How DATA is read: {formats_help()} (docs/data.md, 'From the CLI')."
FORMAT_OPTION_HELP = (
    "An option of the --format, KEY=VALUE (repeatable), e.g. split=test, "
    "min_confidence=50, last_frames=1, classes=true; the options each format takes are "
    "in brackets in --format's help."
)


def _format_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--format NAME`` and ``--format-option KEY=VALUE`` (one definition for both commands)."""
    func = click.option(
        "--format-option",
        "format_options",
        multiple=True,
        metavar="KEY=VALUE",
        help=FORMAT_OPTION_HELP,
    )(func)
    return click.option(
        "--format",
        "data_format",
        default=DEFAULT_FORMAT,
        show_default=True,
        metavar="NAME",
        help=FORMAT_HELP,
    )(func)


#: ``--workers`` of ``adapt`` and ``evaluate`` (checked by the SDK: below 1 is a ConfigError).
WORKERS_HELP = (
    "Processes that decode the images (1: in this process; default: every usable core "
    "from 1,024 images on). Results are bitwise the same for any count."
)


def _workers_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--workers N`` (one definition for both commands)."""
    return click.option("--workers", type=int, default=None, metavar="N", help=WORKERS_HELP)(func)


#: Where a human line goes: stdout, or the status logger (stderr) under --json.
Say = Callable[[str], None]


@click.command("adapt")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-m",
    "--method",
    required=True,
    help="Method name (see `sourcefree methods`), or `auto`: try every method that takes "
    "this many packages, cheapest first, within --budget-s; keep the best by label-free score.",
)
@click.option(
    "-o", "--out", required=True, type=click.Path(path_type=Path), help="Output directory."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file of config overrides.",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key.")
@click.option(
    "--preset",
    default="cpu",
    show_default=True,
    metavar="NAME",
    help="Config preset under --config and --set: cpu (the defaults, sized for a CPU) or "
    "paper (each paper's schedule, for a GPU; `sourcefree methods` lists its values). "
    "Not with -m auto or --select auto.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    help="Private run directory for checkpoints (default: .OUT.work beside OUT).",
)
@click.option("--keep-workdir", is_flag=True, help="Keep the run directory after success.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option(
    "--eval-labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labels CSV: report source vs adapted metrics (checked before adaptation, "
    "used only after it, for the report).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-bad-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.05,
    show_default=True,
    help="Stop when more than this fraction of images is unreadable.",
)
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option(
    "--select",
    type=click.Choice(["none", "auto"]),
    default="none",
    show_default=True,
    help="auto: run the method's small grid (CluP: K, Q; SHOT: epochs) and keep the "
    "candidate with the best label-free score (docs/selection.md).",
)
@click.option(
    "--budget-s",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Wall-clock budget of -m auto / --select auto candidates (default: none).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Export the adapted model even when the do-no-harm gate estimates it worse.",
)
@click.option(
    "--no-gate",
    is_flag=True,
    help="Skip the do-no-harm gate (no label-free comparison with the source model).",
)
@click.option(
    "--gate-sample",
    metavar="N|all",
    default=None,
    help="How many target images the do-no-harm gate and the label-free scores look at: "
    "a seeded random subsample, the same for every model of the run "
    "(default 2048; 0 or all: every image).",
)
@click.option(
    "--amp",
    type=click.Choice(["auto", "bf16", "off"]),
    default="auto",
    show_default=True,
    help="bf16 autocast of training steps (auto: on for CUDA GPUs, off on the CPU); "
    "losses stay fp32. Recorded in report.json.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the run's summary as one JSON object on stdout (human lines go to stderr).",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(path_type=Path),
    metavar="VENDOR.pub",
    help="Vendor public key: every source package's signature must verify with one of the "
    "keys given (repeat for sources signed by several vendors); checked before anything else.",
)
@click.option(
    "--require-signature", is_flag=True, help="Refuse unsigned source packages (needs --key)."
)
@click.option(
    "--plan-probe/--no-plan-probe",
    default=True,
    help="Time a few forward/backward passes on a copy of the model for the estimated "
    "training time of the plan printed before training (results are identical either way).",
)
@_format_options
@click.option(
    "--eval-format-labels",
    is_flag=True,
    help="Report source vs adapted metrics with the labels the --format carries (like "
    "--eval-labels; used only after adaptation, for the report).",
)
@_workers_option
@click.option(
    "--memory-budget",
    metavar="SIZE",
    default=None,
    help="Memory the whole-set labelling features may take, e.g. 512M, 8G, 1.5G or bytes "
    "(default: a quarter of the machine's memory, shared by its torchrun ranks). Above it "
    "SHOT and DIFC keep them as float16, then in a file in the run directory; report.json "
    "says which (memory.features.storage).",
)
@_typed_errors
def adapt_command(
    paths: tuple[Path, ...], no_progress: bool, no_gate: bool, as_json: bool, **options: Any
) -> None:
    """Adapt source package(s) PKG [PKG2 ...] to the unlabelled images in DATA.

    \b
    Example:
      sourcefree adapt vendor-pkg/ faces/ -m tent -o adapted/
      sourcefree adapt vendor-pkg/ faces/ -m tent -o adapted/ --set lr=0.0005
      sourcefree adapt vendor-pkg/ faces/ -m clup -o adapted/ --preset paper --device cuda
      sourcefree adapt vendor-pkg/ faces/ -m tent -o adapted/ --resume
      sourcefree adapt vendor-pkg/ faces/ -m shot -o adapted/ --select auto
      sourcefree adapt vendor-pkg/ faces/ -m auto -o adapted/ --budget-s 1800
      sourcefree adapt vendor-pkg/ faces/ -m shot -o adapted/ --eval-labels faces/labels.csv
      sourcefree adapt vendor-pkg/ ExpW/label/label.lst --format expw -m adabn -o adapted/

    DATA is a folder of images, or what --format reads (a labels CSV, a public FER
    dataset); faces are cropped from the format's boxes (ExpW, AffectNet), and the
    labels a format carries are never used to adapt (--eval-format-labels: report only).

    Writes OUT/package (the adapted package), OUT/report.json and
    OUT/report.html (aggregates only, plots inline). SIGINT/SIGTERM write a
    checkpoint and exit with code 75; run the same command with --resume to
    continue to the same result.

    After adaptation the do-no-harm gate compares the adapted model with the
    source model without labels; when the adapted one is estimated worse, the
    source model is exported (provenance method "source") unless --force, and
    the command exits with code 4 (the package is still written).
    """
    # Every other option is named as the AdaptRequest field it sets.
    if len(paths) < 2:
        raise click.UsageError("expected at least one package and the DATA folder")
    from sourcefree.pipeline.adaptation import adapt
    from sourcefree.pipeline.request import AdaptRequest

    *pkgs, data = paths
    if options["memory_budget"] is not None:
        from sourcefree.engine.feature_bank import parse_memory_size

        options["memory_budget"] = parse_memory_size(options["memory_budget"])
    progress = not no_progress and status_enabled()  # -q: no bars
    request = AdaptRequest(tuple(pkgs), data, progress=progress, gate=not no_gate, **options)
    result = adapt(request)
    if result.rank != 0:
        return  # under torchrun only rank 0 reports
    report = _report_dict(result.report)
    say: Say = LOG.info if as_json else click.echo
    say(f"adapted package: {result.out / 'package'}")
    say(f"report:          {result.out / 'report.json'}")
    say(f"html report:     {result.out / 'report.html'}")
    _echo_selection(report, say)
    _echo_evaluation(report, say)
    kept_source = report["gate"]["decision"] == "source"
    if as_json:
        click.echo(json.dumps(adapt_summary(report, result.out), indent=2))
    if kept_source:
        LOG.info("exit code %d: the gate kept the source model", EXIT_KEPT_SOURCE)
        sys.exit(EXIT_KEPT_SOURCE)


def _report_dict(report: Any) -> dict[str, Any]:
    """report.json's object, from a typed report (``to_dict``) or the object itself."""
    to_dict = getattr(report, "to_dict", None)
    return dict(to_dict() if callable(to_dict) else report)


#: The gate's keys that ``adapt --json`` repeats.
GATE_SUMMARY_KEYS = (
    "enabled",
    "decision",
    "verdict",
    "forced",
    "reason",
    "estimated_gain",
    "accuracy",
)


def adapt_summary(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """What ``adapt --json`` prints: the decision, the gate, accuracies, paths, timings."""
    gate = report["gate"]
    kept_source = gate["decision"] == "source"
    accuracy = None
    evaluation = report.get("evaluation")
    if evaluation:
        accuracy = {
            "source": [
                {k: src[k] for k in ("accuracy", "mean_class_recall")}
                for src in evaluation["source"]
            ],
            "adapted": {k: evaluation["adapted"][k] for k in ("accuracy", "mean_class_recall")},
        }
    selection = report.get("selection")
    return {
        "decision": gate["decision"],
        "kept_source": kept_source,
        "exit_code": EXIT_KEPT_SOURCE if kept_source else 0,
        "method": report["method"],
        "chosen": None if selection is None else selection["chosen"],
        "gate": {k: gate.get(k) for k in GATE_SUMMARY_KEYS},
        "accuracy": accuracy,
        "out": str(out),
        "package": str(out / report.get("package", "package")),
        "package_sha256": report["export"]["sha256"],
        "report": str(out / "report.json"),
        "report_html": str(out / "report.html"),
        "timings_s": report["timings_s"],
    }


def _echo_evaluation(report: dict[str, Any], say: Say = click.echo) -> None:
    """Source vs adapted metrics and pseudo-label quality, with --eval-labels."""
    evaluation = report.get("evaluation")
    if not evaluation:
        return
    for i, src in enumerate(evaluation["source"]):
        say(
            f"source{'' if len(evaluation['source']) == 1 else i + 1}: "
            f"accuracy {src['accuracy']:.4f}, mean class recall {src['mean_class_recall']:.4f}"
        )
    ad = evaluation["adapted"]
    say(f"adapted: accuracy {ad['accuracy']:.4f}, mean class recall {ad['mean_class_recall']:.4f}")
    pl = evaluation.get("pseudo_labels")
    if pl is not None:
        precision = "-" if pl["precision"] is None else f"{pl['precision']:.4f}"
        say(
            f"pseudo-labels: precision {precision} "
            f"({pl['labelled_selected']} labelled of {pl['selected']} selected), "
            f"coverage {pl['coverage']:.4f} ({pl['selected']}/{pl['images']}); "
            f"source accuracy {pl['source_accuracy']:.4f}"
        )
        say(
            "  selected per class: "
            + ", ".join(f"{n} {c}" for n, c in pl["selected_per_class"].items())
        )


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _echo_selection(report: dict[str, Any], say: Say = click.echo) -> None:
    """Candidates of -m auto / --select auto, then the gate's decision."""
    sel = report.get("selection")
    if sel is not None:
        rule = sel["criterion"] or "nothing: no candidate finished"
        say(f"candidates (ranked by {rule}, higher is better):")
        if sel.get("criterion_reason"):
            say(f"  {sel['criterion_reason']}")
        for row in sel["candidates"]:
            mark = "*" if row["chosen"] else " "
            acc = f"  accuracy {_fmt(row['accuracy'])}" if "accuracy" in row else ""
            detail = f" ({row['detail']})" if row.get("detail") else ""
            say(
                f" {mark} {row['candidate']:<32} {row['status']:<11} "
                f"score {_fmt(row['value'])}{acc}{detail}"
            )
    gate = report.get("gate")
    if gate is not None:
        say(f"gate: exported the {gate['decision']} model; {gate['reason']}")
        scored, total = gate.get("sample_size"), gate.get("target_images")
        if gate.get("scores") is not None and scored is not None and scored != total:
            say(f"  (scored on a seeded subsample of {scored} of {total} images)")
        acc = gate.get("accuracy")
        if acc is not None:
            say(
                f"  (with --eval-labels: source accuracy {_fmt(acc['source'])}, "
                f"adapted {_fmt(acc['adapted'])})"
            )


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_typed_errors
def methods_command(as_json: bool) -> None:
    """List adaptation methods, their one-line descriptions and options.

    \b
    Example:
      sourcefree methods
      sourcefree methods --json
      sourcefree adapt vendor-pkg/ faces/ -m shot -o adapted/ --set epochs=5
    """
    from sourcefree.engine.config import describe
    from sourcefree.engine.presets import method_presets
    from sourcefree.engine.registry import get_method, list_methods

    rows: list[dict[str, Any]] = []
    for name in list_methods():
        cls = get_method(name)
        rows.append(
            {
                "name": name,
                "description": cls.description,
                "sources": [cls.min_sources, cls.max_sources],
                "selection_grid": [dict(entry) for entry in cls.selection_grid],
                "presets": method_presets(name),
                "options": [
                    {"key": k, "default": d, "help": h} for k, d, h in describe(cls.config_class)
                ],
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<10} {row['description']}")
        for opt in row["options"]:
            setting = f"{opt['key']}={opt['default']}"
            click.echo(f"    --set {setting:<28}  {opt['help']}")
        if row["selection_grid"]:
            grid = " | ".join(
                ",".join(f"{k}={v}" for k, v in entry.items()) for entry in row["selection_grid"]
            )
            click.echo(f"    --select auto tries: {grid}")
        _echo_presets(row["presets"])
        click.echo("")


def _echo_presets(presets: dict[str, list[dict[str, Any]]]) -> None:
    """One line per preset other than ``cpu``: the values it sets (``methods``)."""
    for name, values in presets.items():
        if name == "cpu":
            continue
        text = " ".join(f"{v['key']}={_setting(v['value'])}" for v in values)
        text = text or "(the defaults: the paper gives no schedule)"
        click.echo(
            textwrap.fill(
                text, 96, initial_indent=f"    --preset {name}: ", subsequent_indent=" " * 8
            )
        )


def _setting(value: Any) -> str:
    """A preset value as ``--set`` takes it (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


@click.command("evaluate")
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(path_type=Path),
    help="CSV of path,label rows (paths relative to DATA); not needed when the --format "
    "carries labels.",
)
@_format_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
@click.option("--max-bad-fraction", type=click.FloatRange(0.0, 1.0), default=0.05)
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image.")
@_workers_option
@_typed_errors
def evaluate_command(
    package: Path,
    data: Path,
    labels_csv: Path | None,
    as_json: bool,
    device: str,
    max_bad_fraction: float,
    strict: bool,
    data_format: str,
    format_options: tuple[str, ...],
    workers: int | None,
) -> None:
    """Accuracy, mean class recall, per-class recall and confusion of PACKAGE on DATA.

    Runs the package through onnxruntime, as an application would. PACKAGE may
    be an `adapt` output folder: its package/ is evaluated. DATA is a folder of
    images with --labels, or what --format reads: a format that carries labels
    (csv, fer2013, ferplus, rafdb, affectnet, expw, ckplus, jaffe) needs no
    --labels; its classes are matched to the package's by name.

    \b
    Example:
      sourcefree evaluate fer-pkg faces/ --labels faces/labels.csv
      sourcefree evaluate adapted/ faces/ --labels faces/labels.csv --json
      sourcefree evaluate fer-pkg fer2013.csv --format fer2013 --format-option split=test
    """
    from sourcefree.runtime.evaluation import evaluate, format_metrics

    metrics = evaluate(
        package,
        data,
        labels_csv,
        data_format=data_format,
        format_options=format_options,
        device=device,
        max_bad_fraction=max_bad_fraction,
        strict=strict,
        workers=workers,
    )
    if as_json:
        click.echo(json.dumps(metrics.to_dict(), indent=2))
    else:
        click.echo(format_metrics(metrics))


#: The commands to add to the ``sourcefree`` group.
COMMANDS: tuple[click.Command, ...] = (adapt_command, methods_command, evaluate_command)
