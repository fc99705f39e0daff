"""Tent: test-time entropy minimisation of the BatchNorm affine parameters.

[0] Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully Test-time
Adaptation by Entropy Minimization", ICLR 2021, arXiv 2006.10726
(https://arxiv.org/abs/2006.10726)

Loss (eq. 2): the Shannon entropy of the prediction, ``H(y) = -sum_c p(y_c) log p(y_c)``,
averaged over the batch. Only the BatchNorm scale and shift (gamma, beta) are
updated (Sec. 3, "modulation parameters"), with Adam at lr 1e-3 (Sec. 4), and
BatchNorm normalises with the statistics of each target batch. Since an
exported model runs in eval mode with fixed statistics, a final no-gradient
pass re-estimates the running statistics on the target images under the
adapted parameters (``recalibrate``), as AdaBN does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from sourcefree.engine.method import (
    Batch,
    Method,
    MethodContext,
    OptimizerSpec,
    ParamGroup,
    Phase,
    StepOutput,
    batchnorm_layers,
    bn_statistics_phase,
    entropy,
)
from sourcefree.engine.models import Classifier
from sourcefree.engine.registry import register_method
from sourcefree.errors import ConfigError


@dataclass(frozen=True)
class TentConfig:
    """Tent settings (paper defaults for ImageNet-scale batches)."""

    lr: float = 1e-3
    """Adam learning rate (Sec. 4: 1e-3 for batch sizes around 128)."""
    beta1: float = 0.9
    """Adam beta1."""
    weight_decay: float = 0.0
    """Weight decay on the BatchNorm affine parameters (the paper uses none)."""
    batch_size: int = 64
    """Images per step; BatchNorm uses each batch's own statistics."""
    epochs: int = 1
    """Passes over the target images (the paper adapts online, in one pass)."""
    recalibrate: bool = True
    """Re-estimate BatchNorm running statistics on the target images after training."""

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.batch_size < 2 or self.epochs < 1:
            raise ConfigError(
                f"tent lr={self.lr}, batch_size={self.batch_size}, epochs={self.epochs}",
                "lr must be positive, batch_size at least 2 and epochs at least 1",
                "fix the values",
            )


@register_method("tent")
class Tent(Method):
    """Entropy minimisation of the BatchNorm affine parameters."""

    description = "Tent: entropy minimisation of BatchNorm scale and shift (Wang et al. 2021)"
    config_class = TentConfig
    config: TentConfig
    relative_cost = 0.2  # one epoch on the BatchNorm affine parameters

    def __init__(self, config: TentConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.model = context.sources[0].model
        if not batchnorm_layers(self.model):
            raise ConfigError(
                "tent needs a model with BatchNorm layers",
                f"{self.export_architecture()} has none, so nothing would train",
                "use another method (e.g. shot)",
            )

    def _affine(self) -> list[ParamGroup]:
        params = []
        for bn in batchnorm_layers(self.model):
            if bn.weight is not None:
                params.append(bn.weight)
            if bn.bias is not None:
                params.append(bn.bias)
        return [ParamGroup(params)]

    def _enter(self) -> None:
        # Batch statistics in every BatchNorm layer; everything else as at inference.
        self.model.eval()
        for bn in batchnorm_layers(self.model):
            bn.train()

    def _leave(self) -> None:
        self.model.eval()

    def _step(self, batch: Batch) -> StepOutput:
        logits, _ = self.model(batch.x)
        loss = entropy(logits).mean()
        return StepOutput(loss, {"entropy": loss.detach()})

    def phases(self) -> Sequence[Phase]:
        cfg = self.config
        out = [
            Phase(
                name="entropy",
                epochs=cfg.epochs,
                step=self._step,
                batch_size=cfg.batch_size,
                parameters=self._affine,
                optimizer=OptimizerSpec(
                    name="adam",
                    lr=cfg.lr,
                    betas=(cfg.beta1, 0.999),
                    weight_decay=cfg.weight_decay,
                ),
                on_enter=self._enter,
                on_phase_end=self._leave,
            )
        ]
        if cfg.recalibrate:
            out.append(bn_statistics_phase(self.model, cfg.batch_size))
        return out

    def modules(self) -> Mapping[str, nn.Module]:
        return {"model": self.model}

    def export_model(self) -> Classifier:
        return self.model.eval()
