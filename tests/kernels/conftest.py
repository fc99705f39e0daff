"""Fixtures for the kernel tests: the Triton launchers, runnable here only under the interpreter."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="session")
def tk() -> ModuleType:
    """``sourcefree.kernels.triton_kernels``, or skip when its kernels cannot run here."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
    from sourcefree.kernels import triton_kernels

    return triton_kernels


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel tests never wait for inductor unless they opt in (see test_dispatch)."""
    monkeypatch.setenv("SOURCEFREE_DISABLE_COMPILE", "1")
