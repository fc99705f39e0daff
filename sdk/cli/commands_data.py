"""The ``sourcefree synth`` command (wired into the CLI by ``sourcefree.cli.app``). No torch."""

from __future__ import annotations

import time
from pathlib import Path

import click

from sourcefree.data.synthetic import PRESETS, get_domain, write_domain


def _domains_help() -> str:
    return "\n".join(f"  {name:22s} {spec.description}" for name, spec in PRESETS.items())


@click.command(
    help=(
        "Write a synthetic FER domain: OUT/<n>.png, labels.csv (path,label), "
        "aus.csv (action units) and domain.json.\n\n"
        "Cartoon faces with seven expressions and a controllable domain shift; "
        "deterministic by --seed. `studio` is the source domain, the others are "
        "targets.\n\n\b\nDomains:\n" + _domains_help() + "\n\n\b\nExample:\n"
        "  sourcefree synth studio --n 2000            # the vendor's labelled faces\n"
        "  sourcefree synth faces -d wild-mild --n 500 --seed 1\n"
        "  sourcefree evaluate fer-pkg faces/ --labels faces/labels.csv"
    )
)
@click.argument("out", type=click.Path(path_type=Path, file_okay=True, dir_okay=True))
@click.option("--domain", "-d", default="studio", show_default=True, help="Preset name.")
@click.option("--n", "n", type=int, default=1000, show_default=True, help="Number of images.")
@click.option("--size", type=int, default=32, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT if it holds an earlier synth output (never any other folder).",
)
def synth(out: Path, domain: str, n: int, size: int, seed: int, overwrite: bool) -> None:
    """Write a synthetic FER domain (see the help text above)."""
    spec = get_domain(domain)
    start = time.perf_counter()
    path = write_domain(out, spec, n, size, seed, overwrite=overwrite)
    seconds = time.perf_counter() - start
    click.echo(
        f"wrote {n} images of domain '{spec.name}' ({size}x{size}, seed {seed}) "
        f"to {path} in {seconds:.1f} s"
    )
