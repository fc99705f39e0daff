"""Tent: test-time entropy minimisation of the normalisation layers' affine parameters.

[0] Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully Test-time
Adaptation by Entropy Minimization", ICLR 2021, arXiv 2006.10726
(https://arxiv.org/abs/2006.10726)

Loss (eq. 2): the Shannon entropy of the prediction, ``H(y) = -sum_c p(y_c) log p(y_c)``,
averaged over the batch. Only the normalisation layers' scale and shift
(gamma, beta) are updated (Sec. 3, "modulation parameters"), with Adam at lr
1e-3 (Sec. 4), and BatchNorm normalises with the statistics of each target
batch. Since an exported model runs in eval mode with fixed statistics, a
final no-gradient pass re-estimates the BatchNorm running statistics on the
target images under the adapted parameters (``recalibrate``), as AdaBN does.

The paper's networks normalise with BatchNorm. On models normalised by
LayerNorm or GroupNorm (ViT, ConvNeXt, PoolFormer: no running statistics, each
sample normalised by its own), the same modulation parameters, the affine
weight and bias of every LayerNorm / GroupNorm layer, are what trains; the
BatchNorm steps have nothing to act on there and are skipped (reported as
``bn_statistics``). A model with BatchNorm trains exactly what it did before:
the BatchNorm parameters in module order, in one group.
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
    entropy,
    norm_layers,
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
    """Weight decay on the normalisation affine parameters (the paper uses none)."""
    batch_size: int = 64
    """Images per step; BatchNorm uses each batch's own statistics."""
    epochs: int = 1
    """Passes over the target images (the paper adapts online, in one pass)."""
    recalibrate: bool = True
    """Re-estimate BatchNorm running statistics on the target images after training
    (skipped, and reported, on a model without BatchNorm)."""

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.batch_size < 2 or self.epochs < 1:
            raise ConfigError(
                f"tent lr={self.lr}, batch_size={self.batch_size}, epochs={self.epochs}",
                "lr must be positive, batch_size at least 2 and epochs at least 1",
                "fix the values",
            )


@register_method("tent")
class Tent(Method):
    """Entropy minimisation of the normalisation layers' affine parameters."""

    description = "Tent: entropy minimisation of normalisation scale and shift (Wang et al. 2021)"
    config_class = TentConfig
    config: TentConfig
    relative_cost = 0.2  # one epoch on the normalisation affine parameters

    def __init__(self, config: TentConfig, context: MethodContext) -> None:
        super().__init__(config, context)
        self.model = context.sources[0].model
        if not self._affine()[0].params:
            arch = self.export_architecture()
            why = (
                f"{arch}'s normalisation layers have no affine scale or shift"
                if norm_layers(self.model)
                else f"{arch} has no BatchNorm, LayerNorm or GroupNorm layer"
            )
            raise ConfigError(
                "tent needs normalisation layers with a scale and shift to train",
                f"{why}, so nothing would train",
                "use another method (e.g. shot, which trains the whole feature extractor)",
            )

    def _affine(self) -> list[ParamGroup]:
        """Eq. 2's parameters: weight and bias of every normalisation layer, in module order."""
        params = []
        for layer in norm_layers(self.model):
            for p in (layer.weight, layer.bias):
                if isinstance(p, nn.Parameter):
                    params.append(p)
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
            out += self.bn_statistics_phases(self.model, cfg.batch_size)
        return out

    def modules(self) -> Mapping[str, nn.Module]:
        return {"model": self.model}

    def export_model(self) -> Classifier:
        return self.model.eval()
