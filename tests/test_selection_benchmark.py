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
            "value": anchored, "accuracy": accuracy}  # fmt: skip


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
