"""Batched augmentations shared by the methods."""

from __future__ import annotations

import torch

from sourcefree.ops.augment import augment_flip_shift


def test_augmentation_is_flip_and_shift() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    same = augment_flip_shift(x, 0, torch.Generator().manual_seed(0))
    assert all(torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(2)) for i in range(2))
    moved = augment_flip_shift(x, 1, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape
