"""AdaBN: re-estimate BatchNorm statistics on the target domain, no gradients.

[0] Li, Wang, Shi, Liu, Hou. "Revisiting Batch Normalization For Practical
Domain Adaptation", arXiv 1603.04779, 2016 (https://arxiv.org/abs/1603.04779);
journal version "Adaptive Batch Normalization for practical domain adaptation",
Pattern Recognition 80, 2018, DOI 10.1016/j.patcog.2018.03.005

Every BatchNorm layer's running mean and variance are replaced by their
average over the target images (Algorithm 1), all weights unchanged. The
exact average is accumulated with ``momentum=None`` over full batches.

A model without BatchNorm (LayerNorm / GroupNorm normalise each sample by its
own statistics, and keep none) has nothing to re-estimate: AdaBN refuses it
rather than export an unchanged model labelled "adapted".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from sourcefree.engine.method import (
    Method,
    MethodContext,
    Phase,
    batchnorm_layers,
    bn_statistics_phase,
)
from sourcefree.engine.models import Classifier
from sourcefree.engine.registry import register_method
from sourcefree.errors import ConfigError


@dataclass(frozen=True)
class AdaBNConfig:
    """AdaBN settings."""

    batch_size: int = 64
    """Images per forward pass while averaging the statistics."""
    epochs: int = 1
    """Passes over the target images (one gives the exact average)."""

    def __post_init__(self) -> None:
        if self.batch_size < 2 or self.epochs < 1:
            raise ConfigError(
                f"adabn batch_size={self.batch_size}, epochs={self.epochs}",
                "batch_size must be at least 2 and epochs at least 1",
                "fix the values",
            )


@register_method("adabn")
class AdaBN(Method):
    """Re-estimate BatchNorm statistics on the target images."""

    description = "AdaBN: BatchNorm statistics re-estimated on the target images (no training)"
    config_class = AdaBNConfig
    config: AdaBNConfig
    relative_cost = 0.05  # one forward pass, no training

    def __init__(self, config: AdaBNConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.model = context.sources[0].model
        if not batchnorm_layers(self.model):
            raise ConfigError(
                "adabn has nothing to adapt: the model has no BatchNorm layers",
                f"{self.export_architecture()} normalises without running statistics "
                "(LayerNorm / GroupNorm, or none), so the adapted model would equal the source",
                "use tent (which trains LayerNorm / GroupNorm scale and shift) or shot",
            )

    def phases(self) -> Sequence[Phase]:
        return [bn_statistics_phase(self.model, self.config.batch_size, self.config.epochs)]

    def modules(self) -> Mapping[str, nn.Module]:
        return {"model": self.model}

    def export_model(self) -> Classifier:
        return self.model.eval()
