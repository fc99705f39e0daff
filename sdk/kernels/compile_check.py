"""Compile the Triton kernels for a GPU target on a machine without one (a dev check).

:func:`compile_launch` runs a launcher of ``triton_kernels`` on ``meta`` tensors (no
memory, any size) with every ``kernel[grid](...)`` launch intercepted, and compiles
each intercepted launch with ``triton.compile`` for the target, exactly as the
launcher would configure it (block sizes, ``num_warps``, dtypes). The result names
the shared memory, registers and spill stack of each kernel, so a tiling that does
not fit the chip fails here rather than on the GPU. The Triton interpreter must be
off (``TRITON_INTERPRET`` unset) when ``triton_kernels`` is first imported.
Used by ``tests/kernels/test_kernels_compile.py`` and ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["SHARED_LIMIT", "KernelBuild", "compile_launch"]

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
"""Opt-in shared memory per block in bytes, by compute capability (CUDA guide)."""

_PTR = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float64: "*fp64",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


@dataclass(frozen=True)
class KernelBuild:
    """One compiled launch: its name, launch options and resources."""

    kernel: str
    constexprs: dict[str, Any]
    num_warps: int
    shared_bytes: int
    registers: int | None
    """Registers per thread (None when cuobjdump is not available)."""
    stack_bytes: int | None
    """Per-thread stack frame; above 0 means registers spilled to local memory."""


@dataclass
class _Launch:
    fn: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recorder:
    """Stands in for a ``@triton.jit`` function: ``rec[grid](*args)`` records the call."""

    def __init__(self, fn: Any, sink: list[_Launch]) -> None:
        self.fn = fn
        self.sink = sink

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(_Launch(self.fn, args, kwargs))

        return launch


@contextmanager
def _recording(module: Any) -> Iterator[list[_Launch]]:
    sink: list[_Launch] = []
    saved = {
        name: value
        for name, value in vars(module).items()
        if name.endswith("_kernel") and hasattr(value, "arg_names")
    }
    try:
        for name, value in saved.items():
            setattr(module, name, _Recorder(value, sink))
        yield sink
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _arg_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _PTR:
            raise TypeError(f"no Triton pointer type for {value.dtype}")
        return _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton argument type for {type(value).__name__}")


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(tool), "-res-usage", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if match is None:
        return None, None
    return int(match.group(1)), int(match.group(2))


def _build(launch: _Launch, capability: int, precision: str | None) -> KernelBuild:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.fn
    kwargs = dict(launch.kwargs)
    options = {"num_warps": int(kwargs.pop("num_warps", 4))}
    if "num_stages" in kwargs:
        options["num_stages"] = int(kwargs.pop("num_stages"))
    values = dict(zip(fn.arg_names, launch.args, strict=False))
    values.update(kwargs)
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for name in fn.arg_names:
        value = values[name]
        if name in constexpr_names:
            if name == "PRECISION" and precision is not None:
                value = precision
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = _arg_type(value)
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs),
        target=GPUTarget("cuda", capability, 32),
        options=options,
    )
    regs, stack = _resources(compiled.asm["cubin"])
    shown = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
    return KernelBuild(
        fn.__name__, shown, options["num_warps"], int(compiled.metadata.shared), regs, stack
    )


def compile_launch(
    launcher: str,
    *args: Any,
    capability: int = 90,
    precision: str | None = None,
    **kwargs: Any,
) -> list[KernelBuild]:
    """Compile every kernel that ``triton_kernels.<launcher>(*args, **kwargs)`` launches.

    Tensor arguments should be on the ``meta`` device. ``precision`` overrides the
    ``PRECISION`` constexpr (meta tensors choose "ieee"; pass "tf32" for the GPU's
    TF32 path). Distinct launches are compiled once each.
    """
    from sourcefree.kernels import triton_kernels as tk

    with _recording(tk) as launches:
        getattr(tk, launcher)(*args, **kwargs)
    builds: list[KernelBuild] = []
    seen: set[str] = set()
    for launch in launches:
        key = repr((launch.fn.__name__, launch.kwargs, [_type_key(a) for a in launch.args]))
        if key in seen:
            continue
        seen.add(key)
        builds.append(_build(launch, capability, precision))
    return builds


def _type_key(value: object) -> str:
    return _arg_type(value) if isinstance(value, (torch.Tensor, bool, int, float)) else "?"
