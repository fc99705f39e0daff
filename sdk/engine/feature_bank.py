"""An (N, D) feature store sized by a memory budget: float32 or float16 in RAM, or float16 on disk.

Whole-set labelling passes (SHOT, DIFC, CluP) keep one feature row per target image. At
10^6 images and D = 512 that is 2 GB of float32, and the labelling maths used to
hold several copies. :class:`FeatureBank` chooses its storage once, from the
budget (:func:`choose_storage`):

- ``"float32"``: a float32 tensor on the caller's device (SHOT: the training
  device; CluP: the host), when ``N x D x 4`` bytes fit (with ``total_rows``:
  every rank's rows, since SHOT gathers this form);
- ``"float16"``: float16 rows in RAM, when ``N x (2D + 4)`` bytes fit;
- ``"disk"``: float16 rows in a memory-mapped file in the private run directory,
  created 0600 with ``O_EXCL`` and unlinked at once, so no file is left there
  even when the process is killed; its space is freed when the bank closes.
  Without a run directory the bank is float16 in RAM over the budget
  (:attr:`FeatureBank.within_budget` is False).

float16 rows carry a per-row power-of-two scale (4 bytes a row), chosen so the
row's largest magnitude is stored between 2^13 and 2^14: features larger than
float16's 65504 never become inf, and the scaling itself is exact.

:class:`MemoryBudget` is the run's budget (``--memory-budget``; default a quarter
of the machine's memory, shared by the ranks on the node) and where a bank may
spill; it remembers the largest bank it opened for ``report.json``'s ``memory``.
:func:`block_rows` sizes the scratch blocks of whole-set passes that keep no bank
(DeepClusterV2's scores, AdaFER's triplet draw) to a share of that budget.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch

from sourcefree.data.decode import local_ranks
from sourcefree.errors import ConfigError, InputError, WriteError
from sourcefree.fsutil import shown, write_error

__all__ = [
    "MAX_BUDGET_BYTES",
    "MIN_PRODUCT_ROWS",
    "BankUse",
    "FeatureBank",
    "MemoryBudget",
    "Storage",
    "block_rows",
    "check_memory_budget",
    "choose_storage",
    "default_memory_budget",
    "parse_memory_size",
]

Storage = Literal["float32", "float16", "disk"]

#: The largest budget accepted: 1 PiB (more than any machine's memory).
MAX_BUDGET_BYTES = 1 << 50
#: Budget when the machine's memory cannot be read: 1 GiB.
_FALLBACK_BYTES = 1 << 30
#: Most elements a bank may hold (N x D): 2^48.
_MAX_ELEMENTS = 1 << 48
#: float16 rows are stored with their largest magnitude in [2^13, 2^14).
_HALF_TOP = 14
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
#: A scratch block (:func:`block_rows`) takes at most 1/_BLOCK_SHARE of the budget.
_BLOCK_SHARE = 8
#: Fewest rows in one matrix product of a blocked whole-set pass: the CPU BLAS tested
#: (MKL) rounded products of a few rows (up to 8 seen) otherwise than a large one, so
#: blocks that must match the one-piece result borrow rows up to this many.
MIN_PRODUCT_ROWS = 16
_FLAG = "--memory-budget"
_WHERE = {"float16": "as float16 in memory", "disk": "as float16 in a file in the run directory"}
_log = logging.getLogger(__name__)


def _refuse(value: object, why: str) -> ConfigError:
    return ConfigError(
        f"{_FLAG} {value!r}",
        why,
        f"pass a size such as {_FLAG} 512M, 8G or 1.5G (K, M, G, T: powers of 1024), "
        "or leave it out for a quarter of the machine's memory",
    )


def parse_memory_size(text: str) -> int:
    """Bytes of a size written ``512M``, ``8G``, ``1.5G`` or plain bytes (K/M/G/T: 1024^k).

    A trailing ``B`` or ``iB`` is allowed (``8GiB``); with a unit, a fraction of a byte
    is dropped (``1.3K`` is 1331 bytes).

    Raises:
        ConfigError: not a size, 0 bytes, or more than :data:`MAX_BUDGET_BYTES`.
    """
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise _refuse(text, "a memory budget is a size in bytes, optionally with a unit")
    number, unit = match.group(1), match.group(2).upper()
    if not unit and "." in number:
        raise _refuse(text, "a size without a unit is a whole number of bytes")
    try:
        value = Decimal(number) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise _refuse(text, "a memory budget is a size in bytes") from None
    if value > MAX_BUDGET_BYTES:
        raise _refuse(text, "it is more than 1 PiB, larger than any machine's memory")
    return check_memory_budget(int(value), text)


def check_memory_budget(value: object, shown_as: object = None) -> int:
    """``value`` as a budget in bytes: a whole number in [1, :data:`MAX_BUDGET_BYTES`].

    Raises:
        ConfigError: anything else (``shown_as``: how the user wrote it).
    """
    given = value if shown_as is None else shown_as
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(given, "the budget is a whole number of bytes")
    if value <= 0:
        raise _refuse(given, "the budget must be at least 1 byte")
    if value > MAX_BUDGET_BYTES:
        raise _refuse(given, "it is more than 1 PiB, larger than any machine's memory")
    return value


def block_rows(budget_bytes: int, row_bytes: int, cap: int) -> int:
    """Rows of a scratch block of ``row_bytes`` bytes a row that fit an eighth of the budget.

    At least 1 (a single row may exceed that share) and at most ``cap``.

    Raises:
        ConfigError: a bad budget (:func:`check_memory_budget`).
        InputError: ``row_bytes`` or ``cap`` is not a whole number >= 1.
    """
    budget = check_memory_budget(budget_bytes)
    for name, v in (("row_bytes", row_bytes), ("cap", cap)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(
                f"a scratch block with {name}={v!r}",
                "it is a whole number >= 1",
                "pass the bytes one row of the block takes and the most rows wanted",
            )
    return max(1, min(cap, budget // _BLOCK_SHARE // row_bytes))


def _mem_total() -> int | None:
    """The machine's memory in bytes: /proc/meminfo's MemTotal, else ``os.sysconf``."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                number, unit = line.split()[1:3]
                return int(number) * (1024 if unit.lower() == "kb" else 1)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if total > 0:
            return int(total)
    return None


def default_memory_budget() -> int:
    """A quarter of the machine's memory, divided among the ranks on this machine.

    1 GiB when the memory cannot be read.
    """
    total = _mem_total()
    if total is None:
        return _FALLBACK_BYTES
    return max(1, min(MAX_BUDGET_BYTES, total // 4 // local_ranks()))


def _count(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InputError(
            f"a feature bank of {name}={v!r}",
            "rows and dimensions are whole numbers >= 0",
            "pass the number of images and the feature width",
        )
    return v


def _check_size(rows: object, dim: object) -> tuple[int, int]:
    n, d = _count("rows", rows), _count("dim", dim)
    if n * d > _MAX_ELEMENTS:
        raise InputError(
            f"a feature bank of {n} x {d} values",
            f"it is more than 2^48 values ({n * d * 2} bytes even as float16)",
            "label fewer images per run, or use a model with narrower features",
        )
    return n, d


def choose_storage(
    rows: int, dim: int, budget_bytes: int, *, total_rows: int | None = None, spill: bool = True
) -> Storage:
    """The storage a bank of ``rows`` x ``dim`` features takes under ``budget_bytes``.

    ``total_rows``: the rows the float32 form holds at its peak (every rank's, when it
    is gathered); ``spill``: a run directory can take a file (else float16 in RAM is
    the last resort, over the budget).
    """
    n, d = _check_size(rows, dim)
    total = n if total_rows is None else _check_size(total_rows, dim)[0]
    budget = check_memory_budget(budget_bytes)
    if total * d * 4 <= budget:
        return "float32"
    if n * (2 * d + 4) <= budget or not spill:
        return "float16"
    return "disk"


def _half_scales(rows: torch.Tensor) -> torch.Tensor:
    """Per-row powers of two that bring each row's largest magnitude into [2^13, 2^14)."""
    amax = rows.abs().amax(dim=1)
    _, exponent = torch.frexp(amax)  # amax in [2^(e-1), 2^e)
    e = (exponent.to(torch.int32) - _HALF_TOP).clamp(-126, 127)
    return ((e + 127) << 23).view(torch.float32)  # exactly 2^e, built from its bits


class FeatureBank:
    """(rows, dim) feature rows stored as :data:`Storage` says; a context manager.

    Rows not written read as zeros. :meth:`chunks` yields float32 tensors and
    :meth:`take` gathers float32 rows; only the ``"float32"`` storage has
    :meth:`tensor` (the whole store, no copy).

    Raises:
        InputError: sizes that are negative or too large, bad writes, use after close.
        WriteError: the disk form's file cannot be made (no space, no permission).
    """

    def __init__(
        self,
        rows: int,
        dim: int,
        storage: Storage,
        *,
        device: torch.device | str | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        within_budget: bool = True,
    ) -> None:
        self.rows, self.dim = _check_size(rows, dim)
        if storage not in ("float32", "float16", "disk"):
            raise InputError(f"storage={storage!r}", "it is float32, float16 or disk", "")
        if storage == "disk" and spill_dir is None:
            raise InputError("a disk feature bank without a folder", "it needs one", "")
        self.storage: Storage = storage
        self.within_budget = within_budget
        self.device = torch.device("cpu" if device is None else device)
        self._f32: torch.Tensor | None = None
        self._half: np.ndarray | None = None
        self._scales: torch.Tensor | None = None
        self._map: mmap.mmap | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._closed = False
        n, d = self.rows, self.dim
        if storage == "float32":
            self._f32 = torch.zeros((n, d), dtype=torch.float32, device=self.device)
            return
        self._scales = torch.ones(n, dtype=torch.float32)
        if storage == "float16" or n * d == 0:
            self._half = np.zeros((n, d), dtype=np.float16)
        else:
            self._half = self._open_file(Path(spill_dir), n * d * 2)  # type: ignore[arg-type]
            self._half = self._half.reshape(n, d)

    def _open_file(self, folder: Path, size: int) -> np.ndarray:
        """A new 0600 file of ``size`` bytes in ``folder``, mapped and unlinked at once."""
        free = shutil.disk_usage(folder).free if folder.is_dir() else None
        if free is not None and free < size:
            raise WriteError(
                f"cannot spill {size} bytes of features into the run directory {shown(folder)}",
                f"only {free} bytes are free on its disk",
                "free space there, pass a --workdir on a larger disk, or a larger --memory-budget",
            )
        path = folder / f".features.{os.getpid()}.{secrets.token_hex(8)}.f16"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            self._fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
            self._path = path
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self._fd, 0, size)  # no SIGBUS on a full disk later
            else:  # pragma: no cover - every Linux has it
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
        except OSError as exc:
            self.close()
            raise write_error(path, exc) from None
        with contextlib.suppress(OSError):
            os.unlink(path)  # the mapping stays; nothing is left behind, even after a kill
            self._path = None
        return np.frombuffer(self._map, dtype=np.float16)

    # --- size ----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes the bank holds: the rows (in RAM or on disk) and the float16 row scales."""
        if self.storage == "float32":
            return self.rows * self.dim * 4
        return self.rows * (self.dim * 2 + 4)

    def _live(self) -> None:
        if self._closed:
            raise InputError("the feature bank is closed", "its rows are gone", "open a new one")

    # --- rows ----------------------------------------------------------------------------

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Store ``rows`` (k, dim), any float dtype and device, as rows ``start .. start+k``.

        Raises:
            InputError: a bad shape or range, or NaN / infinite values.
        """
        self._live()
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != self.dim:
            got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise InputError(
                f"features of shape {got} written to a bank of width {self.dim}",
                "every row has the bank's width",
                "write (k, dim) tensors",
            )
        k = int(rows.shape[0])
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= self.rows - k:
            raise InputError(
                f"{k} rows written at row {start!r} of a bank of {self.rows} rows",
                "they must lie inside the bank",
                "write each batch at its own offset",
            )
        values = rows.detach().to(torch.float32)
        if k and not bool(torch.isfinite(values).all()):
            raise InputError(
                "features contain NaN or infinite values",
                "scores and distances of such rows are undefined",
                "check the source model's outputs for these samples",
            )
        if self._f32 is not None:
            self._f32[start : start + k] = values.to(self.device)
            return
        if k == 0 or self.dim == 0 or self._half is None or self._scales is None:
            return
        values = values.cpu()
        scales = _half_scales(values)
        self._half[start : start + k] = (values / scales.unsqueeze(1)).to(torch.float16).numpy()
        self._scales[start : start + k] = scales

    def chunks(self, size: int, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        """float32 rows in order, ``size`` rows at a time, on ``device`` (default: the bank's).

        A float32 bank on that device yields views of its store: do not write to them.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InputError(f"chunks of {size!r} rows", "a chunk has at least 1 row", "")
        self._live()
        dev = self.device if device is None else torch.device(device)
        for s in range(0, self.rows, size):
            e = min(self.rows, s + size)
            if self._f32 is not None:
                yield self._f32[s:e].to(dev)
                continue
            yield self._decode(slice(s, e), dev)

    def take(self, index: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 rows at ``index`` (1-D int64 row numbers), on ``device`` (default: the bank's).

        Raises:
            InputError: ``index`` is not a 1-D int64 tensor of rows inside the bank.
        """
        self._live()
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.int64:
            raise InputError(
                "rows of a feature bank taken by a non-index",
                "the rows are named by a 1-D int64 tensor",
                "pass torch.tensor([...], dtype=torch.int64)",
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.rows):
            raise InputError(
                f"rows outside [0, {self.rows}) taken from a feature bank",
                "only the bank's rows exist",
                "take row numbers inside the bank",
            )
        dev = self.device if device is None else torch.device(device)
        if self._f32 is not None:
            return self._f32.index_select(0, index.to(self._f32.device)).to(dev)
        return self._decode(index.cpu(), dev)

    def _decode(self, rows: slice | torch.Tensor, device: torch.device) -> torch.Tensor:
        """float32 values of the float16 ``rows`` (a slice or CPU row numbers) on ``device``."""
        if self._half is None or self._scales is None:  # pragma: no cover - callers check
            raise InputError("the feature bank is closed", "its rows are gone", "")
        picked = self._half[rows if isinstance(rows, slice) else rows.numpy()]
        half = torch.from_numpy(np.array(picked)).to(device)
        return half.to(torch.float32) * self._scales[rows].to(device).unsqueeze(1)

    def tensor(self) -> torch.Tensor:
        """The whole float32 store (``"float32"`` storage only; no copy)."""
        self._live()
        if self._f32 is None:
            raise InputError(
                f"a {self.storage} feature bank has no float32 tensor",
                "its rows are stored in float16 to fit the memory budget",
                "read it with chunks()",
            )
        return self._f32

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the rows; the disk form's file is unmapped, closed and gone. Idempotent."""
        self._closed = True
        self._f32 = None
        self._half = None
        self._scales = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still alive: freed with it
                self._map.close()
            self._map = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None

    def __enter__(self) -> FeatureBank:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class BankUse:
    """What a bank took: its storage, bytes, and whether that fit the budget."""

    storage: Storage
    nbytes: int
    within_budget: bool


class MemoryBudget:
    """A run's budget for feature banks and the private folder a bank may spill into.

    Args:
        budget_bytes: the budget; None: :func:`default_memory_budget`.
        spill_dir: the private run directory; None: no spill (float16 in RAM is the
            last resort, over the budget).
    """

    def __init__(
        self, budget_bytes: int | None = None, spill_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.budget_bytes = (
            default_memory_budget() if budget_bytes is None else check_memory_budget(budget_bytes)
        )
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.largest: BankUse | None = None
        """The largest bank opened so far (for the report), None before the first."""

    def bank(
        self,
        rows: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        total_rows: int | None = None,
    ) -> FeatureBank:
        """A new ``rows`` x ``dim`` bank, stored as the budget allows (:func:`choose_storage`)."""
        spill = self.spill_dir is not None
        budget = self.budget_bytes
        storage = choose_storage(rows, dim, budget, total_rows=total_rows, spill=spill)
        within = storage != "float16" or rows * (2 * dim + 4) <= budget
        bank = FeatureBank(
            rows, dim, storage, device=device, spill_dir=self.spill_dir, within_budget=within
        )
        use = BankUse(storage, bank.nbytes, within)
        if storage != "float32" and (self.largest is None or self.largest.storage != storage):
            _log.log(
                logging.INFO if within else logging.WARNING,
                "labelling features (%d x %d) are kept %s: float32 needs more than the "
                "memory budget of %d bytes (--memory-budget)",
                rows,
                dim,
                _WHERE[storage]
                if within
                else "as float16 in memory, over the budget (no run directory to spill into)",
                budget,
            )
        if self.largest is None or use.nbytes > self.largest.nbytes:
            self.largest = use
        return bank

    def report(self) -> dict[str, Any] | None:
        """``report.json``'s ``memory`` (numbers only), or None when no bank was opened."""
        use = self.largest
        if use is None:
            return None
        return {
            "budget_bytes": self.budget_bytes,
            "features": {
                "storage": use.storage,
                "bytes": use.nbytes,
                "within_budget": use.within_budget,
            },
        }
