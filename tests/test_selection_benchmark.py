"""benchmarks/selection.py: the Spearman analysis, per (preset, seed) and pooled over the grid."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any


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
    payload = {"analysis": analysis, "argv": "-", "n_target": 100, "n_source": 1, "n_val": 1,
               "machine": {"threads": 1}, "methods": ["x"], "presets": ["a", "b"],
               "seeds": [0], "rows": rows, "wall_seconds": 1.0}  # fmt: skip
    assert "over every adapted candidate of the grid" in sel.markdown(payload)


def test_rank_pools_ranks_each_pool_on_its_own(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    import torch

    from sourcefree.pipeline import selection

    bench = load_benchmark("selection")
    # Calibration makes every candidate pass the gate: consensus rule in every pool.
    src_scores = {"entropy": 0.5, "im": 0.5, "snd": 4.0, "agreement": 1.0, "kappa": 1.0,
                  "stability": 1.0, "atc": 0.2, "anchored": 0.2, "images": 4}  # fmt: skip
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
    # All four adapted: the summed softmax picks 1, 1, 2, 2.
    assert [by[k]["value"] for k in ("m", "m:a", "m:b", "n")] == [0.5, 1.0, 0.75, 0.5]
    assert {by[k]["rule"] for k in ("m", "m:a", "m:b", "n")} == {"consensus"}
    # m's grid alone (m:a, m:b): the confident m:a outvotes m:b where they differ.
    assert by["m:a"]["grid_value"] == 1.0 and by["m:b"]["grid_value"] == 0.75
    assert by["m"]["grid_value"] is None and by["m"]["default_value"] is not None
    # Defaults m and n: m is the more confident on every image: m 1.0, n 0.0.
    assert (by["m"]["default_value"], by["n"]["default_value"]) == (1.0, 0.0)
    assert by["m:a"]["default_value"] is None and by["m:a"]["default_rule"] is None
