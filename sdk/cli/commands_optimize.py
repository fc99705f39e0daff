"""``sourcefree optimize``: an fp16 or int8 deployment variant of an fp32 package.

Registered by ``sourcefree.cli.app``; torch, onnx and the quantiser are imported
inside the command, so ``sourcefree --help`` stays torch-free.
"""

from __future__ import annotations

from pathlib import Path

import click

from sourcefree.cli.errors import typed_errors_command
from sourcefree.package.manifest import (
    DEFAULT_MAX_CALIBRATION_IMAGES,
    DEFAULT_MIN_AGREEMENT,
    MIN_CALIBRATION_IMAGES,
)


@click.command("optimize")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--int8", "int8", is_flag=True, help="Static int8 quantisation (QDQ), calibrated.")
@click.option("--fp16", "fp16", is_flag=True, help="Half-precision graph (fp32 inputs, outputs).")
@click.option(
    "--calibration",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder of the site's own images (recursive); they never leave it.",
)
@click.option(
    "-o", "--out", required=True, type=click.Path(path_type=Path), help="New package directory."
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_MIN_AGREEMENT,
    show_default=True,
    help="Share of calibration images whose top-1 class must match the fp32 package's.",
)
@click.option(
    "--max-images",
    type=click.IntRange(MIN_CALIBRATION_IMAGES),
    default=DEFAULT_MAX_CALIBRATION_IMAGES,
    show_default=True,
    help="Use at most this many images (a seeded random subset).",
)
@click.option("--key", type=click.Path(path_type=Path), help="Sign with this private key (.key).")
@click.option(
    "--verify-key",
    type=click.Path(path_type=Path),
    help="Public key (.pub) the fp32 package must be signed with.",
)
@click.option("--name", default=None, help="Package name (default: NAME-int8 or NAME-fp16).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUT.")
@typed_errors_command
def optimize(
    package: Path,
    int8: bool,
    fp16: bool,
    calibration: Path,
    out: Path,
    min_agreement: float,
    max_images: int,
    key: Path | None,
    verify_key: Path | None,
    name: str | None,
    overwrite: bool,
) -> None:
    """Write an int8 or fp16 variant of a verified fp32 package (source or adapted).

    The variant's top-1 class must agree with the fp32 package's on at least
    --min-agreement of the calibration images (both graphs run by onnxruntime);
    otherwise nothing is written (exit 2). The new manifest records the
    precision, the fp32 package's sha256, the agreement and the number of
    images, nothing else about them (int8 scales are fitted to each tensor's
    range over all of them). Weights, labels and preprocessing are the fp32
    package's. `adapt` takes the fp32 package, never an int8 one.

    \b
    Example:
      sourcefree optimize adapted/package --int8 --calibration site-photos/ \\
        -o fer-int8 --key site.key
      sourcefree predict fer-int8 photos/ -o preds.csv
    """
    from sourcefree.export.optimize import optimize_package

    if int8 == fp16:
        raise click.UsageError("pass exactly one of --int8 and --fp16")
    done = optimize_package(
        package,
        calibration,
        out,
        precision="int8" if int8 else "fp16",
        min_agreement=min_agreement,
        max_images=max_images,
        key=key,
        public_key=verify_key,
        name=name,
        overwrite=overwrite,
    )
    m = done.package.manifest
    signed = f", signed {done.signer}" if done.signer else ""
    click.echo(
        f"wrote {out} ({m.name} {m.version}, {done.precision}, top-1 agreement with fp32 "
        f"{done.top1_agreement:.2%} on {done.calibration_images} calibration images{signed}, "
        f"sha256 {done.package.sha256[:16]})"
    )


COMMANDS: tuple[click.Command, ...] = (optimize,)
