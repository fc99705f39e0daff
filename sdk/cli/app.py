"""The ``sourcefree`` command line: one verb per user action.

Heavy imports (torch, onnx) happen inside the commands that need them, so
``sourcefree --help``, ``verify``, ``inspect`` and ``predict`` stay torch-free.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from sourcefree._version import __version__
from sourcefree.cli.errors import EXIT_ERROR as EXIT_ERROR  # exit codes: docs/cli.md
from sourcefree.cli.errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from sourcefree.cli.errors import EXIT_OK as EXIT_OK
from sourcefree.cli.errors import typed_errors
from sourcefree.errors import SourcefreeError


class _Group(click.Group):
    """Runs every command inside :func:`sourcefree.cli.errors.typed_errors`: typed SDK
    errors become one clear line on stderr and exit code 2, SIGINT/SIGTERM exit 130/143
    after partial outputs are removed."""

    def invoke(self, ctx: click.Context) -> Any:
        with typed_errors():
            return super().invoke(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sourcefree")
@click.option(
    "-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr: no status, no bars."
)
@click.option(
    "-v", "--verbose", count=True, help="More detail on stderr (the library's debug lines)."
)
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: int) -> None:
    """Source-free domain adaptation with a privacy story.

    \b
    Vendor:      sourcefree export ... --out PKG
                 sourcefree keygen K ; sourcefree sign PKG --key K.key
    Customer:    sourcefree verify PKG --key K.pub ; sourcefree inspect PKG
    Application: sourcefree predict PKG photos/ -o preds.csv
    Everything:  sourcefree demo

    Stdout carries only a command's data; status and errors go to stderr
    (-q: warnings and errors only). Nothing is ever sent over the network.
    """
    from sourcefree.cli.logs import configure_logging

    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose contradict each other")
    verbosity = -1 if quiet else verbose
    ctx.obj = {"verbosity": verbosity}  # commands run from the group skip their own set-up
    configure_logging(verbosity)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace existing key files.")
def keygen(out: Path, overwrite: bool) -> None:
    """Create an Ed25519 key pair: OUT.key (private, mode 0600) and OUT.pub.

    Keep OUT.key secret; give OUT.pub to your customers so they can verify.
    The folder of OUT must exist.

    \b
    Example:
      sourcefree keygen vendor              # vendor.key and vendor.pub
      sourcefree sign fer-resnet18 --key vendor.key
    """
    from sourcefree.fsutil import check_output_file
    from sourcefree.package.signing import fingerprint, load_public_key
    from sourcefree.package.signing import keygen as make_keys

    if out.name in ("", ".", ".."):
        raise SourcefreeError(
            f"key name {str(out)[:80]!r} names a folder",
            "the keys are written as NAME.key and NAME.pub",
            "pass a name, e.g. keys/vendor",
        )
    check_output_file(out.with_name(out.name + ".key"))  # its folder is not created
    priv, pub = make_keys(out, overwrite=overwrite)
    click.echo(f"private key: {priv} (keep secret)")
    click.echo(f"public key:  {pub} ({fingerprint(load_public_key(pub))})")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option(
    "--key", required=True, type=click.Path(path_type=Path), help="Private key (OUT.key)."
)
def sign(package: Path, key: Path) -> None:
    """Sign a verified package with an Ed25519 private key (writes PACKAGE/signature).

    \b
    Example:
      sourcefree keygen vendor
      sourcefree sign fer-resnet18 --key vendor.key
      sourcefree verify fer-resnet18 --key vendor.pub --require-signature
    """
    from sourcefree.package.loader import sign_package

    click.echo(f"signed {package} with {sign_package(package, key)}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--key", type=click.Path(path_type=Path), help="Vendor public key (OUT.pub).")
@click.option("--require-signature", is_flag=True, help="Fail on unsigned packages.")
@click.option(
    "--sha256",
    "expected_sha256",
    metavar="HEX",
    help="Pin the package: fail unless its identity (sha256 of manifest.json) is HEX.",
)
def verify(
    package: Path, key: Path | None, require_signature: bool, expected_sha256: str | None
) -> None:
    """Check hashes, layout, schema, graph and (with --key) the signature.

    PACKAGE may be an `adapt` output folder: its package/ is checked.

    \b
    Example:
      sourcefree verify fer-pkg --key vendor.pub --sha256 3f5a...e1
      sourcefree verify adapted/             # the package/ of an adapt output
    """
    from sourcefree.package.loader import load_package

    pkg = load_package(
        package,
        public_key=key,
        require_signature=require_signature,
        expected_sha256=expected_sha256,
    )
    state = (
        f"signature valid ({pkg.signer})"
        if pkg.signature_verified
        else "signed, signature NOT checked (pass --key)"
        if pkg.signed
        else "unsigned"
    )
    click.echo(
        f"OK {pkg.manifest.name} {pkg.manifest.version}: {len(pkg.manifest.files)} files "
        f"verified, {state}, sha256 {pkg.sha256}"
    )


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(package: Path, as_json: bool) -> None:
    """Human-readable summary of a package: labels, input, architecture, sizes, signature.

    \b
    Example:
      sourcefree inspect fer-pkg
      sourcefree inspect adapted/ --json     # the package/ of an adapt output
    """
    from sourcefree.package.inspect import summarize_package

    summary = summarize_package(package)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
def audit(package: Path, as_json: bool) -> None:
    """Privacy scan: list what a package holds and flag anything that looks private.

    Flags file-system paths, file names, your home directory and user name,
    free text over 200 characters, unlisted files, fields outside the schema,
    ONNX metadata and doc strings, safetensors metadata. A package that fails
    verification is still audited; the failure is a finding.

    Exit codes: 0 nothing found, 3 findings, 2 not a package directory.

    \b
    Example:
      sourcefree audit adapted/package
      sourcefree audit fer-pkg --json
    """
    from sourcefree.package.audit import EXIT_FINDINGS, audit_package, format_report

    report = audit_package(package)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))
    if not report.clean:
        sys.exit(EXIT_FINDINGS)


def _check_inputs_exist(paths: tuple[Path, ...]) -> None:
    """A path that names nothing is a typed error before any work (a typo, not a bad image)."""
    from sourcefree.errors import InputError

    for p in paths:
        if not p.exists() and not p.is_symlink():
            raise InputError(
                f"{str(p)[:200]!r} does not exist",
                "predict reads image files and folders of images (folders recursively)",
                "check the path",
            )


def _expand(paths: tuple[Path, ...]) -> Iterator[Path]:
    from sourcefree.data.imaging import is_image_name

    for p in paths:
        if p.is_dir() and not p.is_symlink():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if is_image_name(f):
                        yield Path(root) / f
        else:
            yield p


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, allow_dash=True),
    help="Write the predictions to this file (default, or -: stdout).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    help="csv: a header and one row per image; jsonl: one JSON object per image.",
)
@click.option(
    "--top-k",
    type=click.IntRange(1, None),
    default=1,
    show_default=True,
    help="Also write the K most probable labels (CSV: label_2, probability_2, ...; "
    "JSON Lines: top_k).",
)
@click.option(
    "--probabilities",
    is_flag=True,
    help="Write every class probability, in the package's label order "
    "(CSV: one prob_LABEL column per label; JSON Lines: probabilities).",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 65536))
@click.option(
    "--memory-limit",
    type=click.IntRange(64, 1 << 30),
    metavar="MIB",
    help="Most memory (MiB) the graph may hold on the CPU; a graph asking for more is "
    "refused (exit 2) instead of exhausting the machine. Default: half of the RAM.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default="auto",
    show_default=True,
)
@click.option("--key", type=click.Path(path_type=Path), help="Vendor public key to require.")
@click.option(
    "--all-faces",
    is_flag=True,
    help="Packages that detect faces (input.faces): one row per face, largest first, with "
    "its box (CSV: face,left,top,right,bottom columns after path; face 0: no face found).",
)
def predict(
    package: Path,
    paths: tuple[Path, ...],
    output: Path | None,
    fmt: str,
    top_k: int,
    probabilities: bool,
    batch_size: int,
    memory_limit: int | None,
    device: str,
    key: Path | None,
    all_faces: bool,
) -> None:
    """Predict images or folders of images (no torch needed).

    Unreadable images are reported and skipped; the rest are predicted. Stdout
    carries only the predictions; status, skipped files and the progress bar
    (folders, on a terminal) go to stderr. A package that detects faces crops
    (and aligns) each photo's largest face first, as adaptation did; a photo
    without a face is skipped and reported, or predicted whole, as its
    package says.

    \b
    Example:
      sourcefree predict adapted/package photos/ -o preds.csv
      sourcefree -q predict PKG photos/ --format jsonl --top-k 3 > preds.jsonl
      sourcefree predict PKG group-photos/ --all-faces -o faces.csv
    """
    from sourcefree.cli.logs import LOG, progress
    from sourcefree.errors import InputError
    from sourcefree.fsutil import atomic_write_bytes, check_output_file
    from sourcefree.package.loader import load_package
    from sourcefree.package.manifest import check_batch_bytes
    from sourcefree.runtime.predictor import Predictor

    to_file = output is not None and str(output) != "-"
    if output is not None and to_file:
        check_output_file(output)  # before any work; its folder is not created
    _check_inputs_exist(paths)
    pkg = load_package(package, public_key=key)
    labels = list(pkg.manifest.labels)
    if top_k > len(labels):
        raise InputError(
            f"--top-k {top_k} asks for more labels than the package has ({len(labels)})",
            "each image gets one probability per label",
            f"pass --top-k {len(labels)} or less (or --probabilities for all of them)",
        )
    check_batch_bytes(pkg.manifest.input, batch_size, "--batch-size")
    limit = None if memory_limit is None else memory_limit << 20
    predictor = Predictor(pkg, device=device, batch_size=batch_size, memory_limit=limit)
    LOG.info("running on %s (%s)", predictor.device, predictor.providers[0])
    files = list(_expand(paths))
    if not files:
        raise InputError(
            "no image to predict",
            f"the folder(s) {', '.join(str(p) for p in paths)[:200]} hold no file with an "
            "image extension (.jpg, .png, ...)",
            "pass image files or folders that contain images",
        )
    folders = any(p.is_dir() and not p.is_symlink() for p in paths)
    with progress(len(files) if folders else 0, "predict") as advance:
        if all_faces:
            faces, failed = _predict_faces(predictor, files, advance)
        else:
            done, failed = predictor.predict_files(files, on_file=advance)
    for path, reason in failed:
        LOG.warning("skipped %s: %s", path, reason)
    if all_faces:
        done = [(p, f.probabilities) for p, _, f in faces if f is not None]
        write_faces = _jsonl_face_lines if fmt == "jsonl" else _csv_face_lines
        lines = write_faces(faces, labels, top_k, probabilities)
    else:
        write = _jsonl_lines if fmt == "jsonl" else _csv_lines
        lines = write(done, labels, top_k, probabilities)
    if not done and not (all_faces and faces):  # nothing to write: no empty file is left
        LOG.info("0 predicted, %d skipped; nothing written", len(failed))
        sys.exit(EXIT_ERROR)
    text = "".join(line + "\n" for line in lines)
    if output is not None and to_file:
        atomic_write_bytes(output, text.encode("utf-8"))
        LOG.info("wrote %d predictions to %s", len(done), output)
    else:
        click.echo(text, nl=False)
    LOG.info("%d predicted, %d skipped", len(done), len(failed))


FaceRow = tuple[Path, int, Any]
"""``predict --all-faces``: (path, face number, FacePrediction or None for no face)."""


def _predict_faces(
    predictor: Any, files: list[Path], advance: Callable[[], None]
) -> tuple[list[FaceRow], list[tuple[Path, str]]]:
    """Every face of every file (``--all-faces``); a photo without a face gives a face-0 row.

    Face numbers count from 1, largest first; 0 is a photo where no face was found
    (predicted whole, or with an empty prediction when its package skips such photos).
    """
    from sourcefree.data.imaging import ImageDecodeError

    rows: list[FaceRow] = []
    failed: list[tuple[Path, str]] = []
    for path in files:
        try:
            found = predictor.predict_faces(path)
        except ImageDecodeError as exc:
            failed.append((path, exc.what))
        else:
            rows.extend((path, i + 1 if f.found else 0, f) for i, f in enumerate(found))
            if not found:
                rows.append((path, 0, None))
        advance()
    return rows, failed


def _csv_face_lines(
    rows: list[FaceRow], labels: list[str], top_k: int, probabilities: bool
) -> Iterator[str]:
    """``predict --all-faces``'s CSV: path,face,left,top,right,bottom, then as ``predict``."""
    width = top_k * 2 + (len(labels) if probabilities else 0)
    header = next(_csv_lines([], labels, top_k, probabilities))
    yield "path,face,left,top,right,bottom," + header.split(",", 1)[1]
    for path, number, face in rows:
        head = [csv_cell(str(path)), str(number)]
        if face is None:
            yield ",".join(head + [""] * (4 + width))
            continue
        # the plain name "x" as the path cell: the cells after its comma are the row's tail
        row = list(_csv_lines([(Path("x"), face.probabilities)], labels, top_k, probabilities))
        yield ",".join(head + [str(v) for v in face.box]) + "," + row[1].split(",", 1)[1]


def _jsonl_face_lines(
    rows: list[FaceRow], labels: list[str], top_k: int, probabilities: bool
) -> Iterator[str]:
    """``predict --all-faces``'s JSON Lines: path, face, box, then as ``predict``."""
    for path, number, face in rows:
        record: dict[str, Any] = {"path": _plain(str(path)), "face": number}
        if face is None:
            record.update(box=None, label=None, probability=None)
        else:
            record["box"] = list(face.box)
            line = next(_jsonl_lines([(path, face.probabilities)], labels, top_k, probabilities))
            record.update({k: v for k, v in json.loads(line).items() if k != "path"})
        yield json.dumps(record, ensure_ascii=False)


def _ranked(probs: Any, labels: list[str], top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` (label, probability) pairs, most probable first; ties by label order."""
    import numpy as np

    order = np.argsort(-probs, kind="stable")[:top_k]
    return [(labels[int(i)], float(probs[int(i)])) for i in order]


def _csv_lines(
    done: list[tuple[Path, Any]], labels: list[str], top_k: int, probabilities: bool
) -> Iterator[str]:
    """``predict``'s CSV: path,label,probability[,label_K,probability_K...][,prob_LABEL...]."""
    header = ["path", "label", "probability"]
    for k in range(2, top_k + 1):
        header += [f"label_{k}", f"probability_{k}"]
    if probabilities:
        header += [f"prob_{label}" for label in labels]
    yield ",".join(csv_cell(c) for c in header)
    for path, probs in done:
        cells = [str(path)]
        for label, prob in _ranked(probs, labels, top_k):
            cells += [label, f"{prob:.6f}"]
        if probabilities:
            cells += [f"{float(p):.6f}" for p in probs]
        yield ",".join(csv_cell(c) for c in cells)


def _jsonl_lines(
    done: list[tuple[Path, Any]], labels: list[str], top_k: int, probabilities: bool
) -> Iterator[str]:
    """``predict``'s JSON Lines: one object per image (path, label, probability, ...)."""
    names = [_plain(label) for label in labels]
    for path, probs in done:
        ranked = _ranked(probs, names, top_k)
        record: dict[str, Any] = {
            "path": _plain(str(path)),
            "label": ranked[0][0],
            "probability": round(ranked[0][1], 6),
        }
        if top_k > 1:
            record["top_k"] = [{"label": n, "probability": round(p, 6)} for n, p in ranked]
        if probabilities:
            record["probabilities"] = {
                n: round(float(p), 6) for n, p in zip(names, probs, strict=True)
            }
        yield json.dumps(record, ensure_ascii=False)


#: First characters that make a spreadsheet read a cell as a formula (OWASP).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """One CSV cell that is safe to open in a spreadsheet (``predict``'s CSV uses it).

    Bytes of a file name that are not UTF-8 (surrogate escapes) become ``\\xNN``;
    a cell starting with ``= + - @``, tab or CR gets a leading ``'`` (no formula
    runs); cells with ``,``, ``"`` or line breaks are quoted.
    """
    text = _plain(text)
    if text.startswith(FORMULA_STARTS):
        text = "'" + text
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _plain(text: str) -> str:
    """Text that encodes as UTF-8: undecodable bytes (surrogate escapes) become ``\\xNN``."""
    if any("\ud800" <= c <= "\udfff" for c in text):
        return "".join(_escape_surrogate(c) for c in text)
    return text


def _escape_surrogate(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if 0xD800 <= code <= 0xDFFF else char


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Environment check: torch and CUDA, onnxruntime and its providers, conflicts, telemetry.

    \b
    Example:
      sourcefree doctor
      sourcefree doctor --json   # snake_case keys, null for what is not installed
    """
    from sourcefree.cli.doctor import diagnose, format_report

    report = diagnose()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for label, text in format_report(report):
        click.echo(f"{label:30s} {text}")


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Where the demo writes its packages and report.",
)
@click.option("--overwrite/--no-overwrite", default=True, show_default=True)
@click.option("-m", "--method", default="clup", show_default=True, help="Adaptation method.")
@click.option("--seed", default=0, show_default=True, type=int)
def demo(out: Path, overwrite: bool, method: str, seed: int) -> None:
    """The main job on built-in synthetic faces, end to end.

    Synthesises the vendor's faces ('studio'), trains, exports and signs the
    vendor model; verifies it on the customer's side, adapts it to the
    customer's photos ('wild-mild'), evaluates source and adapted packages and
    serves the adapted one through the runtime. Writes OUT/report.json.

    \b
    Example:
      sourcefree demo
      sourcefree demo --out demo-shot -m shot --seed 1
    """
    from sourcefree.cli.demo import run_demo

    run_demo(out, overwrite=overwrite, method=method, seed=seed)


def _register() -> None:
    from sourcefree.cli.commands_adapt import COMMANDS
    from sourcefree.cli.commands_data import synth
    from sourcefree.cli.commands_export import COMMANDS as EXPORT_COMMANDS
    from sourcefree.cli.commands_optimize import COMMANDS as OPTIMIZE_COMMANDS

    for command in (*EXPORT_COMMANDS, *COMMANDS, *OPTIMIZE_COMMANDS, synth):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
