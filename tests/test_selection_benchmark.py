"""benchmarks/selection.py: the Spearman analysis, per (preset, seed) and pooled over the grid."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest


def _row(preset: str, candidate: str, accuracy: float, anchored: float) -> dict[str, Any]:
    scores = {"entropy": 1.0 - anchored, "im": anchored, "snd": anchored, "agreement": anchored,
              "kappa": anchored, "stability": anchored, "atc": anchored, "anchored": anchored,
              "images": 100}  # fmt: skip
    return {"preset": preset, "seed": 0, "candidate": candidate, "method": candidate,
            "is_default": True, "in_grid": False, "config_key": candidate, "scores": scores,
            "value": anchored, "default_value": anchored, "accuracy": accuracy}  # fmt: skip


def test_pooled_spearman_ranks_across_groups_where_per_group_does_not(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    sel = load_benchmark("selection")
    # Inside each preset the score orders the candidates the wrong way round
    # (per-group rho = -1), but it separates the presets' accuracy levels.
    rows = [_row("a", "source-only", 0.90, 0.90), _row("b", "source-only", 0.40, 0.40)]
    for i, name in enumerate(("x", "y", "z")):
        rows.append(_row("a", name, 0.94 + 0.01 * i, 0.92 - 0.01 * i))
        rows.append(_row("b", name, 0.60 + 0.01 * i, 0.57 - 0.01 * i))
    analysis = sel.analyse(rows, ["x", "y", "z"], 100)
    assert analysis["spearman_mean"]["anchored"] == -1.0
    # Pooled ranks (accuracy, score): (0,2) (1,1) (2,0) (3,5) (4,4) (5,3):
    # sum d^2 = 16, rho = 1 - 6 * 16 / (6 * 35).
    assert analysis["spearman_pooled"]["anchored"] == round(1 - 96 / 210, 4)
    assert analysis["spearman_pooled"]["entropy"] == round(1 - 96 / 210, 4)  # lower is better
    assert analysis["spearman_pooled"]["value"] is None  # pool values rank one pool only
    payload = {"analysis": analysis, "argv": "-", "n_target": 100, "n_source": 1, "n_val": 1,
               "machine": {"threads": 1}, "methods": ["x"], "presets": ["a", "b"],
               "seeds": [0], "rows": rows, "wall_seconds": 1.0}  # fmt: skip
    assert "over every adapted candidate of the grid" in sel.markdown(payload)


def _source_scores(atc: float, images: int) -> dict[str, Any]:
    """A calibrated source's scores whose ATC (and anchored) estimate is ``atc``."""
    return {"entropy": 0.5, "im": 0.5, "snd": 4.0, "agreement": 1.0, "kappa": 1.0,
            "stability": 1.0, "atc": atc, "anchored": atc, "images": images}  # fmt: skip


def test_rank_pools_ranks_each_pool_on_its_own(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    import torch

    from sourcefree.pipeline import selection

    bench = load_benchmark("selection")
    # Calibration makes every candidate pass the gate: consensus rule in every pool.
    src_scores = _source_scores(0.2, 4)
    cand_scores = {**src_scores, "agreement": 0.0, "kappa": 0.0, "anchored": 1.0}
    one_hot = torch.eye(3) * 20
    # Different confidences so that no summed softmax ties.
    logits = {
        "m": one_hot[[1, 1, 1, 1]],
        "m:a": one_hot[[1, 1, 2, 2]],
        "m:b": one_hot[[1, 2, 2, 2]] / 20,  # top-1 probability 0.58
        "n": one_hot[[2, 2, 2, 2]] / 2,
    }
    group = [{"candidate": "source-only", "method": "-", "is_default": False, "in_grid": False,
              "config_key": "source", "scores": src_scores}]  # fmt: skip
    for key, default in (("m", True), ("m:a", False), ("m:b", False), ("n", True)):
        row = {"candidate": key, "method": key.split(":")[0], "is_default": default,
               "in_grid": not default, "config_key": key, "scores": cand_scores}  # fmt: skip
        group.append(row)
    outputs = {k: selection.Outputs(v) for k, v in logits.items()}
    bench.rank_pools(group, outputs)
    by = {r["candidate"]: r for r in group}
    assert by["source-only"]["value"] is None and by["source-only"]["rule"] is None
    # All four adapted (all pass: lifted by PASS_OFFSET); outputs without features
    # fall back to the consensus: the summed softmax picks 1, 1, 2, 2.
    off = bench.PASS_OFFSET
    values = [by[k]["value"] - off for k in ("m", "m:a", "m:b", "n")]
    assert values == [0.5, 1.0, 0.75, 0.5]
    assert {by[k]["rule"] for k in ("m", "m:a", "m:b", "n")} == {"consensus"}
    # m's grid alone (m:a, m:b): the confident m:a outvotes m:b where they differ.
    assert (by["m:a"]["grid_value"] - off, by["m:b"]["grid_value"] - off) == (1.0, 0.75)
    assert by["m"]["grid_value"] is None and by["m"]["default_value"] is not None
    # Defaults m and n: m is the more confident on every image: m 1.0, n 0.0.
    assert (by["m"]["default_value"] - off, by["n"]["default_value"] - off) == (1.0, 0.0)
    assert by["m:a"]["default_value"] is None and by["m:a"]["default_rule"] is None


def test_weighted_spearman_by_hand(load_benchmark: Callable[[str], ModuleType]) -> None:
    bench = load_benchmark("selection")
    # Scores 1, 2, 3 weigh (1/3)^2, (2/3)^2, 1, i.e. 1 : 4 : 9. Weighted ranks (times 9):
    # scores 1, 5, 14; accuracies 0.1, 0.3, 0.2 -> 1, 14, 10. Weighted means 147/14 = 10.5
    # for both; deviations (-9.5, -5.5, 3.5) and (-9.5, 3.5, -0.5);
    # cov = (90.25 - 77 - 15.75) / 14, var = 321.5 / 14 and 141.5 / 14.
    want = -2.5 / math.sqrt(321.5 * 141.5)
    assert bench.weighted_spearman([1, 2, 3], [0.1, 0.3, 0.2]) == pytest.approx(want)
    # Plain Spearman is +0.5 for both orders below; the weighted one counts the top most.
    top_right = bench.weighted_spearman([1, 2, 3], [0.2, 0.1, 0.3])
    top_wrong = bench.weighted_spearman([1, 2, 3], [0.1, 0.3, 0.2])
    assert bench.spearman([1, 2, 3], [0.2, 0.1, 0.3]) == bench.spearman([1, 2, 3], [0.1, 0.3, 0.2])
    assert top_right is not None and top_wrong is not None and top_right > 0.5 > top_wrong
    assert bench.weighted_spearman([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert bench.weighted_spearman([1, 2], [1, 2]) is None
    assert bench.weighted_spearman([1, 1, 1], [1, 2, 3]) is None


def test_weighted_spearman_with_equal_weights_is_spearman(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    bench = load_benchmark("selection")
    x, y = [0.3, 0.1, 0.1, 0.7, 0.5, 0.5], [0.2, 0.4, 0.1, 0.9, 0.3, 0.8]  # ties in x
    assert bench.weighted_spearman(x, y, power=0.0) == pytest.approx(bench.spearman(x, y))
    w = np.ones(6)
    assert list(bench.weighted_ranks(np.array(x), w)) == [3.0, 1.5, 1.5, 6.0, 4.5, 4.5]


def _validator_row(
    name: str, held: float | None, value: float, bnm: float | None
) -> dict[str, Any]:
    row = _row("a", name, 0.5, value)
    row["scores"] = {**row["scores"], "im": -value, "snd": value}
    if held is not None:
        row["heldout_accuracy"] = held
    if bnm is not None:
        row["validators"] = {"bnm": bnm, "class_ami": value}
    return row


def test_validators_are_judged_on_held_out_accuracy_with_weighted_spearman_and_regret(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    bench = load_benchmark("selection")
    held = [0.60, 0.70, 0.80, 0.90]
    rows = [_row("a", "source-only", 0.5, 0.5)]
    rows += [_validator_row(f"m{i}", h, 0.1 * i, 0.4 - 0.1 * i) for i, h in enumerate(held)]
    analysis = bench.analyse(rows, [], 100)
    group = analysis["groups"][0]["validators"]
    assert group["judge"] == "held-out" and group["candidates"] == 4
    cols = group["validators"]
    # `value` and ClassAMI order the candidates as held-out accuracy does; IM and BNM reversed.
    assert cols["value"]["weighted_spearman"] == 1.0 and cols["value"]["regret"] == 0.0
    assert cols["class_ami"]["picked"] == "m3"
    # Reversed: about -1 (weighted ranks cumulate the weights in opposite orders).
    assert cols["im"]["weighted_spearman"] < -0.99 and cols["im"]["picked"] == "m0"
    assert cols["bnm"]["regret"] == pytest.approx(0.3)  # picks m0: 0.90 - 0.60
    summary = analysis["validators"]["presets"]["a"]
    assert summary["judge"] == "held-out" and summary["validators"]["bnm"]["regret"] == 0.3
    payload = {"analysis": analysis, "argv": "-", "n_target": 100, "n_test": 50, "n_source": 1,
               "n_val": 1, "machine": {"threads": 1}, "methods": ["m"], "presets": ["a"],
               "seeds": [0], "rows": rows, "wall_seconds": 1.0}  # fmt: skip
    text = bench.markdown(payload)
    assert "### Validators" in text
    assert "| a | held-out | 1 | +1.00 / 0.000 | -1.00 / 0.300 |" in text


def test_rows_without_validators_or_held_out_accuracy_still_analyse(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    bench = load_benchmark("selection")
    rows = [_row("a", "source-only", 0.5, 0.5)]
    rows += [_validator_row(f"m{i}", None, 0.1 * i, None) for i in range(3)]
    rows[-1]["accuracy"] = 0.9  # transductive judge: m2 is the best
    analysis = bench.analyse(rows, [], 100)
    group = analysis["groups"][0]["validators"]
    assert group["judge"] == "transductive"
    assert group["validators"]["bnm"] is None and group["validators"]["class_ami"] is None
    assert group["validators"]["snd"]["regret"] == 0.0
    payload = {"analysis": analysis, "argv": "-", "n_target": 100, "n_source": 1, "n_val": 1,
               "machine": {"threads": 1}, "methods": ["m"], "presets": ["a"], "seeds": [0],
               "rows": rows, "wall_seconds": 1.0}  # fmt: skip
    assert "| a | transductive | 1 | " in bench.markdown(payload)
    assert bench.markdown(payload).rstrip().endswith("| - | - |")


def test_clup_and_pocan_candidates_start_from_the_short_schedule(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    selection_bench = load_benchmark("selection")
    assert {"clup", "pocan"} <= set(selection_bench.DEFAULT_METHODS)
    assert set(selection_bench.SHORT) == {"clup", "pocan"}  # the others set their own epochs
    cfg = selection_bench._config(selection_bench.sel.Candidate("clup", {"keep_fraction": 0.3}))
    assert (cfg.ssl.epochs, cfg.finetune.epochs, cfg.keep_fraction) == (2, 6, 0.3)


def test_run_group_scores_validators_and_held_out_accuracy(
    load_benchmark: Callable[[str], ModuleType],
    source_package_factory: Callable[..., Path],
    tmp_path: Path,
) -> None:
    from sourcefree.data.synthetic import CLASSES
    from sourcefree.package.loader import load_package

    bench = load_benchmark("selection")
    pkg = load_package(source_package_factory(tmp_path / "pkg", labels=CLASSES))
    cands = [bench.sel.Candidate("pocan", {})]
    rows, outputs_of, source = bench.run_group("wild-mild", 0, pkg, None, cands, (48, 24))
    assert [r["candidate"] for r in rows] == ["source-only", "pocan"]
    assert source.logits.shape == (48, len(CLASSES)) and len(outputs_of) == 1
    for r in rows:
        assert set(r["validators"]) == {"bnm", "class_ami"}
        assert 0.0 <= r["heldout_accuracy"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert '"epochs": 2' in rows[1]["config_key"]  # POCAN at the SHORT schedule
    rows, _, _ = bench.run_group("wild-mild", 0, pkg, None, [], (48, 0))
    assert "heldout_accuracy" not in rows[0] and "accuracy" in rows[0]


def test_rule_variants_rank_passing_candidates_first(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    import torch

    from sourcefree.pipeline import selection

    bench = load_benchmark("selection")
    src = _source_scores(0.5, 400)
    # a, b pass the gate (anchored gain +0.5 on 400 images); c fails (gain -0.2).
    passes = {**src, "agreement": 0.5, "kappa": 0.4, "anchored": 1.0}
    fails = {**src, "im": 1.9, "agreement": 0.6, "anchored": 0.3}
    rows = [
        {"config_key": "a", "scores": {**passes, "im": 1.0}, "validators": {"class_ami": 0.3}},
        {"config_key": "b", "scores": {**passes, "im": 1.5}, "validators": {"class_ami": 0.9}},
        *({"config_key": k, "scores": fails, "validators": {"class_ami": 0.95}} for k in "cde"),
    ]  # fmt: skip
    eye = torch.eye(3)
    # a (top-1 probability 0.79) and b (about 1.0) pass and differ on the last image;
    # c, d and e fail the gate and say class 2 everywhere.
    outs = {
        "a": selection.Outputs(eye[[0, 0, 1, 1]] * 2),
        "b": selection.Outputs(eye[[0, 0, 1, 0]] * 20),
        **{k: selection.Outputs(eye[[2, 2, 2, 2]] * 20) for k in "cde"},
    }
    source = bench._gate_scores(src, 400)
    got = bench.rule_values(rows, outs, source)
    off = bench.PASS_OFFSET
    # Every candidate votes: the three failing ones outvote a and b everywhere.
    assert got["consensus"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    # Only a and b vote (b the more confident where they differ): 0, 0, 1, 0.
    assert got["passing-consensus"] == [off + 0.75, off + 1.0, 0.0, 0.0, 0.0]
    assert got["passing-im"] == [off + 1.0, off + 1.5, 1.9, 1.9, 1.9]
    assert got["passing-ami"] == [off + 0.3, off + 0.9, 0.95, 0.95, 0.95]
    # Nobody passes: every rule is agreement with the source.
    none = [{**r, "scores": {**src, "agreement": 0.7 + i / 10}} for i, r in enumerate(rows)]
    got = bench.rule_values(none, outs, source)
    want = [pytest.approx(0.7 + i / 10) for i in range(5)]
    assert all(v == want for v in got.values())
    assert set(got) == set(bench.RULE_VARIANTS)
