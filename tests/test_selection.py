"""Label-free scores, ATC calibration and the gate's rule on hand-made outputs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sourcefree.errors import ConfigError, PackageError
from sourcefree.package.manifest import Calibration, SourceStats
from sourcefree.pipeline import selection as sel


def _logits_from_probs(p: np.ndarray) -> torch.Tensor:
    return torch.log(torch.as_tensor(p, dtype=torch.float64)).float()


def test_entropy_uniform_and_confident() -> None:
    assert sel.prediction_entropy(torch.zeros(5, 4)) == pytest.approx(math.log(4))
    confident = torch.tensor([[20.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    assert sel.prediction_entropy(confident) < 1e-6


def test_information_maximisation_formula() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]])
    h = -(p * np.log(p)).sum(1)
    mean = p.mean(0)
    expected = -(mean * np.log(mean)).sum() - h.mean()
    assert sel.information_maximisation(_logits_from_probs(p)) == pytest.approx(expected, abs=1e-6)


def test_information_maximisation_extremes() -> None:
    # One class for every image, confidently: nothing diverse, IM ~ 0.
    collapsed = torch.tensor([[30.0, 0.0, 0.0]] * 6)
    assert sel.information_maximisation(collapsed) == pytest.approx(0.0, abs=1e-6)
    # Confident and balanced: IM ~ log C.
    balanced = torch.eye(3).repeat(2, 1) * 30
    assert sel.information_maximisation(balanced) == pytest.approx(math.log(3), abs=1e-6)


def _snd_reference(logits: torch.Tensor, temperature: float = 0.05) -> float:
    """The whole N x N matrix at once (Saito et al. 2021), no chunks."""
    f = nn.functional.normalize(torch.softmax(logits.double(), 1), dim=1)
    sim = f @ f.T / temperature
    sim.fill_diagonal_(float("-inf"))
    q = torch.softmax(sim, 1)
    return float(-torch.special.xlogy(q, q).sum(1).mean())


def test_snd_matches_reference_in_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=gen) * 3
    ref = _snd_reference(logits)
    assert sel.soft_neighbourhood_density(logits, chunk=7) == pytest.approx(ref, rel=1e-4)
    assert sel.soft_neighbourhood_density(logits) == pytest.approx(ref, rel=1e-4)


def test_snd_higher_for_clustered_outputs() -> None:
    gen = torch.Generator().manual_seed(1)
    centres = torch.eye(4) * 8
    clustered = centres.repeat_interleave(30, 0) + 0.05 * torch.randn(120, 4, generator=gen)
    scattered = torch.randn(120, 4, generator=gen) * 3
    assert sel.soft_neighbourhood_density(clustered) > sel.soft_neighbourhood_density(scattered)


def test_snd_subsamples_large_sets_deterministically() -> None:
    logits = torch.randn(300, 3, generator=torch.Generator().manual_seed(2))
    a = sel.soft_neighbourhood_density(logits, max_samples=100, seed=3)
    b = sel.soft_neighbourhood_density(logits, max_samples=100, seed=3)
    assert a == b
    assert a <= math.log(99) + 1e-6


def test_agreement_and_kappa() -> None:
    a = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    assert sel.agreement(a, a) == 1.0
    assert sel.cohen_kappa(a, a) == pytest.approx(1.0)
    permuted = a[:, [1, 2, 0]]  # every class renamed: never agrees
    assert sel.agreement(a, permuted) == 0.0
    assert sel.cohen_kappa(a, permuted) == pytest.approx(-0.5)
    collapsed = torch.eye(3)[[0] * 6]
    # Agreeing only where the other model predicts the collapsed class is chance level.
    assert sel.cohen_kappa(a, collapsed) == pytest.approx(0.0)
    assert sel.cohen_kappa(collapsed, collapsed) == 1.0
    with pytest.raises(ConfigError, match="same images"):
        sel.agreement(a, a[:3])


class _FlipAware(nn.Module):
    """Predicts class 0 when the left half is brighter, else 1: a flip swaps the class."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = x.shape[3] // 2
        d = x[:, :, :, :w].mean((1, 2, 3)) - x[:, :, :, w:].mean((1, 2, 3))
        logits = torch.stack([d, -d], 1) * 10
        return logits, logits


class _Blind(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))[:, :2] * 0 + torch.tensor([1.0, 0.0])


def test_stability_of_flip_aware_and_blind_models() -> None:
    x = torch.zeros(8, 3, 16, 16)
    x[:4, :, :, :8] = 1.0  # left-bright
    x[4:, :, :, 8:] = 1.0  # right-bright
    aware = sel.model_outputs(_FlipAware(), x, batch_size=3)
    # The flip changes every prediction; the 2-px shift changes none: mean 0.5.
    assert sel.augmentation_stability(aware) == pytest.approx(0.5)
    assert aware.predictions.tolist() == [0] * 4 + [1] * 4
    assert sel.augmentation_stability(sel.model_outputs(_Blind(), x)) == 1.0
    with pytest.raises(ConfigError, match="views"):
        sel.augmentation_stability(sel.model_outputs(_Blind(), x, views=False))


def test_model_outputs_restore_training_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3), nn.BatchNorm1d(3))
    model.train()
    sel.model_outputs(model, torch.randn(5, 3, 4, 4))
    assert model.training


def test_non_finite_logits_are_refused() -> None:
    with pytest.raises(ConfigError, match="NaN or Inf"):
        sel.prediction_entropy(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ConfigError, match=r"\(N, C\)"):
        sel.prediction_entropy(torch.zeros(3))


def test_fit_atc_threshold_matches_accuracy() -> None:
    conf = torch.linspace(0, 1, 101)
    for acc in (0.0, 0.3, 0.7, 1.0):
        t = sel.fit_atc_threshold(conf, acc)
        assert float((conf > t).double().mean()) == pytest.approx(acc, abs=0.01)
    with pytest.raises(ConfigError):
        sel.fit_atc_threshold(conf, 1.5)


def _separable_sample(
    n: int, gen: np.random.Generator, sharp: float
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 4-class model that is right exactly when its top softmax exceeds 0.6.

    That is the case ATC is exact for (Garg et al. 2022): confidence ranks
    correctness. ``sharp`` moves the confidence distribution (a covariate shift).
    """
    c = 4
    top = 1 / c + (1 - 1 / c) * gen.beta(sharp, 1.0, size=n)
    rest = (1 - top) / (c - 1)
    probs = np.repeat(rest[:, None], c, 1)
    predicted = gen.integers(0, c, size=n)
    probs[np.arange(n), predicted] = top
    other = (predicted + gen.integers(1, c, size=n)) % c
    truth = np.where(top > 0.6, predicted, other)
    return np.log(probs), truth


def test_atc_estimates_accuracy_under_covariate_shift() -> None:
    gen = np.random.default_rng(0)
    val_logits, val_truth = _separable_sample(5000, gen, sharp=3.0)
    val_acc = float((val_logits.argmax(1) == val_truth).mean())
    cal = Calibration(
        validation_accuracy=val_acc,
        validation_images=5000,
        atc_max_softmax=sel.fit_atc_threshold(sel.confidence(val_logits, "max_softmax"), val_acc),
        atc_neg_entropy=sel.fit_atc_threshold(sel.confidence(val_logits, "neg_entropy"), val_acc),
    )
    tgt_logits, tgt_truth = _separable_sample(5000, gen, sharp=0.7)  # less confident target
    tgt_acc = float((tgt_logits.argmax(1) == tgt_truth).mean())
    assert tgt_acc < val_acc - 0.2
    # Without the vendor's threshold the average confidence is no estimate here.
    assert abs(float(sel.confidence(tgt_logits, "max_softmax").mean()) - tgt_acc) > 0.1
    for score in ("max_softmax", "neg_entropy"):
        estimate = sel.atc_accuracy(tgt_logits, cal, score)
        assert estimate == pytest.approx(tgt_acc, abs=0.01), score


def test_calibrate_vendor_side_and_manifest_round_trip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.randn(40, 3, 4, 4)
    y = model(x).argmax(1).numpy()
    y[:10] = (y[:10] + 1) % 3  # 30 of 40 right
    cal = sel.calibrate(model, x, y)
    assert cal.validation_accuracy == pytest.approx(0.75)
    assert cal.validation_images == 40
    out = sel.model_outputs(model, x, views=False)
    for score in ("max_softmax", "neg_entropy"):
        assert sel.atc_accuracy(out, cal, score) == pytest.approx(0.75)
    stats = SourceStats.from_dict({"class_counts": [1, 2, 3], "calibration": cal.to_dict()}, 3)
    assert stats.calibration == cal
    assert stats.to_dict()["calibration"] == cal.to_dict()
    with pytest.raises(PackageError, match="validation_accuracy"):
        SourceStats.from_dict({"calibration": {**cal.to_dict(), "validation_accuracy": 1.5}}, 3)
    with pytest.raises(PackageError, match="calibration.extra"):
        SourceStats.from_dict({"calibration": {**cal.to_dict(), "extra": 1}}, 3)
    with pytest.raises(ConfigError, match="input spec"):
        sel.calibrate(model, np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2))


def test_anchored_accuracy_by_hand() -> None:
    # Source: confident (neg entropy ~0) on images 0-3, uniform on 4-7.
    source = torch.zeros(8, 3)
    source[:4, 0] = 30.0
    cal = Calibration(0.9, 100, atc_max_softmax=0.5, atc_neg_entropy=-0.5)
    assert sel.atc_accuracy(source, cal) == 0.5
    assert sel.anchored_accuracy(source, source, cal) == 0.5
    adapted = torch.zeros(8, 3)
    adapted[:, 0] = 1.0  # class 0 everywhere: agrees on 0-7 (the source's ties go to class 0)
    adapted[[1, 5, 6], 0] = 0.0
    adapted[[1, 5, 6], 2] = 5.0  # changes one confident and two unconfident predictions
    # agree & confident: 0, 2, 3; disagree & unconfident: 5, 6 -> 5 / 8
    assert sel.anchored_accuracy(adapted, source, cal) == pytest.approx(5 / 8)


def _scores(**kw: float | int | None) -> sel.Scores:
    base: dict[str, float | int | None] = {
        "entropy": 0.5,
        "im": 1.0,
        "snd": 4.0,
        "agreement": 0.8,
        "kappa": 0.7,
        "stability": 0.9,
        "atc": None,
        "anchored": None,
        "images": 1000,
    }
    base.update(kw)
    return sel.Scores(**base)  # type: ignore[arg-type]


def test_gate_rule_calibrated() -> None:
    src = _scores(agreement=1.0, kappa=1.0, atc=0.6, anchored=0.6)
    better = sel.gate_decision(src, _scores(atc=0.9, anchored=0.7), method="tent")
    assert better.decision == "adapted" and better.criterion == "anchored"
    assert better.estimated_gain == pytest.approx(0.1)
    assert "tent is estimated better" in better.reason
    worse = sel.gate_decision(src, _scores(atc=0.95, anchored=0.55))  # confident, not better
    assert worse.decision == "source" and "source model is kept" in worse.reason
    tie = sel.gate_decision(src, _scores(atc=0.6, anchored=0.6))
    assert tie.decision == "source"
    # +0.004 from 3 % changed predictions on 1000 images: within noise (2 SE = 0.011).
    noise = sel.gate_decision(src, _scores(agreement=0.97, anchored=0.604))
    assert noise.decision == "source" and "2 standard errors: 0.011" in noise.reason
    many = sel.gate_decision(src, _scores(agreement=0.97, anchored=0.604, images=100_000))
    assert many.decision == "adapted"


def test_gate_rule_uncalibrated() -> None:
    src = _scores(im=0.5, agreement=1.0, kappa=1.0)
    assert sel.gate_decision(src, _scores(im=0.8, kappa=0.3)).decision == "adapted"
    less_im = sel.gate_decision(src, _scores(im=0.4, kappa=0.3))
    assert less_im.decision == "source" and "IM score" in less_im.reason
    scrambled = sel.gate_decision(src, _scores(im=0.5, kappa=-0.4))
    assert scrambled.decision == "source" and "permuted" in scrambled.reason
    assert scrambled.criterion == "uncalibrated" and scrambled.estimated_gain is None


def test_consensus_agreement_is_agreement_with_the_summed_softmax() -> None:
    # Image 0: two models vote class 0 mildly, one votes class 1 strongly -> 1 wins.
    a = torch.tensor([[0.6, 0.4], [1.0, 1e-6], [1e-6, 1.0]]).log()
    b = torch.tensor([[0.6, 0.4], [1.0, 1e-6], [1.0, 1e-6]]).log()
    c = torch.tensor([[0.01, 0.99], [1.0, 1e-6], [1e-6, 1.0]]).log()
    # Summed softmax per image: [1.21, 1.79] -> 1; [3, 0] -> 0; [1, 2] -> 1.
    assert sel.consensus_agreement([a, b, c]) == pytest.approx([2 / 3, 1 / 3, 1.0])
    assert sel.consensus_agreement([a]) == [1.0]
    with pytest.raises(ConfigError, match="pool is empty"):
        sel.consensus_agreement([])
    with pytest.raises(ConfigError, match="different output shapes"):
        sel.consensus_agreement([a, a[:2]])
    # Only a and b vote: [1.2, 0.8] -> 0; 0; [1, 1] ties -> 0. c still gets its agreement.
    assert sel.consensus_agreement([a, b, c], [True, True, False]) == pytest.approx(
        [2 / 3, 1.0, 1 / 3]
    )
    for bad in ([False, False, False], [True]):
        with pytest.raises(ConfigError, match="voters"):
            sel.consensus_agreement([a, b, c], bad)


def test_rank_candidates_rule_follows_the_gate() -> None:
    logits = [torch.randn(50, 3) for _ in range(3)]
    # Uncalibrated: information maximisation.
    plain = [(_scores(im=v), o) for v, o in zip((0.2, 0.9, 0.5), logits, strict=True)]
    ranking = sel.rank_candidates(plain, _scores())
    assert ranking.rule == "im" and ranking.values == (0.2, 0.9, 0.5) and ranking.best() == 1
    # Calibrated, one candidate estimated better than the source: consensus.
    src = _scores(atc=0.5, anchored=0.5)
    helps = [
        (_scores(atc=0.6, anchored=0.45, agreement=0.9), logits[0]),
        (_scores(atc=0.9, anchored=0.8, agreement=0.6), logits[1]),
        (_scores(atc=0.6, anchored=0.5, agreement=0.95), logits[2]),
    ]
    ranking = sel.rank_candidates(helps, src)
    assert ranking.rule == "consensus" and "1 of 3" in ranking.reason
    assert list(ranking.values) == sel.consensus_agreement(logits)
    # Calibrated, nobody passes: the one that changes the source least.
    worse = [(_scores(atc=0.6, anchored=0.45, agreement=a), o) for a, o in zip(
        (0.9, 0.97, 0.8), logits, strict=True)]  # fmt: skip
    ranking = sel.rank_candidates(worse, src)
    assert ranking.rule == "agreement" and ranking.best() == 1
    with pytest.raises(ConfigError, match="pool is empty"):
        sel.rank_candidates([], src)


def test_ranking_ties_go_to_the_first() -> None:
    ranking = sel.Ranking((0.5, 0.7, 0.7), "im", "")
    assert ranking.best() == 1


def test_candidates_from_method_grids() -> None:
    from sourcefree.engine import config as cfgmod
    from sourcefree.engine.registry import get_method

    plan = sel.plan_candidates(["shot", "adabn"], grid=True)
    shot = get_method("shot")
    assert len(shot.selection_grid) >= 2
    assert [c.method for c in plan].count("shot") == len(shot.selection_grid)
    assert [c.label for c in plan if c.method == "adabn"] == ["adabn"]  # no grid: defaults
    assert sel.plan_candidates(["shot"], grid=False) == [sel.Candidate("shot", {})]
    assert sel.Candidate("clup", {"n_clusters": None, "keep_fraction": 0.1}).label == (
        "clup:n_clusters=none,keep_fraction=0.1"
    )
    defaults = cfgmod.to_dict(shot.config_class())
    for cand in plan:
        if cand.method == "shot":  # every grid entry is a valid config
            cfg = sel.apply_overrides(shot.config_class, defaults, cand.overrides)
            for key, value in cand.overrides.items():
                assert getattr(cfg, key) == value
    user = {**defaults, "epochs": 3}
    with pytest.raises(ConfigError, match="--select auto varies 'epochs'"):
        sel.apply_overrides(shot.config_class, user, {"epochs": 5})


def test_every_declared_grid_entry_is_a_valid_config() -> None:
    from sourcefree.engine import config as cfgmod
    from sourcefree.engine.registry import get_method, list_methods

    grids = {name: get_method(name).selection_grid for name in list_methods()}
    assert grids["clup"] and grids["shot"] and grids["shot-im"]  # the documented grids
    for name, grid in grids.items():
        cls = get_method(name)
        defaults = cfgmod.to_dict(cls.config_class())
        for entry in grid:
            sel.apply_overrides(cls.config_class, defaults, entry)
    keys = {tuple(sorted(e)) for e in grids["clup"]}
    assert keys == {("keep_fraction", "n_clusters")}


def test_auto_methods_cheapest_first() -> None:
    from sourcefree.engine.registry import get_method

    names = sel.auto_methods(1)
    assert names[0] == "adabn"
    assert "la-cmfer" in names  # takes one package or several
    costs = [get_method(n).relative_cost for n in names]
    assert costs == sorted(costs)
    assert sel.auto_methods(2) == ["la-cmfer"]


def test_methods_command_lists_the_grids() -> None:
    import json

    from click.testing import CliRunner

    from sourcefree.cli.commands_adapt import methods_command

    out = CliRunner().invoke(methods_command, [])
    assert "--select auto tries: epochs=2 | epochs=5 | epochs=10" in out.output
    rows = {
        r["name"]: r for r in json.loads(CliRunner().invoke(methods_command, ["--json"]).output)
    }
    assert rows["shot"]["selection_grid"] == [{"epochs": 2}, {"epochs": 5}, {"epochs": 10}]
    assert rows["adabn"]["selection_grid"] == []


# --- issue 24: the gate's subsample, its standard errors, one forward per batch --------


def _old_model_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> sel.Outputs:
    """model_outputs as it was before issue 24: three separate passes of each batch."""
    logits, flips, shifts = [], [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            b = x[i : i + batch_size]
            logits.append(model(b)[0].float())
            padded = nn.functional.pad(b, (2, 2, 2, 2), mode="replicate")
            flips.append(model(b.flip(3))[0].argmax(1))
            shifts.append(model(padded[:, :, : b.shape[2], : b.shape[3]])[0].argmax(1))
    return sel.Outputs(torch.cat(logits), (torch.cat(flips), torch.cat(shifts)))


def _small_cnn_and_images(n: int = 300) -> tuple[nn.Module, torch.Tensor]:
    from sourcefree.engine.models import build_classifier

    torch.manual_seed(3)
    model = build_classifier("smallcnn", 5)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 32, 32) * 2 + 0.3)  # BatchNorm statistics
    return model.eval(), torch.randn(n, 3, 32, 32)


def test_one_forward_per_batch_with_its_views_is_bitwise_the_old_three_passes() -> None:
    model, x = _small_cnn_and_images()
    old, new = _old_model_outputs(model, x), sel.model_outputs(model, x)
    assert torch.equal(old.logits, new.logits)
    assert all(
        torch.equal(a, b) for a, b in zip(old.view_predictions, new.view_predictions, strict=True)
    )
    assert sel.score_outputs(new, new).to_dict() == sel.score_outputs(old, old).to_dict()


def test_model_outputs_on_indices_are_the_rows_of_the_full_pass() -> None:
    model, x = _small_cnn_and_images()
    full = sel.model_outputs(model, x)
    idx = sel.sample_indices(300, 40, seed=7)
    assert idx is not None
    part = sel.model_outputs(model, x, indices=idx, batch_size=30)
    assert torch.equal(part.logits, full.logits[idx])
    for a, b in zip(part.view_predictions, full.view_predictions, strict=True):
        assert torch.equal(a, b[idx])
    for bad in (np.array([0, 300]), np.array([-1]), np.zeros((2, 2), np.int64), np.ones(2)):
        with pytest.raises(ConfigError, match="indices"):
            sel.model_outputs(model, x, indices=bad)


def test_sample_indices_are_seeded_sorted_and_all_images_below_the_size() -> None:
    assert sel.sample_indices(100, 100, seed=0) is None  # every image, in order
    assert sel.sample_indices(100, 5000, seed=0) is None
    assert sel.sample_indices(100, 0, seed=0) is None  # 0: every image
    rng_before = torch.random.get_rng_state()
    a = sel.sample_indices(10_000, 500, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG untouched"
    b, c = sel.sample_indices(10_000, 500, seed=3), sel.sample_indices(10_000, 500, seed=4)
    assert a is not None and b is not None and c is not None
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.int64 and len(np.unique(a)) == 500
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 10_000


@pytest.mark.parametrize(
    ("value", "size"),
    [(None, sel.GATE_SAMPLE), ("all", 0), ("ALL", 0), ("0", 0), (0, 0), ("100", 100), (2, 2)],
)
def test_gate_sample_size_accepts_counts_and_all(value: int | str | None, size: int) -> None:
    assert sel.gate_sample_size(value) == size


@pytest.mark.parametrize(
    "value", ["-1", "1", 1, -5, "abc", "1e3", "2.5", 2.5, True, "", "9" * 50, "\x1b[31m9"]
)
def test_gate_sample_size_refuses_the_rest(value: object) -> None:
    with pytest.raises(ConfigError, match="gate-sample") as err:
        sel.gate_sample_size(value)  # type: ignore[arg-type]
    assert "\x1b" not in str(err.value) and "9" * 30 not in str(err.value)


def test_standard_errors_are_those_of_per_image_means() -> None:
    gen = torch.Generator().manual_seed(0)
    a, s = torch.randn(400, 4, generator=gen) * 3, torch.randn(400, 4, generator=gen) * 3
    flips = torch.randint(0, 4, (400,), generator=gen)
    out = sel.Outputs(a, (flips, a.argmax(1)))
    cal = Calibration(0.8, 100, atc_max_softmax=0.5, atc_neg_entropy=-0.6)
    se = sel.standard_errors(out, sel.Outputs(s), cal)
    n = 400

    def binomial(p: float) -> float:
        return math.sqrt(p * (1 - p) / n)

    scores = sel.score_outputs(out, sel.Outputs(s), cal)
    assert se["agreement"] == pytest.approx(binomial(scores.agreement), rel=1e-5)
    assert se["atc"] == pytest.approx(binomial(scores.atc or 0.0), rel=1e-5)
    assert se["anchored"] == pytest.approx(binomial(scores.anchored or 0.0), rel=1e-5)
    ent = -(torch.softmax(a.double(), 1) * torch.log_softmax(a.double(), 1)).sum(1)
    assert se["entropy"] == pytest.approx(float(ent.std(unbiased=False)) / 20, rel=1e-5)
    assert se["snd"] is None and se["kappa"] is None
    assert se["stability"] is not None and 0 < se["stability"] < 0.05
    # The delta-method error of IM agrees with a jackknife of the score itself.
    values = torch.tensor(
        [sel.information_maximisation(torch.cat([a[:i], a[i + 1 :]])) for i in range(n)]
    )
    jackknife = math.sqrt((n - 1) * float(((values - values.mean()) ** 2).mean()))
    assert se["im"] == pytest.approx(jackknife, rel=0.05)
    uncal = sel.standard_errors(sel.Outputs(a), sel.Outputs(s))
    assert uncal["atc"] is None and uncal["anchored"] is None and uncal["stability"] is None


def test_gate_reports_the_standard_error_of_the_images_scored() -> None:
    src = _scores(agreement=1.0, kappa=1.0, atc=0.6, anchored=0.6)
    few = sel.gate_decision(src, _scores(agreement=0.97, anchored=0.604, images=1000))
    many = sel.gate_decision(src, _scores(agreement=0.97, anchored=0.604, images=100_000))
    assert few.standard_error == pytest.approx(math.sqrt((0.03 - 0.004**2) / 1000))
    assert many.standard_error == pytest.approx(math.sqrt((0.03 - 0.004**2) / 100_000))
    assert few.to_dict()["standard_error"] == pytest.approx(few.standard_error, rel=1e-5)
    uncalibrated = sel.gate_decision(_scores(), _scores(im=2.0))
    assert uncalibrated.standard_error is None
    assert uncalibrated.to_dict()["standard_error"] is None


def test_views_of_every_kth_image_are_those_rows_of_the_full_views() -> None:
    model, x = _small_cnn_and_images()
    full = sel.model_outputs(model, x)
    for batch in (7, 64, 256):
        part = sel.model_outputs(model, x, view_images=40, batch_size=batch)
        # other batch compositions: the same values up to float rounding
        assert torch.allclose(part.logits, full.logits, rtol=0, atol=1e-5)
        assert torch.equal(part.predictions, full.predictions)
        rows = part.view_rows
        assert rows is not None and rows.tolist() == list(range(0, 300, 8))  # ceil(300 / 40)
        for a, b in zip(part.view_predictions, full.view_predictions, strict=True):
            assert torch.equal(a, b[rows])
        expected = np.mean([float((b[rows] == full.predictions[rows]).double().mean())
                            for b in full.view_predictions])  # fmt: skip
        assert sel.augmentation_stability(part) == pytest.approx(expected)
        kept = torch.stack([(b[rows] == full.predictions[rows]).double()
                            for b in full.view_predictions]).mean(0)  # fmt: skip
        se = float(kept.std(unbiased=False)) / math.sqrt(len(rows))
        assert sel.standard_errors(part, part)["stability"] == pytest.approx(se, abs=1e-6)
    whole = sel.model_outputs(model, x, view_images=300)  # at least every image: all of them
    assert whole.view_rows is None
    assert all(
        torch.equal(a, b)
        for a, b in zip(whole.view_predictions, full.view_predictions, strict=True)
    )
    with pytest.raises(ConfigError, match="view_images"):
        sel.model_outputs(model, x, view_images=-1)


def test_adapt_scores_the_views_of_at_most_stability_sample_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sourcefree.pipeline import decide

    seen: dict[str, Any] = {}

    def record(model: nn.Module, data: Any, **kw: Any) -> sel.Outputs:
        seen.update(kw)
        return sel.Outputs(torch.zeros(2, 3))

    monkeypatch.setattr(sel, "model_outputs", record)

    class _Prep:
        data, dev, sample = torch.zeros(2, 3, 4, 4), torch.device("cpu"), None

        class request:  # noqa: N801
            progress = False

    decide.gate_outputs(nn.Identity(), _Prep(), "scoring")  # type: ignore[arg-type]
    assert seen["view_images"] == sel.STABILITY_SAMPLE == 256


def test_stability_images_is_the_count_model_outputs_scores_views_of() -> None:
    from sourcefree.pipeline.report import SampleInfo, stability_images

    model, x = _small_cnn_and_images(40)
    for n, cap in ((40, 7), (40, 40), (39, 8), (1, 256)):
        out = sel.model_outputs(model, x[:n], view_images=cap)
        m = int(out.view_predictions[0].numel())
        assert m == (-(-n // -(-n // cap)) if n > cap else n)
    assert [stability_images(n) for n in (0, 1, 256, 257, 300, 2048, 8192)] == [
        0, 1, 256, 129, 150, 256, 256,
    ]  # fmt: skip
    assert SampleInfo(2048, 9000).to_dict()["stability_images"] == 256


class _LogitsOnly(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)[0]
        return out


def test_model_outputs_keep_the_features_of_every_kth_scored_image() -> None:
    model, x = _small_cnn_and_images()
    assert sel.model_outputs(model, x).features is None  # not asked for
    with torch.no_grad():
        feats = model(x)[1]
    every = sel.model_outputs(model, x, feature_images=0, batch_size=64)
    assert every.feature_rows is None and every.features is not None
    assert torch.allclose(every.features, feats, rtol=0, atol=1e-5)
    idx = sel.sample_indices(300, 90, seed=1)
    assert idx is not None
    for views in (True, False):  # the views share the forward pass, not the features
        part = sel.model_outputs(model, x, indices=idx, feature_images=30, views=views,
                                 batch_size=16)  # fmt: skip
        rows = part.feature_rows
        assert rows is not None and rows.tolist() == list(range(0, 90, 3))
        assert part.features is not None and part.features.shape == (30, feats.shape[1])
        assert torch.allclose(part.features, feats[idx][rows], rtol=0, atol=1e-5)
        pair = part.feature_pairs()
        assert pair is not None and torch.equal(pair[1], part.logits[rows])
    with pytest.raises(ConfigError, match="features cover only some"):
        part.rows(np.arange(5))
    # Logits-only models keep none.
    plain = sel.model_outputs(_LogitsOnly(model), x, feature_images=0)
    assert plain.features is None and plain.feature_pairs() is None


def test_rank_candidates_puts_gate_passing_candidates_first_by_class_ami() -> None:
    from sourcefree.pipeline.validators import class_ami

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 6
    truth = torch.arange(60) % 3
    feats = centres[truth] + torch.randn(60, 8, generator=g)
    eye = torch.eye(3) * 5
    # a follows the feature clusters, b half of them, c (which fails the gate) all of them.
    noisy = torch.where(torch.arange(60) % 2 == 0, truth, (truth + 1) % 3)
    outs = [sel.Outputs(eye[truth], features=feats),
            sel.Outputs(eye[noisy], features=feats),
            sel.Outputs(eye[truth] * 2, features=feats)]  # fmt: skip
    src = _scores(atc=0.5, anchored=0.5)
    passes = _scores(atc=0.9, anchored=0.8, agreement=0.6)
    fails = _scores(atc=0.6, anchored=0.45, agreement=0.9)
    ranking = sel.rank_candidates([(passes, outs[0]), (passes, outs[1]), (fails, outs[2])], src)
    assert ranking.rule == "class_ami" and "2 of 3" in ranking.reason
    assert ranking.passing == (True, True, False)
    want = [class_ami(feats, o.logits) for o in outs]
    assert list(ranking.values) == pytest.approx(want)
    assert want[0] == pytest.approx(1.0) and want[2] == pytest.approx(1.0)
    assert want[1] < 0.9
    # c's ClassAMI ties a's, but c fails the gate: a is chosen, and b still beats c.
    assert ranking.best() == 0 and ranking.key(1) > ranking.key(2)
    # Outputs without features: the passing ones first, by the pool's consensus.
    bare = [(s, sel.Outputs(o.logits)) for s, o in zip((passes, passes, fails), outs, strict=True)]
    ranking = sel.rank_candidates(bare, src)
    assert ranking.rule == "consensus" and ranking.passing == (True, True, False)
    assert ranking.best() == 0
