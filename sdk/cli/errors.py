"""How every CLI command ends on an error (internal to :mod:`sourcefree.cli`).

One wrapper, :func:`typed_errors`: typed SDK errors become one ``error:`` line on
stderr and the error's exit code (2, or 75 for an interrupted, resumable run);
SIGINT/SIGTERM raise :class:`~sourcefree.errors.Interrupted` inside it, so partial
outputs are removed before the process exits (130 or 143). The ``sourcefree``
group wraps every command in it, and the commands that tests also invoke on
their own carry it as a decorator (:func:`typed_errors_command`), so they end the
same either way; on their own they also set up the status logger (the group does it
otherwise, with its -q/-v).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from sourcefree.errors import Interrupted, SourcefreeError

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_KEPT_SOURCE",
    "EXIT_OK",
    "typed_errors",
    "typed_errors_command",
]

#: Exit codes (also in docs/cli.md).
EXIT_OK = 0
EXIT_ERROR = 2  # a typed SourcefreeError: bad input, refused package, ...
EXIT_KEPT_SOURCE = 4  # adapt: the do-no-harm gate exported the source model (still written)
EXIT_INTERRUPTED = 130  # SIGINT; SIGTERM exits with 143 (128 + signal number)

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def typed_errors() -> Iterator[None]:
    """Run the block with SIGINT/SIGTERM as :class:`Interrupted`; end a typed error cleanly.

    ``SourcefreeError`` or ``Interrupted``: ``error: <what. why. Fix: fix.>`` on stderr
    and ``sys.exit(exc.exit_code)``; a bare ``KeyboardInterrupt`` (a signal whose
    handler was not the default one): ``interrupted`` and exit 130. No traceback.
    """
    from sourcefree.fsutil import interruptible

    try:
        with interruptible():
            yield
    except (SourcefreeError, Interrupted) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def typed_errors_command(func: F) -> F:
    """Decorator: run a click command's callback inside :func:`typed_errors`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context(silent=True)
        if ctx is None or ctx.find_root().obj is None:  # not run from the group
            from sourcefree.cli.logs import configure_logging

            configure_logging()
        with typed_errors():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
