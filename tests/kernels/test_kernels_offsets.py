"""Pointer offsets in the Triton kernels are int64: ``row * stride`` must not wrap at 2**31.

A tensor with N x D >= 2**31 elements (e.g. 4.2M x 512 fp32 features) is too large
for this machine, so the boundary is checked where it lives: the offset helper every
kernel uses, under the interpreter, with row indices just below and above
``2**31 / stride`` at a small stride; and a scan that no kernel multiplies by a
stride or a row length outside that helper.
"""

# mypy: disable-error-code="no-untyped-def,untyped-decorator,name-defined"
from __future__ import annotations

import inspect
import re
from types import ModuleType

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from sourcefree.kernels import triton_kernels  # noqa: E402

_offsets = triton_kernels._offsets


@triton.jit
def _probe(out_ptr, wrapped_ptr, base, stride, BLOCK: tl.constexpr):  # noqa: N803
    idx = base + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.arange(0, BLOCK), _offsets(idx, stride))
    tl.store(wrapped_ptr + tl.arange(0, BLOCK), (idx * stride).to(tl.int64))


@pytest.mark.parametrize("stride", [3, 512])
def test_offsets_cross_2_31_without_wrapping(tk: ModuleType, stride: int) -> None:
    base = 2**31 // stride - 4  # rows base .. base + 7 straddle offset 2**31
    out = torch.empty(8, dtype=torch.int64)
    wrapped = torch.empty(8, dtype=torch.int64)
    _probe[(1,)](out, wrapped, base, stride, BLOCK=8)
    expected = [(base + i) * stride for i in range(8)]
    assert out.tolist() == expected
    assert max(expected) >= 2**31
    # The same product in int32 does wrap here, so the check above can fail.
    assert wrapped.tolist() != expected


def test_every_kernel_offset_goes_through_the_int64_helper() -> None:
    source = inspect.getsource(triton_kernels)
    kernels = re.split(r"@triton\.jit\n", source)[1:]
    assert len(kernels) >= 10
    raw = re.compile(r"\*\s*(stride\w*|n_cols|dim)\b")
    for body in kernels:
        name = re.search(r"def (\w+)", body)
        assert name is not None
        end = body.find("\ndef ", 1)
        code = body if end < 0 else body[:end]
        lines = [ln for ln in code.splitlines() if not ln.strip().startswith("#")]
        if name.group(1) == "_offsets":
            continue
        hits = [ln.strip() for ln in lines if raw.search(ln)]
        assert hits == [], f"{name.group(1)} multiplies by a stride in int32: {hits}"
