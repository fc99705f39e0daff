"""The ``sourcefree`` command line: one verb per user action.

Heavy imports (torch, onnx) happen inside the commands that need them, so
``sourcefree --help``, ``verify``, ``inspect`` and ``predict`` stay torch-free.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from sourcefree._version import __version__
from sourcefree.cli.errors import EXIT_ERROR as EXIT_ERROR  # exit codes: docs/cli.md
from sourcefree.cli.errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from sourcefree.cli.errors import EXIT_OK as EXIT_OK
from sourcefree.cli.errors import typed_errors
from sourcefree.errors import SourcefreeError
from sourcefree.package.manifest import ARCHITECTURE_NAMES


class _Group(click.Group):
    """Runs every command inside :func:`sourcefree.cli.errors.typed_errors`: typed SDK
    errors become one clear line on stderr and exit code 2, SIGINT/SIGTERM exit 130/143
    after partial outputs are removed."""

    def invoke(self, ctx: click.Context) -> Any:
        with typed_errors():
            return super().invoke(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sourcefree")
def main() -> None:
    """Source-free domain adaptation with a privacy story.

    \b
    Vendor:      sourcefree export ... --out PKG
                 sourcefree keygen K ; sourcefree sign PKG --key K.key
    Customer:    sourcefree verify PKG --key K.pub ; sourcefree inspect PKG
    Application: sourcefree predict PKG photos/ -o preds.csv
    Everything:  sourcefree demo

    Nothing is ever sent over the network.
    """


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _arch_options(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``KEY=VALUE`` pairs; VALUE is read as a JSON scalar (a bare word is a string)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            raise click.BadParameter(
                f"expected KEY=VALUE, got {pair[:80]!r}", param_hint="--arch-option"
            )
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if value is None or isinstance(value, (list, dict)) or key in out:
            why = "is given twice" if key in out else "must be a number, true/false or a name"
            raise click.BadParameter(f"{key[:40]!r} {why}", param_hint="--arch-option")
        out[key] = value
    return out or None


@main.command("export")
@click.option(
    "--arch",
    required=True,
    help=f"Architecture: {', '.join(ARCHITECTURE_NAMES)}, or timm:NAME (a timm model).",
)
@click.option(
    "--arch-option",
    "arch_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="timm:NAME only: a timm.create_model option (allowlisted, e.g. img_size=32); repeatable.",
)
@click.option(
    "--weights",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="safetensors file with the architecture's own state_dict (num_classes = #labels).",
)
@click.option("--labels", required=True, help="Class names in output order, comma-separated.")
@click.option("--input-size", required=True, type=click.IntRange(1, 4096), help="Side in px.")
@click.option("--mean", default=None, help="Per-channel mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", default=None, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--grayscale", is_flag=True, help="The model was trained on grey images.")
@click.option(
    "--interpolation",
    type=click.Choice(["nearest", "bilinear", "bicubic"]),
    default="bilinear",
    show_default=True,
)
@click.option("--name", default=None, help="Package name (default: the --out folder name).")
@click.option("--version", "pkg_version", default="1.0.0", show_default=True)
@click.option(
    "--class-counts", default=None, help="Training images per class (aggregate source stats)."
)
@click.option("--fp16", is_flag=True, help="Store an fp16 graph (checked by top-1 agreement).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Package directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
def export_cmd(
    arch: str,
    arch_options: tuple[str, ...],
    weights: Path,
    labels: str,
    input_size: int,
    mean: str | None,
    std: str | None,
    grayscale: bool,
    interpolation: str,
    name: str | None,
    pkg_version: str,
    class_counts: str | None,
    fp16: bool,
    out: Path,
    overwrite: bool,
) -> None:
    """Vendor: package a trained model (safetensors + ONNX + manifest).

    The model is exported to ONNX and checked against torch on random inputs
    (max abs error <= 1e-4 in fp32); on any failure nothing is written.

    \b
    Example:
      sourcefree export --arch resnet18 --weights fer.safetensors \\
        --labels surprise,fear,disgust,happiness,sadness,anger,neutral \\
        --input-size 64 --out fer-resnet18
      sourcefree export --arch timm:vit_tiny_patch16_224 --arch-option img_size=32 \\
        --arch-option patch_size=4 --weights vit.safetensors --labels ... \\
        --input-size 32 --out fer-vit
    """
    from sourcefree.engine.models import (
        first_conv_channels,
        from_vendor_state,
        read_vendor_weights,
        resolve_architecture,
    )
    from sourcefree.errors import PackageError
    from sourcefree.export import source_package
    from sourcefree.fsutil import check_output_dir
    from sourcefree.package.manifest import InputSpec

    check_output_dir(out.absolute(), overwrite)
    names = [s.strip() for s in labels.split(",") if s.strip()]
    options = _arch_options(arch_options)
    a = resolve_architecture(arch, options)
    state = read_vendor_weights(weights)
    in_channels = first_conv_channels(a, state)  # by the registry's key, never dict order
    if in_channels == 1 and not grayscale:
        raise PackageError(
            f"{a.name}'s first convolution {a.first_conv!r} takes 1 channel",
            "a one-channel model was trained on grey images",
            "pass --grayscale",
        )
    default = (0.5,) * in_channels
    spec = InputSpec(
        size=(input_size, input_size),
        channels=in_channels,
        color="gray" if grayscale else "rgb",
        mean=_floats(mean, "--mean") or default,
        std=_floats(std, "--std") or default,
        interpolation=interpolation,
    )
    model = from_vendor_state(a, state, len(names), in_channels)
    stats = None
    if class_counts:
        stats = {"class_counts": [int(v) for v in class_counts.split(",")]}
    pkg = source_package(
        model,
        architecture=arch,
        architecture_options=options,
        labels=names,
        input_spec=spec,
        out=out,
        source_stats=stats,
        name=name,
        version=pkg_version,
        overwrite=overwrite,
        fp16=fp16,
    )
    click.echo(
        f"wrote {out} ({pkg.manifest.name} {pkg.manifest.version}, sha256 {pkg.sha256[:16]})"
    )


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace existing key files.")
def keygen(out: Path, overwrite: bool) -> None:
    """Create an Ed25519 key pair: OUT.key (private, mode 0600) and OUT.pub.

    Keep OUT.key secret; give OUT.pub to your customers so they can verify.
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
    """Sign a verified package with an Ed25519 private key (writes PACKAGE/signature)."""
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

    Example: sourcefree verify fer-pkg --key vendor.pub --sha256 3f5a...e1
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
    """Human-readable summary of a package: labels, input, architecture, sizes, signature."""
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

    \b
    Exit codes: 0 nothing found, 3 findings, 2 not a package directory.
    Example:
      sourcefree audit adapted/package
    """
    from sourcefree.package.audit import EXIT_FINDINGS, audit_package, format_report

    report = audit_package(package)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))
    if not report.clean:
        sys.exit(EXIT_FINDINGS)


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
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write a CSV here.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 65536))
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default="auto",
    show_default=True,
)
@click.option("--key", type=click.Path(path_type=Path), help="Vendor public key to require.")
def predict(
    package: Path,
    paths: tuple[Path, ...],
    output: Path | None,
    batch_size: int,
    device: str,
    key: Path | None,
) -> None:
    """Predict images or folders of images (no torch needed).

    Unreadable images are reported and skipped; the rest are predicted.
    """
    from sourcefree.fsutil import atomic_write_bytes, check_output_file
    from sourcefree.package.loader import load_package
    from sourcefree.package.manifest import check_batch_bytes
    from sourcefree.runtime.predictor import Predictor

    if output is not None:
        check_output_file(output)  # before any work; its folder is not created
    pkg = load_package(package, public_key=key)
    check_batch_bytes(pkg.manifest.input, batch_size, "--batch-size")
    predictor = Predictor(pkg, device=device, batch_size=batch_size)
    click.echo(f"running on {predictor.device} ({predictor.providers[0]})", err=True)
    done, failed = predictor.predict_paths(_expand(paths))
    for path, reason in failed:
        click.echo(f"skipped {path}: {reason}", err=True)
    rows = ["path,label,probability"] + [
        ",".join(csv_cell(c) for c in (str(p), lbl, f"{prob:.6f}")) for p, lbl, prob in done
    ]
    if output is not None:
        atomic_write_bytes(output, ("\n".join(rows) + "\n").encode("utf-8"))
        click.echo(f"wrote {len(done)} predictions to {output}", err=True)
    else:
        click.echo("\n".join(rows))
    click.echo(f"{len(done)} predicted, {len(failed)} skipped", err=True)
    if not done:
        sys.exit(EXIT_ERROR)


#: First characters that make a spreadsheet read a cell as a formula (OWASP).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """One CSV cell that is safe to open in a spreadsheet (``predict``'s CSV uses it).

    Bytes of a file name that are not UTF-8 (surrogate escapes) become ``\\xNN``;
    a cell starting with ``= + - @``, tab or CR gets a leading ``'`` (no formula
    runs); cells with ``,``, ``"`` or line breaks are quoted.
    """
    if any("\ud800" <= c <= "\udfff" for c in text):
        text = "".join(_escape_surrogate(c) for c in text)
    if text.startswith(FORMULA_STARTS):
        text = "'" + text
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _escape_surrogate(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode keeps it
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if 0xD800 <= code <= 0xDFFF else char


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Environment check: torch and CUDA, onnxruntime and its providers, conflicts, telemetry."""
    from sourcefree.cli.doctor import diagnose

    report = diagnose()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:28s} {value}")


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
    """
    from sourcefree.cli.demo import run_demo

    run_demo(out, overwrite=overwrite, method=method, seed=seed)


def _register() -> None:
    from sourcefree.cli.commands_adapt import COMMANDS
    from sourcefree.cli.commands_data import synth

    for command in (*COMMANDS, synth):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
