"""CluP's eq. 4 fine-tune step, pinned with hand-computed values through the real step.

The step's loss is CE, linear in its target, so ``d loss / d logits = (softmax - t) / B``:
reading the gradient back gives the exact target ``t`` the step trained against.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import sourcefree.adapters.clup as clup
from sourcefree.adapters.clup import CluP, CluPConfig, FineTuneConfig, SSLConfig, mixup_draw
from sourcefree.data.synthetic import generate
from sourcefree.engine.method import Batch, MethodContext, SourceModel, TargetData
from sourcefree.engine.models import load_classifier
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import InputSpec

#: Selected subset: dataset indices and their pseudo-labels (3 classes).
SELECTED = torch.tensor([7, 3, 11])
SELECTED_LABELS = torch.tensor([2, 0, 1])
#: Trainer draws: index i maps to subset position i mod 3, i.e. positions 1, 0, 2, 2.
DRAWN = torch.tensor([4, 0, 5, 2])
IMAGES = [3, 7, 11, 11]
#: Smoothed one-hot targets for eps = 0.1, C = 3: 1 - eps + eps / 3 = 14/15, eps / 3 = 1/30.
HI, LO = 112 / 120, 4 / 120
SMOOTH = {0: [HI, LO, LO], 1: [LO, HI, LO], 2: [LO, LO, HI]}
#: Source probabilities the fake model returns (its logits are their logs).
P = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [0.2, 0.6, 0.2], [0.1, 0.8, 0.1]])


class FixedLogits(nn.Module):
    """Stands in for the model: records its input, returns fixed float64 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(P.log().to(torch.float64))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x.detach().clone())
        return self.logits, x.new_zeros(x.shape[0], 1)


def _method(source_pkg: Path, mixup_alpha: float) -> tuple[CluP, TargetData, FixedLogits]:
    s = generate("wild-mild", 16, 32, seed=5)
    data = TargetData(images=s.images, spec=InputSpec(size=(32, 32)), fingerprint="t")
    pkg = load_package(source_pkg)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    ctx = MethodContext((SourceModel(pkg, model),), data, torch.device("cpu"), 0)
    cfg = CluPConfig(
        ssl=SSLConfig(epochs=0, prototypes=8, hidden_dim=16, output_dim=8, local_crops=0),
        finetune=FineTuneConfig(
            epochs=1, augment=False, mixup_alpha=mixup_alpha, label_smoothing=0.1
        ),
    )
    method = CluP(cfg, ctx)
    method.selected_indices = SELECTED.clone()
    method.selected_labels = SELECTED_LABELS.clone()
    method.selection_meta = {"score": "purity"}  # labels already computed
    fake = FixedLogits()
    method.model = fake  # type: ignore[assignment]
    return method, data, fake


def _step(method: CluP, data: TargetData) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fine-tune step on DRAWN; return (loss, the target read from the gradient)."""
    batch = Batch(data.tensor(DRAWN), DRAWN, torch.Generator().manual_seed(0), 0, 0, 0.0)
    out = method._ft_step(batch)
    assert out.loss is not None
    out.loss.backward()  # type: ignore[no-untyped-call]
    fake = method.model
    assert isinstance(fake, FixedLogits) and fake.logits.grad is not None
    target = P.to(torch.float64) - len(DRAWN) * fake.logits.grad
    return out.loss.detach(), target


def test_subset_mapping_and_label_smoothing(source_pkg: Path) -> None:
    method, data, fake = _method(source_pkg, mixup_alpha=0.0)
    loss, target = _step(method, data)
    # Each drawn index reads the image and pseudo-label of its subset position.
    assert torch.equal(fake.seen[0], data.tensor(torch.tensor(IMAGES)))
    want = torch.tensor([SMOOTH[0], SMOOTH[2], SMOOTH[1], SMOOTH[1]], dtype=torch.float64)
    torch.testing.assert_close(target, want, atol=1e-6, rtol=0)
    # Hand-computed CE: row 0 (label 0, p = .5/.25/.25) is (14/15 + 2/15) ln 2 = 16/15 ln 2;
    # row 1 (label 2, p = .25/.25/.5) the same; rows 2 and 3 (label 1):
    # -(14/15 ln .6 + 2/30 ln .2) and -(14/15 ln .8 + 2/30 ln .1).
    ln = torch.log(torch.tensor([2.0, 0.6, 0.2, 0.8, 0.1], dtype=torch.float64))
    rows = [16 / 15 * ln[0], 16 / 15 * ln[0]]
    rows += [-(HI * ln[1] + 2 * LO * ln[2]), -(HI * ln[3] + 2 * LO * ln[4])]
    torch.testing.assert_close(loss, torch.stack(rows).mean(), atol=1e-6, rtol=0)


def test_mixup_mixes_images_and_targets(source_pkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    method, data, fake = _method(source_pkg, mixup_alpha=0.2)
    perm = torch.tensor([1, 0, 3, 2])
    monkeypatch.setattr(clup, "mixup_draw", lambda n, alpha, gen: (0.25, perm))
    _, target = _step(method, data)
    x = data.tensor(torch.tensor(IMAGES))
    torch.testing.assert_close(fake.seen[0], 0.25 * x + 0.75 * x[perm])
    # lambda t_i + (1 - lambda) t_perm(i): rows 0/1 mix labels 0 and 2, rows 2/3 are both 1.
    # 0.25 * 14/15 + 0.75 * 1/30 = 31/120; 0.25 * 1/30 + 0.75 * 14/15 = 85/120.
    a, b = 31 / 120, 85 / 120
    want = torch.tensor([[a, LO, b], [b, LO, a], SMOOTH[1], SMOOTH[1]], dtype=torch.float64)
    torch.testing.assert_close(target, want, atol=1e-6, rtol=0)


def test_mixup_draw_is_seeded_by_the_step_generator() -> None:
    lam, perm = mixup_draw(6, 0.0, torch.Generator().manual_seed(0))
    assert lam == 1.0 and perm.tolist() == list(range(6))
    draws = [mixup_draw(6, 0.2, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert 0.0 <= draws[0][0] <= 1.0 and sorted(draws[0][1].tolist()) == list(range(6))
    assert draws[0][0] == draws[1][0] and torch.equal(draws[0][1], draws[1][1])
    assert draws[0][0] != draws[2][0]
