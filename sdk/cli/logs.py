"""Human status of the CLI: the ``sourcefree`` logger on stderr, and progress counters.

Stdout carries data only (predictions, JSON); everything a person reads while a
command runs goes to stderr through the ``sourcefree`` logger, which the group's
``-q/--quiet`` (warnings and errors only) and ``-v/--verbose`` (debug lines of the
library too) set once per invocation. Library modules log to
``logging.getLogger(__name__)``, a child of it. No torch import.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import click

LOG = logging.getLogger("sourcefree")


class _ClickHandler(logging.Handler):
    """Writes to the stderr of the moment (click's test runner swaps it per call).

    The CLI's own lines are printed as they are; a library module's lines (``-v``)
    start with the module's name.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.name != LOG.name:
                text = f"{record.name}: {text}"
            click.echo(text, err=True)
        except Exception:  # a broken stderr never ends a command
            self.handleError(record)


_HANDLER = _ClickHandler()


def configure_logging(verbosity: int = 0) -> None:
    """Set the ``sourcefree`` logger: -1 quiet (WARNING), 0 status (INFO), 1+ DEBUG."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    if _HANDLER not in LOG.handlers:
        LOG.addHandler(_HANDLER)
    LOG.setLevel(level)


def status_enabled() -> bool:
    """True unless ``--quiet``: status lines and progress are shown."""
    return LOG.isEnabledFor(logging.INFO)


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def progress(total: int, desc: str, stream: TextIO | None = None) -> Iterator[Callable[[], None]]:
    """A per-item ``advance()`` that draws a bar on stderr, or does nothing.

    Drawn only when stderr is a terminal and status is on (not ``--quiet``): tqdm when it
    is installed (the adapt extra), else a one-line ``desc i/total`` counter.
    """
    out = sys.stderr if stream is None else stream
    if total <= 0 or not status_enabled() or not _is_tty(out):
        yield lambda: None
        return
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar: Any = tqdm(total=total, desc=desc, unit="img", file=out, dynamic_ncols=True)
        try:
            yield lambda: bar.update(1)
        finally:
            bar.close()
        return
    done = [0]

    def advance() -> None:
        done[0] += 1
        if done[0] == total or done[0] % 16 == 0:
            out.write(f"\r{desc} {done[0]}/{total}")
            out.flush()

    try:
        yield advance
    finally:
        if done[0]:
            out.write("\n")
            out.flush()
