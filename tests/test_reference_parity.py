"""benchmarks/reference_parity.py: our side of the comparison, its JSON, its checks.

The reference checkouts (tim-learn/SHOT, altndrr/clup) are not in CI: the last test
runs them only when ``SOURCEFREE_REF_SHOT`` and ``SOURCEFREE_REF_CLUP`` name checkouts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch


@pytest.fixture
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("reference_parity")


def test_ours_only_run_writes_every_row_and_no_reference_field(
    bench: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "parity.json"
    assert bench.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    payload = json.loads(text)
    assert set(payload) == {"config", "references", "summary", "rows"}
    for ref in payload["references"].values():
        assert ref["status"] == "skipped" and ref["commit"] is None
    rows = payload["rows"]
    # 4 cases, rare-class twice (threshold 0 and 10); 2 logit scales; 2 q x (1 K + confidence)
    assert len(rows["shot_labels"]) == 5 and len(rows["im_loss"]) == 8
    assert len(rows["clup"]) == 16
    by_case = {(r["case"], r["threshold"]): r for r in rows["shot_labels"]}
    assert by_case[("missing-class", 0)]["classes_assignable"] == 6  # nobody predicts it
    assert by_case[("rare-class", 0)]["classes_assignable"] == 7  # 5 samples predict it
    assert by_case[("rare-class", 10)]["classes_assignable"] == 6  # 5 <= threshold 10
    assert all(r["agreement"] is None for r in rows["shot_labels"])
    assert all(r["max_abs_diff"] is None for r in rows["im_loss"])
    assert all(r["ours_consistent"] and r["selected_ours"] > 0 for r in rows["clup"])
    assert all("label_agreement" not in r for r in rows["clup"])
    summary = payload["summary"]
    assert summary["shot_min_label_agreement"] is None and summary["clup_unexplained"] is None
    assert summary["clup_ours_consistent"] is True
    assert str(tmp_path) not in text  # no paths in the results


def test_bad_inputs_exit_2_and_write_nothing(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    missing = tmp_path / "no-such-checkout"
    assert bench.main(["--quick", "--shot-repo", str(missing), "--out", str(out)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench.main(["--quick", "--clup-repo", str(empty), "--out", str(out)]) == 2
    assert bench.main(["--n", "100", "--out", str(out)]) == 2  # n must exceed K = 250
    assert not out.exists()


def test_selection_comparison_explains_quota_and_ties_and_flags_the_rest(
    bench: ModuleType,
) -> None:
    # Class 0: members 0-5, scores 0.9 0.9 0.9 0.5 0.5 0.2; class 1: members 6-9.
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.9, 0.9, 0.9, 0.5, 0.5, 0.2, 0.8, 0.8, 0.6, 0.6], dtype=np.float32)
    q = 0.3  # ceil: 2 of 6 and 2 of 4; int(q n): 1 and 1
    ours = np.array([0, 1, 6, 7])

    def ref(subset: list[int], lab: np.ndarray = labels) -> dict[str, Any]:
        return {"labels": lab, "scores": scores, "subset": np.array(subset)}

    same = bench.selection_agreement(labels, scores, ours, ref([0, 1, 6, 7]), 2, q)
    assert same["jaccard"] == 1.0 and same["unexplained"] == 0 and same["label_agreement"] == 1.0
    assert same["ref_quota_is_int_q_n"] is False and same["ours_quota_is_ceil_q_n"] is True
    # The reference's int(q n) quota, a different member of the tied 0.9 group: explained.
    tied = bench.selection_agreement(labels, scores, ours, ref([2, 7]), 2, q)
    assert tied["ref_quota_is_int_q_n"] is True and tied["ref_keeps_top_scores"] is True
    assert (tied["ref_only"], tied["ours_only"], tied["unexplained"]) == (1, 3, 0)
    # A reference that keeps a 0.5 over the 0.9s: sample 3, and our 0 and 1 above its cut.
    wrong = bench.selection_agreement(labels, scores, ours, ref([3, 7]), 2, q)
    assert wrong["unexplained"] == 3 and wrong["ref_keeps_top_scores"] is False
    flipped = labels.copy()
    flipped[9] = 0
    moved = bench.selection_agreement(labels, scores, ours, ref([0, 6], flipped), 2, q)
    assert moved["labels_differ"] == 1 and moved["label_agreement"] == 0.9


def _published_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_k p_k log(p_k + 1e-5), the formula of SHOT's paper and our docs."""
    return -(p * torch.log(p + 1e-5)).sum(dim=1)


def test_shot_plumbing_hands_the_rows_through_in_order(bench: ModuleType) -> None:
    """A stand-in ``obtain_label`` that reads the loader as SHOT does and labels with our
    function agrees with ours; one flipped label is counted."""
    flip = {"on": False}

    def obtain_label(loader: Any, net_f: Any, net_b: Any, net_c: Any, args: Any) -> np.ndarray:
        it, feats, outs = iter(loader), [], []
        for _ in range(len(loader)):
            inputs, _labels = it.next()
            f = net_b(net_f(inputs.cuda()))
            feats.append(f)
            outs.append(net_c(f))
        probs = torch.softmax(torch.cat(outs), dim=1)
        res = bench.centroid_pseudo_labels(torch.cat(feats), probs, threshold=args.threshold)
        labels: np.ndarray = res.labels.numpy().copy()
        if flip["on"]:
            labels[0] = (labels[0] + 1) % args.class_num
        return labels

    ref = bench.ShotReference(obtain_label, _published_entropy, ())
    ref.smoke()
    feats, logits = bench.make_case("clustered", 3, 500, 16, 7)
    row, theirs = bench.shot_row("clustered", 3, 0, feats, logits, ref)
    assert row["agreement"] == 1.0 and row["n_differ"] == 0 and theirs.shape == (500,)
    flip["on"] = True
    row, _ = bench.shot_row("clustered", 3, 0, feats, logits, ref)
    assert row["n_differ"] == 1
    im = bench.im_row("clustered", 3, 10.0, logits, theirs, ref)
    assert im["batches"] == 8 and max(im["max_abs_diff"].values()) <= 1e-6
    eps_free = bench.ShotReference(
        obtain_label, lambda p: -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1), ()
    )
    moved = bench.im_row("clustered", 3, 10.0, logits, theirs, eps_free)
    assert moved["max_abs_diff"]["entropy"] > 1e-6  # the epsilon placement is visible


def test_imports_from_a_checkout_leave_sys_modules_as_before(
    bench: ModuleType, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "parity_probe_mod.py").write_text(
        "import parity_probe_dep\nVALUE = parity_probe_dep.X\n"
    )
    before_path, before_mods = list(sys.path), set(sys.modules)
    stub = bench._module("parity_probe_dep", X=41)
    with bench._imports_from(repo, {"parity_probe_dep": stub}):
        import parity_probe_mod  # type: ignore[import-not-found]

        assert parity_probe_mod.VALUE == 41
    assert sys.path == before_path
    assert "parity_probe_mod" not in sys.modules and "parity_probe_dep" not in sys.modules
    assert set(sys.modules) == before_mods


def test_against_reference_checkouts(bench: ModuleType, tmp_path: Path) -> None:
    shot, clup = os.environ.get("SOURCEFREE_REF_SHOT"), os.environ.get("SOURCEFREE_REF_CLUP")
    if not (shot and clup and Path(shot).is_dir() and Path(clup).is_dir()):
        pytest.skip("set SOURCEFREE_REF_SHOT and SOURCEFREE_REF_CLUP to reference checkouts")
    out = tmp_path / "parity.json"
    argv = ["--quick", "--shot-repo", shot, "--clup-repo", clup, "--out", str(out)]
    assert bench.main(argv) == 0
    payload = json.loads(out.read_text())
    assert all(r["status"] == "ran" for r in payload["references"].values())
    summary = payload["summary"]
    assert summary["shot_min_label_agreement"] == 1.0
    assert summary["clup_min_label_agreement"] == 1.0 and summary["clup_unexplained"] == 0
    assert summary["clup_score_max_abs_diff"] == 0.0 and summary["clup_feature_max_abs_diff"] == 0.0
    assert max(summary["im_max_abs_diff"].values()) <= 1e-6


def test_a_reference_that_cannot_run_is_recorded_not_raised(
    bench: ModuleType, tmp_path: Path
) -> None:
    repo = tmp_path / "SHOT"
    (repo / "object").mkdir(parents=True)
    (repo / "object" / "image_target.py").write_text(f"raise RuntimeError({str(repo)!r})\n")
    (repo / "object" / "loss.py").write_text("")
    out = tmp_path / "parity.json"
    assert bench.main(["--quick", "--shot-repo", str(repo), "--out", str(out)]) == 1
    text = out.read_text()
    shot = json.loads(text)["references"]["shot"]
    assert shot["status"] == "failed" and shot["why"].startswith("RuntimeError")
    assert str(tmp_path) not in text
    assert "image_target" not in sys.modules
