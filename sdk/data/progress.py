"""Progress bars on stderr for every long step: decoding, training, gate scoring, export.

The one switch of them all (:func:`progress_enabled`): a bar is drawn only when
the caller asks for one (``AdaptRequest(progress=True)``, the CLI without
``--no-progress``), stderr is a terminal, the ``sourcefree`` logger was not set
above INFO (``--quiet``), the process is rank 0 of a torchrun job (or not one)
and tqdm is installed (it comes with the ``adapt`` extra; the torch-free
runtime works without it). Otherwise :func:`progress_bar` returns a bar that
does nothing, so callers never branch. Bars show counts and rates only: no
path or file name. No torch import.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

#: The logger whose level ``--quiet`` raises; a level above INFO switches bars off.
LOGGER = "sourcefree"


def _stderr_is_tty() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _quiet() -> bool:
    """True when the ``sourcefree`` logger was set above INFO (a level set, not inherited)."""
    level = logging.getLogger(LOGGER).level
    return level > logging.INFO


def progress_enabled(requested: bool) -> bool:
    """Whether a bar asked for with ``requested`` is drawn (see the module docstring)."""
    if not requested or _quiet() or not _stderr_is_tty():
        return False
    if os.environ.get("RANK", "0") not in ("", "0"):
        return False
    try:
        import tqdm  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """A tqdm bar on stderr, or nothing: ``update``, ``set_postfix`` and ``close`` always work."""

    def __init__(self, bar: Any = None) -> None:
        self._bar = bar

    @property
    def active(self) -> bool:
        """True when a bar is drawn."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, values: Mapping[str, str], refresh: bool = False) -> None:
        if self._bar is not None:
            self._bar.set_postfix(dict(values), refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def progress_bar(
    total: int, desc: str, *, enabled: bool, unit: str = "it", initial: int = 0
) -> Progress:
    """A bar of ``total`` steps named ``desc`` when :func:`progress_enabled` (``enabled``)."""
    if not progress_enabled(enabled):
        return Progress()
    from tqdm import tqdm

    return Progress(
        tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
        )
    )


def progress_iter(
    items: Iterable[T], total: int, desc: str, *, enabled: bool, unit: str = "it"
) -> Iterator[T]:
    """``items`` unchanged, advancing a bar of ``total`` steps by one per item."""
    with progress_bar(total, desc, enabled=enabled, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)
