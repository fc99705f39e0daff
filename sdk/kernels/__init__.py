"""Fused training ops: a pure-PyTorch reference, a Triton kernel, one dispatcher each.

Importing this package imports torch, never triton; ``import sourcefree`` imports
neither. See docs/kernels.md for the dispatch rules and numerics.
"""

from __future__ import annotations

from sourcefree.kernels.api import (
    IMTerms as IMTerms,
)
from sourcefree.kernels.api import (
    gaussian_mmd as gaussian_mmd,
)
from sourcefree.kernels.api import (
    kmeans_assign as kmeans_assign,
)
from sourcefree.kernels.api import (
    ldam_margins as ldam_margins,
)
from sourcefree.kernels.api import (
    margin_ce_im as margin_ce_im,
)
from sourcefree.kernels.api import (
    sinkhorn_codes as sinkhorn_codes,
)
from sourcefree.kernels.api import (
    swav_loss as swav_loss,
)

__all__ = [
    "IMTerms",
    "gaussian_mmd",
    "kmeans_assign",
    "ldam_margins",
    "margin_ce_im",
    "sinkhorn_codes",
    "swav_loss",
]
