"""Which implementation runs: Triton kernel, compiled reference, or eager reference.

Rules (documented in docs/kernels.md):

* Triton only for CUDA tensors of dtype fp32/fp16/bf16, when triton is
  installed and ``SOURCEFREE_DISABLE_TRITON`` is unset or empty.
* The eager reference whenever an export is being traced
  (``torch.onnx.is_in_onnx_export()`` or ``torch.compiler.is_exporting()``), so no
  custom op reaches a graph, and while the caller's own ``torch.compile`` traces.
* Otherwise, for CPU tensors, a lazily ``torch.compile``-d reference for ops where it was
  measured to win, for inputs at least as large as the op's threshold, unless
  ``SOURCEFREE_DISABLE_COMPILE`` is set; a compile failure falls back to eager
  for the rest of the process, with one warning. CUDA tensors that do not take
  the Triton path use the eager reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

F = TypeVar("F", bound=Callable[..., Any])

DISABLE_TRITON_ENV = "SOURCEFREE_DISABLE_TRITON"
DISABLE_COMPILE_ENV = "SOURCEFREE_DISABLE_COMPILE"

# Smallest input (elements of the main operand) for which the compiled CPU reference
# is used; None = never (compile did not win measurably). A first compile costs
# 10-15 s here (about 3 s with a warm inductor cache), so the thresholds sit where a
# call saves tens of milliseconds and the compile pays back within a few hundred
# calls. Numbers: docs/benchmarks.md, "Fused kernels".
COMPILE_MIN_NUMEL: dict[str, int | None] = {
    "kmeans_assign": None,  # 0.81-1.18x in 3 runs (noise): one addmm + argmin a chunk
    "sinkhorn": 1 << 18,  # B x K scores; eager log-domain is exp-bound, compiled 4-7.5x
    "swapped_ce": 1 << 18,
    "margin_ce": 1 << 18,  # B x C logits; 1.5-3.8x, but ~1.2 ms saved at B=4096, C=7
    "mmd": 1 << 20,  # (n + m) x d pooled features; 1.3-2.2x
}

_compiled: dict[str, Callable[..., Any]] = {}
_broken: set[str] = set()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None
        return False


_TRITON_INSTALLED = _find_triton()  # decided once, without importing triton


def triton_available() -> bool:
    """True when triton is installed (an optional dependency; imported only to launch)."""
    return _TRITON_INSTALLED


def exporting() -> bool:
    """True while ONNX export or ``torch.export`` traces the caller."""
    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel should handle an op whose main operand is ``t``."""
    if not t.is_cuda or t.dtype == torch.float64:
        return False
    if exporting() or _env_flag(DISABLE_TRITON_ENV):
        return False
    return triton_available()


def reference_impl(name: str, fn: F, device: torch.device, numel: int) -> F:
    """``fn`` itself, or its lazily compiled version where that pays (see module doc).

    ``numel`` is the size of the op's main operand on ``device``: only CPU work with
    at least ``COMPILE_MIN_NUMEL[name]`` elements gets the compiled version.
    """
    threshold = COMPILE_MIN_NUMEL.get(name)
    if (
        threshold is None
        or device.type != "cpu"
        or numel < threshold
        or name in _broken
        or _env_flag(DISABLE_COMPILE_ENV)
        or exporting()
        or torch.compiler.is_compiling()
    ):
        return fn
    compiled = _compiled.get(name)
    if compiled is None:
        compiled = torch.compile(fn)
        _compiled[name] = compiled

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # compiler missing or failing: eager from now on
            _broken.add(name)
            warnings.warn(
                f"sourcefree.kernels: torch.compile of {name} failed ({type(exc).__name__}: "
                f"{exc}); using the eager reference. Set {DISABLE_COMPILE_ENV}=1 to skip it.",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args, **kwargs)

    return cast(F, run)


def reset_compiled() -> None:
    """Forget compiled functions and failures (tests, or after changing the env vars)."""
    _compiled.clear()
    _broken.clear()
