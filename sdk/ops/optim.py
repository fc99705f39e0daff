"""Optimiser settings shared by several methods (SHOT, SHOT-IM, DIFC, LA-CMFER).

SGD with SHOT's inverse-decay schedule (Liang et al. 2020, after DANN): the
methods differ only in their defaults, which they set by subclassing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sourcefree.engine.config import refuse_invalid
from sourcefree.engine.method import OptimizerSpec, ScheduleSpec

__all__ = ["SgdInvConfig"]


@dataclass(frozen=True)
class SgdInvConfig:
    """SGD with SHOT's inverse-decay schedule ``lr_t = lr0 (1 + gamma t/T)^-power``."""

    lr: float = 1e-2
    """Base learning rate lr0."""
    backbone_lr_scale: float = 1.0
    """Backbone lr multiplier: the backbone's lr relative to the head's in source training."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    weight_decay: float = 1e-3
    """SGD weight decay."""
    gamma: float = 10.0
    """Schedule gamma."""
    power: float = 0.75
    """Schedule power."""

    def __post_init__(self) -> None:
        bad = []
        if not self.lr > 0 or not self.backbone_lr_scale > 0:
            bad.append(f"lr={self.lr}, backbone_lr_scale={self.backbone_lr_scale} (must be > 0)")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            bad.append(f"momentum={self.momentum}, weight_decay={self.weight_decay}")
        if not self.gamma >= 0 or not self.power >= 0:
            bad.append(f"gamma={self.gamma}, power={self.power} (must be >= 0)")
        refuse_invalid(self, bad)

    def optimizer(self) -> OptimizerSpec:
        """The phase's optimiser: SGD with Nesterov momentum."""
        return OptimizerSpec(
            name="sgd",
            lr=self.lr,
            momentum=self.momentum,
            nesterov=True,
            weight_decay=self.weight_decay,
        )

    def schedule(self) -> ScheduleSpec:
        """The inverse-decay schedule ``(1 + gamma p)^-power``."""
        return ScheduleSpec(name="inv", gamma=self.gamma, power=self.power)
