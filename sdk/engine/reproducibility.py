"""Seeds and determinism: the same run, with the same seed, draws the same numbers.

A seed for any position of a run (phase, epoch, step, rank) is derived from the
base seed with SHA-256 (:func:`derive_seed`), so it is the same in every process
and on every resume; :func:`seed_everything` seeds torch, numpy and ``random``
from it; :func:`deterministic` selects deterministic kernels while a run lasts.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and a position (stable across processes)."""
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA), numpy and ``random``; return a CPU generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Deterministic algorithms (warn-only) and no cuDNN benchmarking, restored afterwards."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_bench = torch.backends.cudnn.benchmark
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_bench
