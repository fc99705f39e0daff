"""Shared optimiser settings: validation, the specs they build, subclass defaults."""

from __future__ import annotations

import pytest

from sourcefree.adapters.la_cmfer import LaCmferOptimConfig
from sourcefree.errors import ConfigError
from sourcefree.ops.augment import FlipShiftConfig
from sourcefree.ops.optim import SgdInvConfig


def test_specs_are_nesterov_sgd_and_inverse_decay() -> None:
    cfg = SgdInvConfig(lr=0.02, weight_decay=1e-4, gamma=5.0, power=0.5)
    opt, sched = cfg.optimizer(), cfg.schedule()
    assert (opt.name, opt.lr, opt.nesterov, opt.weight_decay) == ("sgd", 0.02, True, 1e-4)
    assert (sched.name, sched.gamma, sched.power) == ("inv", 5.0, 0.5)
    # (1 + gamma p)^-power at p = 1
    assert sched.factor(10, 10) == pytest.approx(6.0**-0.5)


def test_subclass_changes_defaults_and_keeps_validation() -> None:
    cfg = LaCmferOptimConfig()
    assert (cfg.lr, cfg.backbone_lr_scale, cfg.weight_decay) == (0.01, 0.1, 5e-4)
    with pytest.raises(ConfigError, match="momentum=1.0"):
        LaCmferOptimConfig(momentum=1.0)
    with pytest.raises(ConfigError, match="shift=-1"):
        FlipShiftConfig(shift=-1)
