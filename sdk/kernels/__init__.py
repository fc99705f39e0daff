"""Fused training ops: a pure-PyTorch reference, a Triton kernel, one dispatcher each."""
