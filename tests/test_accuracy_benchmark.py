"""benchmarks/accuracy.py: merging parallel result files and the gains it derives."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sourcefree.engine.registry import list_methods


def _row(variant: str, seed: int, acc: float) -> dict[str, Any]:
    return {"variant": variant, "preset": "wild-mild", "seed": seed, "accuracy": acc,
            "mean_class_recall": acc, "seconds": 1.0}  # fmt: skip


def test_merge_folds_files_and_gains_use_the_same_seed(
    tmp_path: Path, load_benchmark: Callable[[str], ModuleType]
) -> None:
    acc = load_benchmark("accuracy")
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    a.write_text(json.dumps({"rows": [_row("source-only", 0, 0.4), _row("shot", 0, 0.5)]}))
    rows_b = [_row("source-only", 1, 0.6), _row("shot", 1, 0.9), _row("shot", 0, 0.7)]
    b.write_text(json.dumps({"rows": rows_b, "machine": {"threads": 1}}))
    assert acc.merge_files([a, b], out, docs=False) == 0
    payload = json.loads(out.read_text())
    shot = next(s for s in payload["summary"] if s["variant"] == "shot")
    # The later file's seed-0 row replaced the earlier one: gains 0.3 and 0.3.
    assert shot["seeds"] == [0, 1] and shot["accuracy"]["mean"] == 0.8
    assert shot["gain_over_source"]["mean"] == 0.3 and shot["min_gain_over_source"] == 0.3
    table = acc.markdown(payload)
    assert "| wild-mild | `shot` | 0,1 | 0.800 ± 0.141 |" in table


def test_merge_keeps_each_files_run_description_and_no_stale_top_level(
    tmp_path: Path, load_benchmark: Callable[[str], ModuleType]
) -> None:
    acc = load_benchmark("accuracy")
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    a.write_text(json.dumps({"argv": "--full", "vendors": ["studio", "nir"], "wall_seconds": 9.0,
                             "rows": [_row("source-only", 0, 0.4)]}))  # fmt: skip
    b.write_text(json.dumps({"argv": "--vendors studio", "vendors": ["studio"],
                             "machine": {"threads": 2},
                             "rows": [_row("la-cmfer [studio]", 0, 0.7)]}))  # fmt: skip
    assert acc.merge_files([a, b], out, docs=False) == 0
    payload = json.loads(out.read_text())
    assert "vendors" not in payload and "wall_seconds" not in payload
    assert payload["runs"]["a.json"] == {"argv": "--full", "vendors": ["studio", "nir"],
                                         "wall_seconds": 9.0}  # fmt: skip
    assert payload["runs"]["b.json"]["vendors"] == ["studio"]
    again = tmp_path / "again.json"
    assert acc.merge_files([out], again, docs=False) == 0
    assert set(json.loads(again.read_text())["runs"]) == {"a.json", "b.json", "out.json"}


def test_short_rows_are_their_own_variant(load_benchmark: Callable[[str], ModuleType]) -> None:
    acc = load_benchmark("accuracy")
    rows = [_row("source-only", 0, 0.4), _row("clup", 0, 0.6), _row("clup (short)", 0, 0.45)]
    summary = {s["variant"]: s for s in acc.summarise(rows)}
    assert summary["clup"]["gain_over_source"]["mean"] == 0.2
    assert summary["clup (short)"]["gain_over_source"]["mean"] == 0.05


def test_short_overrides_name_registered_methods_and_real_keys(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    from sourcefree.engine import config as cfgmod
    from sourcefree.engine.registry import get_method

    acc = load_benchmark("accuracy")
    for name, overrides in acc.SHORT.items():
        cfgmod.load_config(get_method(name).config_class, overrides=list(overrides))


def _run_main_faked(
    acc: ModuleType, monkeypatch: Any, out: Path, args: list[str], archs: list[Any] | None = None
) -> tuple[list[tuple[str, int, tuple[str, ...]]], dict[str, Any]]:
    """``main(args)`` with vendor training and adaptation replaced by recorders (``archs``
    collects the vendor architecture of every source trained)."""
    calls: list[tuple[str, int, tuple[str, ...]]] = []

    def fake_source(
        seed: int, tmp: Path, preset: str = "studio", au: bool = False, arch: Any = None
    ) -> Any:
        if archs is not None:
            archs.append(arch)
        return tmp / f"{preset}-{seed}", 0.0

    def fake_run(
        variant: str, pkgs: Any, preset: str, seed: int, extra: Any, n_test: int = -1
    ) -> dict[str, Any]:
        calls.append((variant, seed, tuple(extra)))
        return {**_row(variant, seed, 0.5), "preset": preset, "n_test": n_test}

    monkeypatch.setattr(acc, "_source", fake_source)
    monkeypatch.setattr(acc, "run_variant", fake_run)
    assert acc.main([*args, "--presets", "wild-mild", "--out", str(out), "--no-docs"]) == 0
    return calls, json.loads(out.read_text())


@pytest.mark.parametrize(
    ("flags", "seeds", "shot_variant", "shot_extra"),
    [
        ([], [0, 1, 2], "shot (short)", ("epochs=3",)),
        (["--quick"], [0], "shot (short)", ("epochs=3",)),
        (["--quick", "--seeds", "4"], [4], "shot (short)", ("epochs=3",)),
        (["--full"], [0, 1, 2], "shot", ()),
    ],
)
def test_schedule_flags_pick_lengths_seeds_and_row_names(
    tmp_path: Path,
    load_benchmark: Callable[[str], ModuleType],
    monkeypatch: Any,
    flags: list[str],
    seeds: list[int],
    shot_variant: str,
    shot_extra: tuple[str, ...],
) -> None:
    acc = load_benchmark("accuracy")
    args = ["--methods", "adabn", "shot", *flags]
    calls, payload = _run_main_faked(acc, monkeypatch, tmp_path / "acc.json", args)
    assert sorted({seed for _, seed, _ in calls}) == seeds
    assert {extra for v, _, extra in calls if v == "shot"} == {shot_extra}
    assert {extra for v, _, extra in calls if v == "adabn"} == {()}
    assert {r["variant"] for r in payload["rows"]} == {"adabn", shot_variant}
    assert payload["schedule"] == ("full" if "--full" in flags else "short")


@pytest.mark.parametrize(
    ("vendors", "name"),
    [([], "la-cmfer"), (["--vendors", "studio"], "la-cmfer [studio]")],
)
def test_other_vendor_sets_are_other_rows(
    tmp_path: Path,
    load_benchmark: Callable[[str], ModuleType],
    monkeypatch: Any,
    vendors: list[str],
    name: str,
) -> None:
    acc = load_benchmark("accuracy")
    args = ["--methods", "la-cmfer", "shot", "--full", "--seeds", "0", *vendors]
    _, payload = _run_main_faked(acc, monkeypatch, tmp_path / "acc.json", args)
    assert {r["variant"] for r in payload["rows"]} == {name, "shot"}


def test_cached_vendor_keeps_its_classifier_when_the_au_detector_is_added(
    tmp_path: Path, load_benchmark: Callable[[str], ModuleType], monkeypatch: Any
) -> None:
    acc = load_benchmark("accuracy")
    real = acc.TrainConfig
    monkeypatch.setattr(acc, "N_SOURCE", 96)
    monkeypatch.setattr(acc, "TrainConfig", lambda **kw: real(epochs=1, batch_size=32, **kw))
    path, seconds = acc._source(0, tmp_path)
    first = acc.load_package(path)
    assert seconds > 0 and first.au_detector is None
    again, seconds = acc._source(0, tmp_path, au=True)
    second = acc.load_package(again)
    assert again == path and seconds == 0.0
    assert second.au_detector is not None
    assert second.weights_bytes == first.weights_bytes
    stats = second.manifest.source_stats
    assert stats is not None and stats.au_frequencies is not None
    assert stats.class_feature_means == first.manifest.source_stats.class_feature_means
    assert acc._source(0, tmp_path, au=True)[1] == 0.0  # now complete: reused as is


def test_defaults_cover_every_registered_method_and_clup_grid_expands(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    acc = load_benchmark("accuracy")
    assert set(list_methods()) | {"source-only", "source-avg"} == set(acc.DEFAULT_METHODS)
    assert len(acc.DEFAULT_PRESETS) == 5 and "prior-shift" in acc.DEFAULT_PRESETS
    grid = acc.expand_methods(["source-only", "clup-grid", "clup"])
    assert grid[:2] == ["source-only", "clup"] and len(grid) == 5
    assert "clup:ssl.method=deepclusterv2,score=confidence" in grid


def test_arch_option_trains_that_vendor_and_names_its_rows(
    tmp_path: Path, load_benchmark: Callable[[str], ModuleType], monkeypatch: Any
) -> None:
    acc = load_benchmark("accuracy")
    archs: list[Any] = []
    vit = ["--arch", "timm:vit_tiny_patch16_224", "--arch-option", "img_size=32",
           "--arch-option", "patch_size=4"]  # fmt: skip
    args = ["--methods", "source-only", "tent", "--seeds", "0", *vit]
    _, payload = _run_main_faked(acc, monkeypatch, tmp_path / "acc.json", args, archs)
    options = {"img_size": 32, "patch_size": 4}
    assert archs == [("timm:vit_tiny_patch16_224", options)]
    label = "timm:vit_tiny_patch16_224(img_size=32,patch_size=4)"
    assert payload["arch"] == label
    assert {(r["variant"], r["arch"]) for r in payload["rows"]} == {
        (f"source-only @{label}", label),
        (f"tent @{label}", label),
    }
    # The default run: smallcnn, plain names, no arch field anywhere.
    archs.clear()
    _, default = _run_main_faked(
        acc, monkeypatch, tmp_path / "d.json", ["--methods", "tent", "--seeds", "0"], archs
    )
    assert archs == [("smallcnn", None)] and "arch" not in default
    assert [(r["variant"], "arch" in r) for r in default["rows"]] == [("tent", False)]


def test_arch_rows_gain_over_the_source_of_their_own_arch(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    acc = load_benchmark("accuracy")
    arch = "timm:resnet26d"
    rows = [_row("source-only", 0, 0.4), _row("tent", 0, 0.5),
            {**_row(f"source-only @{arch}", 0, 0.7), "arch": arch},
            {**_row(f"tent @{arch}", 0, 0.75), "arch": arch}]  # fmt: skip
    summary = {s["variant"]: s for s in acc.summarise(rows)}
    assert summary["tent"]["gain_over_source"]["mean"] == 0.1
    assert summary[f"tent @{arch}"]["gain_over_source"]["mean"] == 0.05
    assert "gain_over_source" not in summary[f"source-only @{arch}"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "timm:resnet26dx"], "unknown timm model 'resnet26dx'"),
        (["--arch", "timm:resnet26d", "--arch-option", "pretrained=true"],
         "Option pretrained is not allowed"),
        (["--arch", "timm:resnet26d", "--arch-option", "drop_rate"], "expected KEY=VALUE"),
        (["--arch-option", "drop_rate=0.1"], "Only timm:NAME architectures take options"),
    ],
)  # fmt: skip
def test_bad_arch_is_refused_before_any_training(
    tmp_path: Path,
    load_benchmark: Callable[[str], ModuleType],
    monkeypatch: Any,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    acc = load_benchmark("accuracy")
    archs: list[Any] = []
    with pytest.raises(SystemExit) as err:
        _run_main_faked(acc, monkeypatch, tmp_path / "acc.json", ["--methods", "tent", *args],
                        archs)  # fmt: skip
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert archs == [] and not (tmp_path / "acc.json").exists()


def test_rows_of_a_timm_model_with_options_get_a_valid_package_name(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    from sourcefree.package.manifest import NAME_RE

    acc = load_benchmark("accuracy")
    vit = ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})
    names = [acc._package_dir_name(f"studio-{s}-{acc.arch_label(vit)}") for s in (0, 1)]
    long = acc._package_dir_name("studio-0-" + "x" * 80)
    assert all(NAME_RE.match(n) for n in [*names, long]) and names[0] != names[1]
    assert long != acc._package_dir_name("studio-0-" + "x" * 81)


def test_a_refused_method_is_a_row_of_the_table_not_a_crash(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    acc = load_benchmark("accuracy")
    why = "adabn has nothing to adapt: the model has no BatchNorm layers"
    rows = [
        _row("source-only @vit", 0, 0.5) | {"arch": "vit"},
        {"variant": "adabn @vit", "preset": "wild-mild", "seed": 0, "arch": "vit", "refused": why},
    ]
    summary = acc.summarise(rows)
    adabn = next(s for s in summary if s["variant"] == "adabn @vit")
    assert adabn["refused"] == why and "accuracy" not in adabn and "gain_over_source" not in adabn
    payload = {"rows": rows, "summary": summary, "argv": "x", "machine": {"threads": 2}}
    assert f"| `adabn @vit` | 0 | refused: {why} | - | - |" in acc.markdown(payload)
    assert acc._outcome(rows[1]) == f"refused: {why}"


def test_heldout_test_set_is_disjoint_and_the_train_set_unchanged(
    load_benchmark: Callable[[str], ModuleType], monkeypatch: Any
) -> None:
    from sourcefree.data.synthetic import generate

    acc = load_benchmark("accuracy")
    monkeypatch.setattr(acc, "N_TARGET", 64)
    for preset in acc.DEFAULT_PRESETS:
        for seed in (0, 1):
            train, test = acc.target_sets(preset, seed, 48)
            # The train set is the images the transductive rows always used.
            old = generate(preset, 64, acc.SIZE, seed=2000 + seed)
            assert (train.images == old.images).all() and (train.labels == old.labels).all()
            assert len(test.images) == 48 and len(acc.image_digests(test.images)) == 48
            assert not acc.image_digests(train.images) & acc.image_digests(test.images)
    same = generate("wild-mild", 8, acc.SIZE, seed=2000)
    with pytest.raises(ValueError, match="8 held-out test image"):
        acc.check_disjoint(same.images, same.images[::-1])


def test_the_method_adapts_on_train_images_only_and_test_is_scored_after(
    tmp_path: Path, load_benchmark: Callable[[str], ModuleType], monkeypatch: Any
) -> None:
    import numpy as np

    acc = load_benchmark("accuracy")
    real_cfg, real_data, real_trainer, real_predict = (
        acc.TrainConfig, acc.TargetData, acc.Trainer, acc._predict
    )  # fmt: skip
    monkeypatch.setattr(acc, "N_SOURCE", 96)
    monkeypatch.setattr(acc, "N_TARGET", 64)
    monkeypatch.setattr(acc, "TrainConfig", lambda **kw: real_cfg(epochs=1, batch_size=32, **kw))
    pkg, _ = acc._source(0, tmp_path)
    events: list[tuple[str, Any]] = []

    def spy_data(images: Any, **kw: Any) -> Any:
        events.append(("adapt-data", acc.image_digests(images)))
        return real_data(images=images, **kw)

    class SpyTrainer(real_trainer):  # type: ignore[misc, valid-type]
        def run(self) -> Any:
            events.append(("train-start", acc.image_digests(self.data.images)))
            out = super().run()
            events.append(("train-end", None))
            return out

    def spy_predict(model: Any, images: Any, spec: Any) -> Any:
        pred = real_predict(model, images, spec)
        events.append(("predict", (acc.image_digests(images), pred)))
        return pred

    monkeypatch.setattr(acc, "TargetData", spy_data)
    monkeypatch.setattr(acc, "Trainer", SpyTrainer)
    monkeypatch.setattr(acc, "_predict", spy_predict)
    row = acc.run_variant("shot", pkg, "wild-mild", 0, ("epochs=1",), n_test=40)
    train, test = acc.target_sets("wild-mild", 0, 40)
    seen_train, seen_test = acc.image_digests(train.images), acc.image_digests(test.images)
    names = [name for name, _ in events]
    assert names == ["adapt-data", "train-start", "train-end", "predict", "predict"]
    assert events[0][1] == seen_train and events[1][1] == seen_train  # the method's data
    (_, (d1, p1)), (_, (d2, p2)) = events[3], events[4]
    assert (d1, d2) == (seen_train, seen_test)  # test images: only predicted, after training
    assert row["accuracy"] == float((p1 == train.labels).mean())
    assert row["heldout_accuracy"] == float((p2 == test.labels).mean())
    assert row["n_test"] == 40 and 0.0 <= row["heldout_mean_class_recall"] <= 1.0
    assert np.isfinite(row["pseudo_label_precision"])  # judged on the train labels
    # The references without adaptation are scored on both sets too.
    src = acc.run_variant("source-only", pkg, "wild-mild", 0, (), n_test=40)
    avg = acc.run_variant("source-avg", [pkg, pkg], "wild-mild", 0, (), n_test=40)
    assert avg["heldout_accuracy"] == avg["heldout_source_avg_accuracy"]
    assert avg["heldout_accuracy"] == src["heldout_accuracy"]
    assert avg["heldout_source_accuracy_by_vendor"] == [round(src["heldout_accuracy"], 4)] * 2
    # A variant's own override wins over the short schedule's.
    configs: list[Any] = []
    real_load = acc.cfgmod.load_config

    def spy_load(*args: Any, **kw: Any) -> Any:
        configs.append(real_load(*args, **kw))
        raise KeyboardInterrupt  # stop before training: only the config is looked at

    monkeypatch.setattr(acc.cfgmod, "load_config", spy_load)
    for variant, epochs in (("shot", 1), ("shot:epochs=2", 2)):
        with pytest.raises(KeyboardInterrupt):
            acc.run_variant(variant, pkg, "wild-mild", 0, ("epochs=1",), n_test=40)
        assert configs[-1].epochs == epochs


def test_gains_are_per_protocol_and_old_rows_without_heldout_still_render(
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    acc = load_benchmark("accuracy")

    def new(variant: str, seed: int, acc_: float, held: float) -> dict[str, Any]:
        return {**_row(variant, seed, acc_), "heldout_accuracy": held,
                "heldout_mean_class_recall": held, "n_test": 2000}  # fmt: skip

    rows = [
        _row("source-only", 1, 0.5), _row("tent", 1, 0.7),  # before the split: transductive
        _row("adabn", 1, 0.6),
        new("source-only", 0, 0.4, 0.35), new("tent", 0, 0.6, 0.5),
    ]  # fmt: skip
    summary = {s["variant"]: s for s in acc.summarise(rows)}
    tent = summary["tent"]
    assert tent["gain_over_source"]["mean"] == 0.2 and tent["gain_over_source"]["n"] == 2
    assert tent["heldout_gain_over_source"]["mean"] == 0.15
    assert tent["heldout_gain_over_source"]["n"] == 1 and tent["heldout_seeds"] == [0]
    assert "heldout_gain_over_source" not in summary["adabn"]
    payload = {"rows": rows, "summary": list(summary.values()), "argv": "x",
               "machine": {"threads": 2}}  # fmt: skip
    table = acc.markdown(payload)
    assert (
        "| accuracy | held-out | MCR | held-out MCR | gain (min) | held-out gain (min) |" in table
    )
    assert "| `adabn` | 1 | 0.600 ± 0.000 | - | 0.600 ± 0.000 | - | +0.100 (+0.100) | - |" in table
    assert (
        "| `tent` | 0,1 | 0.650 ± 0.071 | 0.500 ± 0.000 [0] | 0.650 ± 0.071 | "
        "0.500 ± 0.000 [0] | +0.200 (+0.200) | +0.150 (+0.150) | - |"
    ) in table


def test_n_test_reaches_every_run_and_a_bad_one_is_refused(
    tmp_path: Path,
    load_benchmark: Callable[[str], ModuleType],
    monkeypatch: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    acc = load_benchmark("accuracy")
    out = tmp_path / "acc.json"
    _, payload = _run_main_faked(acc, monkeypatch, out, ["--methods", "tent", "--seeds", "0"])
    assert payload["n_test"] == acc.N_TEST and payload["rows"][0]["n_test"] == acc.N_TEST
    args = ["--methods", "tent", "--seeds", "0", "--n-test", "300"]
    _, payload = _run_main_faked(acc, monkeypatch, out, args)
    assert payload["n_test"] == 300 and payload["rows"][0]["n_test"] == 300
    with pytest.raises(SystemExit) as err:
        _run_main_faked(acc, monkeypatch, tmp_path / "bad.json", [*args[:-1], "0"])
    assert err.value.code == 2 and "--n-test 0" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
