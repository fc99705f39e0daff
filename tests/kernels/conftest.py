"""Fixtures for the kernel tests: the Triton launchers, runnable here only under the interpreter."""

from __future__ import annotations

import os
from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def tk() -> ModuleType:
    """``sourcefree.kernels.triton_kernels`` in interpreter mode, for launches on CPU tensors.

    On a machine with a GPU, tests/conftest.py leaves TRITON_INTERPRET unset and the
    kernels compile for CUDA instead; there test_kernels_gpu.py covers them.
    """
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU launches need TRITON_INTERPRET=1 (set by tests/conftest.py without GPU)")
    from sourcefree.kernels import triton_kernels

    return triton_kernels


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel tests never wait for inductor unless they opt in (see test_dispatch)."""
    monkeypatch.setenv("SOURCEFREE_DISABLE_COMPILE", "1")
