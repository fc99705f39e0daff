"""Fused training ops: a pure-PyTorch reference, a Triton kernel, one dispatcher each.

Importing this package imports torch; ``import sourcefree`` never does.
"""

from __future__ import annotations

from sourcefree.kernels.reference import kmeans_assign as kmeans_assign

__all__ = ["kmeans_assign"]
