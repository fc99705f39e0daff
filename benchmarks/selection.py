"""Label-free model selection and the do-no-harm gate, judged with labels afterwards.

For every seed: the vendor's ``smallcnn`` is trained on ``studio`` faces and a
calibration (validation accuracy, ATC thresholds: :func:`sourcefree.pipeline.selection.calibrate`)
is fitted on held-out ``studio`` faces, as ``examples/vendor_export.py`` does. For
every preset, every candidate (each method's default config and each entry of its
``selection_grid``) adapts a fresh copy of the source model in-process
(``Method`` + ``Trainer``, CPU); its label-free scores are computed on the target
images (:mod:`sourcefree.pipeline.selection`) and, only then, its true accuracy.

Reported (labels judge the selectors; they choose nothing):

- **Spearman** rank correlation between each score (oriented: higher is better)
  and true accuracy over the candidates of one (preset, seed), then averaged;
- **regret of ``--select auto``**: per method with a grid, the accuracy of the
  best candidate by labels minus the one the label-free value picks;
- **``-m auto``**: the method default with the best label-free value, passed
  through the gate, against the best single method by labels;
- **gate**: for every adapted candidate, the calibrated and the uncalibrated
  decision against the truth (adapted more accurate than the source);
- **validators**: ours (the selection value) next to the field's validators
  (IM, SND, BNM, ClassAMI: :mod:`sourcefree.pipeline.validators`) on the same pools,
  by the weighted Spearman correlation of Musgrave et al. (arXiv 2208.07360) and the
  regret of the candidate each one picks, judged on a held-out target *test* set of
  the same preset (generator seed ``4000 + s``, as benchmarks/accuracy.py) that no
  method adapts on; rows without it (older runs) are judged transductively.

CluP and POCAN run the shortened schedule of benchmarks/accuracy.py (:data:`SHORT`);
the other methods their defaults and their ``selection_grid``.

Writes ``benchmarks/results/selection.json`` and the "## Label-free selection"
section of ``docs/benchmarks.md``.

    python benchmarks/selection.py [--methods adabn tent shot] [--presets wild-mild prior-shift]
                                   [--seeds 0 1 2] [--quick] [--n-test 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks.* are importable from the root
    sys.path.insert(0, str(ROOT))

from benchmarks import accuracy  # noqa: E402
from sourcefree.data.synthetic import CLASSES, generate  # noqa: E402
from sourcefree.engine import config as cfgmod  # noqa: E402
from sourcefree.engine.method import MethodContext, SourceModel, TargetData  # noqa: E402
from sourcefree.engine.models import load_classifier  # noqa: E402
from sourcefree.engine.registry import get_method  # noqa: E402
from sourcefree.engine.reproducibility import seed_everything  # noqa: E402
from sourcefree.engine.trainer import Trainer  # noqa: E402
from sourcefree.export import source_package  # noqa: E402
from sourcefree.fsutil import replace_marked_block  # noqa: E402
from sourcefree.package.loader import Package, load_package  # noqa: E402
from sourcefree.package.manifest import Calibration, InputSpec  # noqa: E402
from sourcefree.pipeline import selection as sel  # noqa: E402
from sourcefree.pipeline import validators as val  # noqa: E402
from sourcefree.vendor.training import TrainConfig, train_classifier  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "selection.json"
DOCS = ROOT / "docs" / "benchmarks.md"
START = "<!-- selection:start -->"
END = "<!-- selection:end -->"

SIZE = 32
DEFAULT_METHODS = ("adabn", "tent", "shot", "shot-im", "difc", "clup", "pocan")
QUICK_METHODS = ("adabn", "tent", "shot", "shot-im")
#: Row keys of the pool values (see :func:`rank_pools`) and of the rule each pool used.
POOL_KEYS = {"value": "rule", "grid_value": "grid_rule", "default_value": "default_rule"}
SCORES = ("entropy", "im", "snd", "agreement", "kappa", "stability", "atc", "anchored")
#: Config overrides every candidate of these methods starts from: benchmarks/accuracy.py's
#: SHORT schedule (the other methods' candidates set their own epochs).
SHORT: dict[str, tuple[str, ...]] = {m: accuracy.SHORT[m] for m in ("clup", "pocan")}
#: Generator seed offset of the held-out target test set (benchmarks/accuracy.py's).
TEST_SEED = accuracy.TEST_SEED
#: Ours and the field's validators, in the "Validators" table's order, with their labels.
VALIDATOR_COLUMNS = {
    "value": "ours (`value`)",
    "im": "IM",
    "snd": "SND",
    "bnm": "BNM",
    "class_ami": "ClassAMI",
}
#: Power of the weights of :func:`weighted_spearman` (Musgrave et al.'s evaluation).
WEIGHT_POWER = 2.0
#: Alternative pool rules, compared in the "Rules" table on the same pools: each
#: differs from ``rank_candidates`` only when some candidate passes the gate (else all
#: rank by agreement with the source). ``passing-*``: the candidates that pass the
#: gate rank above those that do not, and among themselves by consensus of the
#: passing ones, by IM or by ClassAMI. Column key ``rule:NAME`` (:func:`validator_value`).
RULE_VARIANTS = ("consensus", "passing-consensus", "passing-im", "passing-ami")
#: Added to a passing candidate's value so that it ranks above every failing one.
PASS_OFFSET = 100.0
#: Columns the comparisons compute: the validators, then the rule variants.
COMPARED = (*VALIDATOR_COLUMNS, *(f"rule:{name}" for name in RULE_VARIANTS))


def _source(seed: int, workdir: Path, n_source: int, n_val: int) -> tuple[Path, float]:
    """Train the vendor's model, calibrate it on held-out faces, export it."""
    spec = InputSpec(size=(SIZE, SIZE))
    t0 = time.perf_counter()
    train = generate("studio", n_source, SIZE, seed=1000 + seed)
    model = train_classifier(train.images, train.labels, len(CLASSES), spec, TrainConfig(seed=seed))
    val = generate("studio", n_val, SIZE, seed=3000 + seed)
    cal = sel.calibrate(model, val.images, val.labels, spec)
    out = workdir / f"source-{seed}"
    source_package(
        model.eval(),
        architecture="smallcnn",
        labels=list(CLASSES),
        input_spec=spec,
        out=out,
        source_stats={"calibration": cal.to_dict()},
    )
    return out, time.perf_counter() - t0


def _candidates(methods: list[str]) -> list[sel.Candidate]:
    """Each method's default config, then its grid entries (duplicates run once)."""
    out: list[sel.Candidate] = []
    for name in methods:
        out.append(sel.Candidate(name, {}))
        out.extend(sel.Candidate(name, dict(e)) for e in get_method(name).selection_grid)
    return out


def _config(cand: sel.Candidate) -> Any:
    """The candidate's config: the method's defaults (:data:`SHORT` where listed), its entry."""
    cls = get_method(cand.method)
    base = cfgmod.load_config(cls.config_class, overrides=SHORT.get(cand.method, ()))
    return sel.apply_overrides(cls.config_class, cfgmod.to_dict(base), cand.overrides)


def _config_key(cand: sel.Candidate) -> str:
    return cand.method + json.dumps(cfgmod.to_dict(_config(cand)), sort_keys=True)


@dataclass(frozen=True)
class Run:
    """What one model leaves for the rows: its outputs on the target and test images."""

    outputs: sel.Outputs
    seconds: float
    heldout: torch.Tensor | None
    """(M,) top-1 on the held-out test images; None without a test set."""


def _evaluate(
    model: torch.nn.Module, data: TargetData, test: TargetData | None, seconds: float
) -> Run:
    """Outputs (with every image's features) on the target images, top-1 on the test images."""
    heldout = None if test is None else sel.model_outputs(model, test, views=False).predictions
    return Run(sel.model_outputs(model, data, feature_images=0), seconds, heldout)


def _run(
    cand: sel.Candidate, pkg: Package, data: TargetData, test: TargetData | None, seed: int
) -> Run:
    cls = get_method(cand.method)
    cfg = _config(cand)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    device = torch.device("cpu")
    seed_everything(seed)
    method = cls(cfg, MethodContext((SourceModel(pkg, model),), data, device, seed))
    t0 = time.perf_counter()
    Trainer(method, data, device=device, seed=seed).run()
    seconds = time.perf_counter() - t0
    return _evaluate(method.export_model(), data, test, seconds)


def validator_fields(run: Run) -> dict[str, float]:
    """The field's validators the scores lack (BNM, ClassAMI), to six significant digits.

    IM and SND are the rows' ``scores.im`` and ``scores.snd`` (the same functions).
    """
    features = run.outputs.feature_pairs()
    if features is None:
        raise SystemExit("the benchmark's models return (logits, features); this one did not")
    values = {
        "bnm": val.batch_nuclear_norm(run.outputs),
        "class_ami": val.class_ami(*features),
    }
    return {k: float(f"{v:.6g}") for k, v in values.items()}


def rule_values(
    rows: list[dict[str, Any]], outputs_of: dict[str, sel.Outputs], source: sel.Scores
) -> dict[str, list[float]]:
    """Each of :data:`RULE_VARIANTS`' values for one pool (rows in the pool's order)."""
    scores = [_gate_scores(r["scores"], r["scores"]["images"]) for r in rows]
    outs = [outputs_of[r["config_key"]] for r in rows]
    passing = [sel.gate_decision(source, s).decision == "adapted" for s in scores]
    if not any(passing):
        return {name: [s.agreement for s in scores] for name in RULE_VARIANTS}
    out = {
        "consensus": sel.consensus_agreement(outs),
        "passing-consensus": lifted(sel.consensus_agreement(outs, passing), passing),
        "passing-im": lifted([s.im for s in scores], passing),
    }
    ami = [(r.get("validators") or {}).get("class_ami") for r in rows]
    if all(v is not None for v in ami):
        out["passing-ami"] = lifted([float(v) for v in ami if v is not None], passing)
    return out


def lifted(values: Sequence[float], passing: Sequence[bool]) -> list[float]:
    """``values`` with :data:`PASS_OFFSET` added where ``passing``: one number that sorts
    as a passing-first ranking (no flags: the values as they are)."""
    if not passing:
        return list(values)
    return [v + PASS_OFFSET * ok for v, ok in zip(values, passing, strict=True)]


def rank_pools(group: list[dict[str, Any]], outputs_of: dict[str, sel.Outputs]) -> None:
    """Label-free values of one (preset, seed), ranked pool by pool as ``adapt`` ranks them.

    ``group`` holds the source-only row and every candidate's row; ``outputs_of``
    the candidates' outputs by ``config_key``.

    ``value``: among every distinct adapted candidate (the Spearman pool);
    ``grid_value``: among a method's grid entries (``--select auto``);
    ``default_value``: among the method defaults (``-m auto``). Each pool's rule is
    stored with its values (``*_rule``). Rows outside a pool get None. Where the
    rule ranks gate-passing candidates first, theirs are lifted by :data:`PASS_OFFSET`
    so that one number sorts as the ranking.
    """
    src = next(r for r in group if r["candidate"] == "source-only")
    source = _gate_scores(src["scores"], src["scores"]["images"])
    adapted = [r for r in group if r["candidate"] != "source-only"]
    unique = list({r["config_key"]: r for r in adapted}.values())
    pools: list[tuple[str, list[dict[str, Any]]]] = [("value", unique)]
    for name in dict.fromkeys(r["method"] for r in adapted):
        pools.append(("grid_value", [r for r in adapted if r["method"] == name and r["in_grid"]]))
    pools.append(("default_value", [r for r in adapted if r["is_default"]]))
    for r in group:
        for key, rule in POOL_KEYS.items():
            r[key] = r[rule] = None
    for key, rows in pools:
        if not rows:
            continue
        ranking = sel.rank_candidates(
            [(_gate_scores(r["scores"], r["scores"]["images"]), outputs_of[r["config_key"]])
             for r in rows],
            source,
        )  # fmt: skip
        for r, v in zip(rows, lifted(ranking.values, ranking.passing), strict=True):
            r[key] = v
            r[POOL_KEYS[key]] = ranking.rule
    variants = rule_values(unique, outputs_of, source)
    for i, r in enumerate(unique):
        r["rule_values"] = {name: round(vals[i], 6) for name, vals in variants.items()}


def subsample_rows(
    group: list[dict[str, Any]],
    outputs_of: dict[str, sel.Outputs],
    source: sel.Outputs,
    cal: Calibration | None,
    *,
    size: int,
    draw: int,
) -> list[dict[str, Any]]:
    """The rows of one (preset, seed) scored on ``adapt``'s gate subsample of ``size`` images.

    The same outputs as the full rows, restricted to ``sel.sample_indices(n, size, draw)``
    (what ``adapt --gate-sample size --seed draw`` would score); accuracies stay those
    of the whole target set, which the decisions are judged against.
    """
    idx = sel.sample_indices(int(source.logits.shape[0]), size, draw)
    if idx is None:
        return [dict(r) for r in group]
    src = source.rows(idx)
    subsets = {key: out.rows(idx) for key, out in outputs_of.items()}
    rows = []
    for r in group:
        out = src if r["candidate"] == "source-only" else subsets[r["config_key"]]
        kept = {k: v for k, v in r.items() if k != "validators"}  # of the full set: dropped
        rows.append({**kept, "scores": sel.score_outputs(out, src, cal).to_dict(), "draw": draw})
    rank_pools(rows, subsets)
    return rows


def compare_analyses(full: dict[str, Any], sub: dict[str, Any]) -> dict[str, Any]:
    """What a subsample changes: gate and ``-m auto`` decisions, Spearman and regret."""
    gates = list(zip(full["gate"], sub["gate"], strict=True))
    autos = list(zip(full["auto"], sub["auto"], strict=True))

    def delta(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 4)

    return {
        "gate_unchanged": sum(f["calibrated"] == s["calibrated"] for f, s in gates),
        "uncalibrated_unchanged": sum(f["uncalibrated"] == s["uncalibrated"] for f, s in gates),
        "gates": len(gates),
        "auto_unchanged": sum(
            (f["chosen"], f["gate"]) == (s["chosen"], s["gate"]) for f, s in autos
        ),
        "autos": len(autos),
        "calibrated_right": sub["gate_summary"]["calibrated"]["correct"],
        "harmful_passed": sub["gate_summary"]["calibrated"]["harmful_passed"],
        "spearman_delta": {
            k: delta(full["spearman_mean"].get(k), sub["spearman_mean"].get(k))
            for k in ("value", "anchored", "snd", "agreement", "stability")
        },
        "regret_delta": delta(
            full["select_auto_regret_overall"], sub["select_auto_regret_overall"]
        ),
    }


def summarise_subsamples(
    full: dict[str, Any], by_size: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Per subsample size: the comparisons of every draw, summed or at their worst."""
    out = []
    for size, comparisons in by_size.items():
        spear = {
            k: [c["spearman_delta"][k] for c in comparisons if c["spearman_delta"][k] is not None]
            for k in comparisons[0]["spearman_delta"]
        }
        regrets = [c["regret_delta"] for c in comparisons if c["regret_delta"] is not None]
        out.append(
            {
                "size": int(size),
                "draws": len(comparisons),
                "gate_unchanged": sum(c["gate_unchanged"] for c in comparisons),
                "uncalibrated_unchanged": sum(c["uncalibrated_unchanged"] for c in comparisons),
                "gates": sum(c["gates"] for c in comparisons),
                "auto_unchanged": sum(c["auto_unchanged"] for c in comparisons),
                "autos": sum(c["autos"] for c in comparisons),
                "calibrated_right": sum(c["calibrated_right"] for c in comparisons),
                "harmful_passed": sum(c["harmful_passed"] for c in comparisons),
                "full_calibrated_right": full["gate_summary"]["calibrated"]["correct"]
                * len(comparisons),
                "spearman_delta_mean": {k: _mean(v) for k, v in spear.items()},
                "spearman_delta_max": {
                    k: (round(max(abs(x) for x in v), 4) if v else None) for k, v in spear.items()
                },
                "regret_delta_mean": _mean(regrets),
                "regret_delta_max": round(max(abs(x) for x in regrets), 4) if regrets else None,
            }
        )
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):  # average ranks of ties
        tie = x == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when undefined."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` where each value counts with its weight ``w`` (1-based).

    The weighted rank of the wCorr definition (Bailey et al., the R package
    ``wCorr``; the Python ``WeightedCorr`` that Musgrave et al.'s evaluation calls):
    the summed weight of the smaller values plus ``(t + 1) / 2`` times the mean
    weight of the ``t`` values tied with it. With every weight 1 it is the plain
    average rank.
    """
    out = np.empty(len(x))
    below = 0.0
    for value in np.unique(x):  # ascending
        tie = x == value
        out[tie] = below + (int(tie.sum()) + 1) / 2 * float(w[tie].mean())
        below += float(w[tie].sum())
    return out


def weighted_spearman(
    scores: list[float], accuracies: list[float], power: float = WEIGHT_POWER
) -> float | None:
    """Musgrave et al.'s weighted Spearman correlation of validator scores with accuracy.

    Each candidate weighs ``(r / R) ** power`` (power 2 in their evaluation), ``r``
    the dense rank of its validator score (1 for the lowest, ``R`` for the highest),
    so the candidates a validator ranks near the top, the ones it would pick, count
    most; then the weighted Pearson correlation of the weighted ranks
    (:func:`weighted_ranks`) of scores and accuracies. Musgrave, Belongie & Lim,
    "Benchmarking validation methods for unsupervised domain adaptation" (2022,
    arXiv 2208.07360). None for fewer than 3 candidates or a constant input.
    """
    if len(scores) != len(accuracies):
        raise ValueError(f"{len(scores)} scores for {len(accuracies)} accuracies")
    if len(scores) < 3:
        return None
    x, y = np.asarray(scores, float), np.asarray(accuracies, float)
    dense = np.unique(x, return_inverse=True)[1] + 1.0
    w = (dense / dense.max()) ** power
    rx, ry = weighted_ranks(x, w), weighted_ranks(y, w)
    dx, dy = rx - np.average(rx, weights=w), ry - np.average(ry, weights=w)
    vx, vy = np.average(dx * dx, weights=w), np.average(dy * dy, weights=w)
    if vx <= 0 or vy <= 0:
        return None
    return float(np.average(dx * dy, weights=w) / np.sqrt(vx * vy))


def validator_value(row: dict[str, Any], key: str) -> float | None:
    """A row's value of one column of :data:`VALIDATOR_COLUMNS` (None: not computed)."""
    if key == "value":
        v = row.get("value")
    elif key.startswith("rule:"):
        v = (row.get("rule_values") or {}).get(key.removeprefix("rule:"))
    elif key in ("im", "snd"):
        v = row["scores"].get(key)
    else:
        v = (row.get("validators") or {}).get(key)
    return None if v is None else float(v)


def compare_validators(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ours and the field's validators on one pool: weighted Spearman, Spearman, regret.

    The judge is the held-out accuracy when every row has it, else the transductive
    one. Regret: the best candidate's accuracy minus that of the candidate the
    validator scores highest (the first on ties, as ``rank_candidates``). A validator
    some row lacks gets None.
    """
    judge = (
        "heldout_accuracy" if rows and all("heldout_accuracy" in r for r in rows) else "accuracy"
    )
    acc = [float(r[judge]) for r in rows]
    out: dict[str, Any] = {
        "judge": "held-out" if judge == "heldout_accuracy" else "transductive",
        "candidates": len(rows),
        "validators": {},
    }
    for key in COMPARED:
        vals = [validator_value(r, key) for r in rows]
        if not rows or any(v is None for v in vals):
            out["validators"][key] = None
            continue
        x = [float(v) for v in vals if v is not None]
        pick = max(range(len(x)), key=lambda i: (x[i], -i))
        ws, rho = weighted_spearman(x, acc), spearman(x, acc)
        out["validators"][key] = {
            "weighted_spearman": None if ws is None else round(ws, 4),
            "spearman": None if rho is None else round(rho, 4),
            "regret": round(max(acc) - acc[pick], 4),
            "picked": rows[pick]["candidate"],
        }
    return out


def summarise_validators(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Per preset and over all groups: each column's mean weighted Spearman and regret."""
    by_preset: dict[str, list[dict[str, Any]]] = {}
    for g in groups:
        by_preset.setdefault(g["preset"], []).append(g["validators"])

    def mean_of(comparisons: list[dict[str, Any]]) -> dict[str, Any]:
        judges = {c["judge"] for c in comparisons}
        cols: dict[str, Any] = {}
        for key in COMPARED:
            got = [c["validators"][key] for c in comparisons if c["validators"][key] is not None]
            ws = [v["weighted_spearman"] for v in got if v["weighted_spearman"] is not None]
            cols[key] = {
                "weighted_spearman": _mean(ws),
                "regret": _mean([v["regret"] for v in got]),
                "groups": len(got),
            }
        judge = judges.pop() if len(judges) == 1 else "mixed"
        return {"judge": judge, "groups": len(comparisons), "validators": cols}

    every = [c for cs in by_preset.values() for c in cs]
    return {
        "presets": {preset: mean_of(cs) for preset, cs in by_preset.items()},
        "overall": mean_of(every) if every else None,
        "weight_power": WEIGHT_POWER,
    }


def _oriented(row: dict[str, Any], score: str) -> float | None:
    v = row["scores"].get(score)
    if v is None:
        return None
    return float(v) if sel.HIGHER_IS_BETTER[score] else -float(v)


def _gate_scores(d: dict[str, Any], images: int) -> sel.Scores:
    """Scores from a row (rows written before ``Scores.images`` existed get ``images``)."""
    return sel.Scores(**{"images": images, **{k: d[k] for k in d if k != "images"}})


def analyse(rows: list[dict[str, Any]], methods: list[str], images: int) -> dict[str, Any]:
    """Spearman, regrets, -m auto and gate decisions per (preset, seed), and their means."""
    groups = sorted({(r["preset"], r["seed"]) for r in rows})
    spear: dict[str, list[float]] = {s: [] for s in (*SCORES, "value")}
    pooled: list[dict[str, Any]] = []
    per_group: list[dict[str, Any]] = []
    regrets: dict[str, list[float]] = {}
    auto_rows: list[dict[str, Any]] = []
    gate_rows: list[dict[str, Any]] = []
    for preset, seed in groups:
        group = [r for r in rows if r["preset"] == preset and r["seed"] == seed]
        src = next(r for r in group if r["candidate"] == "source-only")
        adapted = [r for r in group if r["candidate"] != "source-only"]
        unique = list({r["config_key"]: r for r in adapted}.values())  # a default may be in a grid
        pooled.extend(unique)
        g: dict[str, Any] = {
            "preset": preset,
            "seed": seed,
            "rule": next((r.get("rule") for r in unique if r.get("rule")), None),
            "spearman": {},
        }
        for score, rho in _spearman_by_score(unique).items():
            g["spearman"][score] = None if rho is None else round(rho, 4)
            if rho is not None:
                spear[score].append(rho)
        g["validators"] = compare_validators(unique)
        for name in methods:
            grid = [r for r in unique if r["method"] == name and r["in_grid"]]
            if len(grid) < 2:
                continue
            chosen = max(grid, key=lambda r: r["grid_value"])
            best = max(r["accuracy"] for r in grid)
            regret = best - chosen["accuracy"]
            regrets.setdefault(name, []).append(regret)
            g.setdefault("select_auto", {})[name] = {
                "chosen": chosen["candidate"],
                "chosen_accuracy": chosen["accuracy"],
                "best_accuracy": best,
                "regret": round(regret, 4),
            }
        defaults = [r for r in adapted if r["is_default"]]
        if defaults:
            chosen = max(defaults, key=lambda r: r["default_value"])
            verdict = sel.gate_decision(
                _gate_scores(src["scores"], images), _gate_scores(chosen["scores"], images)
            ).decision
            exported = chosen["accuracy"] if verdict == "adapted" else src["accuracy"]
            best_single = max(r["accuracy"] for r in defaults)
            auto = {
                "preset": preset,
                "seed": seed,
                "chosen": chosen["candidate"],
                "gate": verdict,
                "exported_accuracy": exported,
                "source_accuracy": src["accuracy"],
                "best_single_method": max(defaults, key=lambda r: r["accuracy"])["candidate"],
                "best_single_accuracy": best_single,
                "gap_to_best": round(best_single - exported, 4),
            }
            auto_rows.append(auto)
            g["auto"] = auto
        uncal_src = {**src["scores"], "atc": None, "anchored": None}
        for r in unique:
            better = r["accuracy"] > src["accuracy"]
            cal = sel.gate_decision(
                _gate_scores(src["scores"], images), _gate_scores(r["scores"], images)
            )
            unc = sel.gate_decision(
                _gate_scores(uncal_src, images),
                _gate_scores({**r["scores"], "atc": None, "anchored": None}, images),
            )
            gate_rows.append(
                {
                    "preset": preset,
                    "seed": seed,
                    "candidate": r["candidate"],
                    "adapted_better": better,
                    "gain": round(r["accuracy"] - src["accuracy"], 4),
                    "calibrated": cal.decision,
                    "estimated_gain": None
                    if cal.estimated_gain is None
                    else round(cal.estimated_gain, 4),
                    "uncalibrated": unc.decision,
                }
            )
        per_group.append(g)

    def right(kind: str) -> dict[str, int]:
        ok = sum((g[kind] == "adapted") == g["adapted_better"] for g in gate_rows)
        harm = sum(g[kind] == "adapted" and not g["adapted_better"] for g in gate_rows)
        return {"correct": ok, "of": len(gate_rows), "harmful_passed": harm}

    return {
        "spearman_mean": {
            k: round(statistics.fmean(v), 4) if v else None for k, v in spear.items()
        },
        "spearman_pooled": _pooled_spearman(pooled),
        "spearman_groups": {k: len(v) for k, v in spear.items()},
        "select_auto_regret_mean": {
            k: round(statistics.fmean(v), 4) for k, v in sorted(regrets.items())
        },
        "select_auto_regret_overall": _mean([x for v in regrets.values() for x in v]),
        "auto": auto_rows,
        "gate": gate_rows,
        "gate_summary": {"calibrated": right("calibrated"), "uncalibrated": right("uncalibrated")},
        "groups": per_group,
        "validators": summarise_validators(per_group),
    }


def _spearman_by_score(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Spearman of each score (and the selection value) with true accuracy over ``rows``.

    Scores some row lacks are left out; None where the correlation is undefined.
    """
    acc = [float(r["accuracy"]) for r in rows]
    out: dict[str, float | None] = {}
    for score in (*SCORES, "value"):
        vals = [r["value"] if score == "value" else _oriented(r, score) for r in rows]
        if any(v is None for v in vals):
            continue
        out[score] = spearman([float(v) for v in vals if v is not None], acc)
    return out


def _pooled_spearman(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Spearman of each score with true accuracy over every adapted candidate of the grid.

    One ranking across presets and seeds: it asks whether a score tracks accuracy
    as an estimate (a harmful candidate on ``prior-shift`` should score above a
    helpful one on ``wild-mild`` only if it is more accurate), not whether it orders
    the candidates of one target, which the per-group mean measures. ``value`` is
    None: a pool's values rank that pool only (agreement with one target's source,
    ClassAMI lifted by :data:`PASS_OFFSET`), so they are not compared across pools.
    """
    rho = _spearman_by_score(rows)
    out: dict[str, float | None] = {}
    for score in SCORES:
        r = rho.get(score)
        out[score] = None if r is None else round(r, 4)
    out["value"] = None
    return out


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


#: Scores whose per-group Spearman the docs table shows.
SPEARMAN_SHOWN = ("value", "anchored", "snd", "agreement")


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _score_table(rho: dict[str, float | None]) -> list[str]:
    """A one-row markdown table: a column per score, its Spearman correlation."""
    cells = [_signed(v) for v in rho.values()]
    return ["| " + " | ".join(rho) + " |", "|" + "---|" * len(rho), "| " + " | ".join(cells) + " |"]


def markdown(payload: dict[str, Any]) -> str:
    a = payload["analysis"]
    lines = [
        f"`python benchmarks/selection.py {payload['argv']}`: studio -> target, {SIZE} px, "
        f"{payload['n_target']} target images, smallcnn source trained on "
        f"{payload['n_source']} studio images and calibrated on {payload['n_val']} held-out "
        f"ones per seed; CPU ({payload['machine']['threads']} threads); methods "
        f"{', '.join(payload['methods'])}; presets {', '.join(payload['presets'])}; seeds "
        f"{payload['seeds']}; {len(payload['rows'])} runs in {payload['wall_seconds']:.0f} s. "
        "Labels judge the selectors after the fact; they choose nothing.",
        "",
        "Spearman correlation of each label-free score with true accuracy over the "
        "adapted candidates of one (preset, seed), mean over groups (`value` = the "
        "selection value: `sourcefree.pipeline.selection.rank_candidates` over those candidates, "
        "by the rule in the rows' `rule` (`class_ami`: gate-passing candidates first, by "
        "ClassAMI; `agreement`: with the source; `consensus` in runs before 2026-12-06)):",
        "",
        *_score_table(a["spearman_mean"]),
        "",
        "| preset | seed | rule of `value` | `value` | `anchored` | `snd` | `agreement` |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {g['preset']} | {g['seed']} | {g.get('rule') or '-'} | "
            + " | ".join(_signed(g["spearman"].get(k)) for k in SPEARMAN_SHOWN)
            + " |"
            for g in a["groups"]
        ),
        "",
        "The same scores ranked over every adapted candidate of the grid at once "
        "(all presets and seeds: how well a score tracks accuracy as an estimate, "
        "which includes telling the presets apart):",
        "",
        *_score_table(a["spearman_pooled"]),
        "",
        "`--select auto` regret (best candidate by labels minus the chosen one), mean "
        "over groups: "
        + (", ".join(f"`{k}` {v:.3f}" for k, v in a["select_auto_regret_mean"].items()) or "-")
        + (
            f"; overall {a['select_auto_regret_overall']:.3f}."
            if a["select_auto_regret_overall"] is not None
            else "."
        ),
        "",
        "| preset | seed | `-m auto` picks | gate | exported acc. | source acc. "
        "| best single method | gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in a["auto"]:
        lines.append(
            f"| {r['preset']} | {r['seed']} | `{r['chosen']}` | {r['gate']} | "
            f"{r['exported_accuracy']:.3f} | {r['source_accuracy']:.3f} | "
            f"`{r['best_single_method']}` {r['best_single_accuracy']:.3f} | "
            f"{r['gap_to_best']:+.3f} |"
        )
    s = a["gate_summary"]
    lines += [
        "",
        "Gate on every adapted candidate (right = exports the more accurate of source "
        f"and adapted): calibrated {s['calibrated']['correct']}/{s['calibrated']['of']} "
        f"right, {s['calibrated']['harmful_passed']} harmful passed; uncalibrated "
        f"{s['uncalibrated']['correct']}/{s['uncalibrated']['of']} right, "
        f"{s['uncalibrated']['harmful_passed']} harmful passed.",
        "",
        "| preset | seed | candidate | true gain | est. gain | calibrated | uncalibrated |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in a["gate"]:
        est = "-" if g["estimated_gain"] is None else f"{g['estimated_gain']:+.3f}"
        lines.append(
            f"| {g['preset']} | {g['seed']} | `{g['candidate']}` | {g['gain']:+.3f} | {est} | "
            f"{g['calibrated']} | {g['uncalibrated']} |"
        )
    lines += validators_markdown(payload)
    lines += subsample_markdown(payload)
    return "\n".join(lines)


def _validator_cell(col: dict[str, Any]) -> str:
    if not col["groups"]:
        return "-"
    regret = "-" if col["regret"] is None else f"{col['regret']:.3f}"
    return f"{_signed(col['weighted_spearman'])} / {regret}"


def validators_markdown(payload: dict[str, Any]) -> list[str]:
    """The "Validators" table: ours and the field's validators per preset (empty if absent)."""
    summary = payload["analysis"].get("validators")
    if not summary or summary["overall"] is None:
        return []
    n_test = payload.get("n_test")
    held = f"{n_test} held-out test images per preset and seed" if n_test else "no held-out set"
    lines = [
        "",
        "### Validators",
        "",
        "Ours (`value`, the selection value) against the field's label-free validators "
        "(`sourcefree.pipeline.validators`: IM, SND, BNM, ClassAMI) on the same pools, every "
        "distinct adapted candidate of one (preset, seed). Each cell: weighted Spearman "
        "correlation with accuracy as Musgrave et al. (arXiv 2208.07360) compute it "
        f"(weights (rank / max rank)^{WEIGHT_POWER:g} of the validator's own score) / "
        "regret (best candidate's accuracy minus that of the candidate the validator "
        "scores highest), means over seeds. Judge: the accuracy on a disjoint target "
        f"test set ({held}) where the rows have it (`held-out`), else on the adapted "
        "images (`transductive`); `-`: not computed for these rows. DEV is left out: it "
        "needs labelled source validation images, which a source-free customer lacks.",
        "",
        "| preset | judge | groups | " + " | ".join(VALIDATOR_COLUMNS.values()) + " |",
        "|---|---|---|" + "---|" * len(VALIDATOR_COLUMNS),
    ]
    entries = [*summary["presets"].items(), ("all", summary["overall"])]
    for name, entry in entries:
        cells = " | ".join(_validator_cell(entry["validators"][k]) for k in VALIDATOR_COLUMNS)
        lines.append(f"| {name} | {entry['judge']} | {entry['groups']} | {cells} |")
    return lines + rules_markdown(entries)


def rules_markdown(entries: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The "Rules" table: :data:`RULE_VARIANTS` on the same pools (empty for older rows)."""
    keys = [f"rule:{name}" for name in RULE_VARIANTS]
    if all(not e["validators"].get(k, {"groups": 0})["groups"] for _, e in entries for k in keys):
        return []
    lines = [
        "",
        "Pool rules on the same pools (`consensus`: the rule of `rank_candidates` before "
        "2026-12-06; `passing-*`: candidates that pass the gate first, then by the passing "
        "candidates' consensus, IM or ClassAMI, the last being `rank_candidates` since then; "
        "with no candidate passing, every rule ranks by agreement with the source). Same "
        "cells as above.",
        "",
        "| preset | groups | " + " | ".join(f"`{n}`" for n in RULE_VARIANTS) + " |",
        "|---|---|" + "---|" * len(RULE_VARIANTS),
    ]
    for name, entry in entries:
        cells = " | ".join(_validator_cell(entry["validators"].get(k, {"groups": 0})) for k in keys)
        lines.append(f"| {name} | {entry['groups']} | {cells} |")
    return lines


def write_docs(block: str) -> None:
    """Replace this benchmark's block in docs/benchmarks.md, leaving other sections alone."""
    replace_marked_block(DOCS, START, END, block, "Label-free selection")


def _subsample_analysis(payload: dict[str, Any], methods: list[str]) -> list[dict[str, Any]]:
    """Each subsample size's analysis, draw by draw, compared with the full-set analysis."""
    by_size: dict[str, list[dict[str, Any]]] = {}
    for size, rows in payload["subsample_rows"].items():
        for draw in range(payload["gate_sample"]["draws"]):
            drawn = [r for r in rows if r["draw"] == draw]
            sub = analyse(drawn, methods, int(size))
            by_size.setdefault(size, []).append(compare_analyses(payload["analysis"], sub))
    return summarise_subsamples(payload["analysis"], by_size)


def subsample_markdown(payload: dict[str, Any]) -> list[str]:
    """The table of what the gate's subsample changes (empty without ``--gate-sample``)."""
    rows = payload.get("subsample") or []
    if not rows:
        return []
    lines = [
        "",
        f"The same runs scored on `adapt`'s gate subsample (`--gate-sample`: the same "
        f"outputs restricted to `sample_indices(n, size, seed)`, {rows[0]['draws']} draws = "
        f"seeds per size) against the full {payload['n_target']} images: decisions that "
        "stay the same, calibrated gate decisions right (against the full-set accuracy), "
        "and the change of the mean Spearman and of the overall `--select auto` regret "
        "(mean over draws, and the largest in absolute value):",
        "",
        "| sample | gate unchanged | uncalibrated unchanged | `-m auto` unchanged "
        "| gate right (full set) | harmful passed | Spearman `value` mean / max "
        "| Spearman `anchored` mean / max | regret mean / max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dm, dx = r["spearman_delta_mean"], r["spearman_delta_max"]

        def pair(mean: float | None, worst: float | None) -> str:
            return f"{_signed(mean)} / {'-' if worst is None else f'{worst:.2f}'}"

        lines.append(
            f"| {r['size']} | {r['gate_unchanged']}/{r['gates']} "
            f"({r['gate_unchanged'] / max(1, r['gates']):.1%}) | "
            f"{r['uncalibrated_unchanged']}/{r['gates']} | "
            f"{r['auto_unchanged']}/{r['autos']} | "
            f"{r['calibrated_right']}/{r['gates']} ({r['full_calibrated_right']}) | "
            f"{r['harmful_passed']} | {pair(dm['value'], dx['value'])} | "
            f"{pair(dm['anchored'], dx['anchored'])} | "
            f"{pair(r['regret_delta_mean'], r['regret_delta_max'])} |"
        )
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--presets", nargs="+", default=["wild-mild", "prior-shift"])
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"methods {' '.join(QUICK_METHODS)}, seed 0, 3000 source / 1000 target images",
    )
    p.add_argument("--n-source", type=int, default=None, help="vendor training images")
    p.add_argument("--n-target", type=int, default=None, help="target images per preset")
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="held-out target test images per preset and seed, which the validators table "
        "is judged on (default: as many as --n-target; 0: none, judge transductively)",
    )
    p.add_argument(
        "--gate-sample",
        nargs="*",
        type=int,
        default=[],
        help="also score every run on adapt's gate subsample of these sizes (the same "
        "outputs restricted to sample_indices) and compare decisions, Spearman and regret",
    )
    p.add_argument("--draws", type=int, default=5, help="subsample draws (adapt --seed) per size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-docs", action="store_true")
    p.add_argument(
        "--analyse-only",
        action="store_true",
        help="recompute the analysis (and docs) from the rows in --out (their stored values)",
    )
    return p


def _row(
    label: str,
    cand: sel.Candidate,
    key: str,
    run: Run,
    scores: sel.Scores,
    truths: tuple[torch.Tensor, torch.Tensor | None],
) -> dict[str, Any]:
    """One candidate's row (without preset and seed): scores, validators, accuracies."""
    truth, test_truth = truths
    row: dict[str, Any] = {
        "candidate": label,
        "method": cand.method,
        "is_default": label != "source-only" and not cand.overrides,
        "in_grid": bool(cand.overrides),
        "config_key": key,
        "scores": scores.to_dict(),
        "validators": validator_fields(run),
        "accuracy": round(float((run.outputs.predictions == truth).double().mean()), 4),
        "seconds": round(run.seconds, 1),
    }
    if run.heldout is not None and test_truth is not None:
        row["heldout_accuracy"] = round(float((run.heldout == test_truth).double().mean()), 4)
    return row


def run_group(
    preset: str,
    seed: int,
    pkg: Package,
    cal: Calibration | None,
    cands: list[sel.Candidate],
    sizes: tuple[int, int],
) -> tuple[list[dict[str, Any]], dict[str, sel.Outputs], sel.Outputs]:
    """Every candidate on one (preset, seed): its rows, the outputs by config key, the source's.

    ``sizes``: target images (what the methods adapt on) and held-out test images
    (generator seed ``TEST_SEED + seed``, scored only; 0: none).
    """
    n_target, n_test = sizes
    target = generate(preset, n_target, SIZE, seed=2000 + seed)
    truth = torch.from_numpy(target.labels.astype(np.int64))
    data = TargetData(images=target.images, spec=pkg.manifest.input, fingerprint=preset)
    test: TargetData | None = None
    test_truth: torch.Tensor | None = None
    if n_test > 0:
        held = generate(preset, n_test, SIZE, seed=TEST_SEED + seed)
        accuracy.check_disjoint(target.images, held.images)
        test = TargetData(images=held.images, spec=pkg.manifest.input, fingerprint=preset)
        test_truth = torch.from_numpy(held.labels.astype(np.int64))
    src_model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    source = _evaluate(src_model, data, test, 0.0)
    done: dict[str, Run] = {}
    rows: list[dict[str, Any]] = []
    todo: list[tuple[str, sel.Candidate]] = [("source-only", sel.Candidate("-", {}))]
    todo += [(c.label, c) for c in cands]
    for label, cand in todo:
        key, run = "source", source
        if label != "source-only":
            key = _config_key(cand)
            if key not in done:
                done[key] = _run(cand, pkg, data, test, seed)
            run = done[key]
        scores = sel.score_outputs(run.outputs, source.outputs, cal)
        row = {
            "preset": preset,
            "seed": seed,
            **_row(label, cand, key, run, scores, (truth, test_truth)),
        }
        rows.append(row)
        held_text = f", held-out {row['heldout_accuracy']:.4f}" if "heldout_accuracy" in row else ""
        print(
            f"{preset} seed {seed} {label}: acc {row['accuracy']:.4f}{held_text} "
            f"({row['seconds']} s)",
            flush=True,
        )
    return rows, {k: r.outputs for k, r in done.items()}, source.outputs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.analyse_only:
        old: dict[str, Any] = json.loads(args.out.read_text())
        old["analysis"] = analyse(old["rows"], old["methods"], old["n_target"])
        old["analysed_with"] = "--analyse-only (rules of the current sourcefree.pipeline.selection)"
        args.out.write_text(json.dumps(old, indent=2) + "\n")
        if not args.no_docs:
            write_docs(markdown(old))
        print(markdown(old))
        return 0
    torch.set_num_threads(args.threads)
    methods = list(args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS))
    seeds = list(args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2]))
    n_source, n_val, n_target = (3000, 1000, 1000) if args.quick else (5000, 2000, 2000)
    n_source = args.n_source or n_source
    n_target = args.n_target or n_target
    n_test = n_target if args.n_test is None else args.n_test
    if n_test < 0:
        raise SystemExit(f"--n-test {n_test}: a number of images, 0 for none")
    payload: dict[str, Any] = {
        "benchmark": "selection",
        "argv": " ".join(sys.argv[1:] if argv is None else argv) or "(defaults)",
        "methods": methods,
        "presets": args.presets,
        "seeds": seeds,
        "n_source": n_source,
        "n_val": n_val,
        "n_target": n_target,
        "n_test": n_test,
        "short_schedule": {m: list(o) for m, o in SHORT.items() if m in methods},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "rows": [],
        "gate_sample": {"sizes": args.gate_sample, "draws": args.draws},
        "subsample_rows": {str(size): [] for size in args.gate_sample},
    }
    t_all = time.perf_counter()
    cands = _candidates(methods)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            path, secs = _source(seed, Path(tmp), n_source, n_val)
            pkg = load_package(path)
            stats = pkg.manifest.source_stats
            cal: Calibration | None = None if stats is None else stats.calibration
            print(f"seed {seed}: source trained and calibrated in {secs:.0f} s ({cal})", flush=True)
            for preset in args.presets:
                group, outputs_of, source = run_group(
                    preset, seed, pkg, cal, cands, (n_target, n_test)
                )
                payload["rows"] += group
                rank_pools(group, outputs_of)
                for size in args.gate_sample:
                    for draw in range(args.draws):
                        payload["subsample_rows"][str(size)] += subsample_rows(
                            group, outputs_of, source, cal, size=size, draw=draw
                        )
                payload["wall_seconds"] = round(time.perf_counter() - t_all, 1)
                payload["analysis"] = analyse(payload["rows"], methods, n_target)
                payload["subsample"] = _subsample_analysis(payload, methods)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(payload, indent=2) + "\n")
    block = markdown(payload)
    if not args.no_docs:
        write_docs(block)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
