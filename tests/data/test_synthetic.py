"""Synthetic FER domains: determinism, presets, action units, writing to disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sourcefree.data import read_labels_csv
from sourcefree.data.synthetic import (
    AU_NAMES,
    CLASSES,
    DOMAIN_FILE,
    NEUTRAL,
    PARAMS,
    PRESETS,
    PROTOTYPES,
    DomainSpec,
    action_units,
    generate,
    get_domain,
    write_domain,
)
from sourcefree.errors import ConfigError, DatasetError

REQUIRED = ("studio", "wild-mild", "nir", "fer-like", "wild-mild-imbalanced", "prior-shift")


def test_required_presets_exist() -> None:
    assert set(REQUIRED) <= set(PRESETS)
    assert CLASSES[0] == "surprise" and len(CLASSES) == 7


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_renders(name: str) -> None:
    images, labels, aus = generate(name, 20, size=32, seed=1)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (20,) and labels.dtype == np.int64
    assert aus.shape == (20, len(AU_NAMES)) and aus.dtype == np.float32
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert float(images.std()) > 10  # not blank
    if PRESETS[name].gray >= 1:
        assert np.array_equal(images[..., 0], images[..., 1])


def test_deterministic_by_seed() -> None:
    a = generate("wild-mild", 260, size=32, seed=5)  # more than one render chunk
    b = generate("wild-mild", 260, size=32, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = generate("wild-mild", 40, size=32, seed=6)
    assert not np.array_equal(a.images[:40], c.images)
    other = generate("studio", 40, size=32, seed=5)  # the domain name is part of the seed
    assert not np.array_equal(a.labels[:40], other.labels)


def test_class_prior_is_followed() -> None:
    balanced = np.bincount(generate("studio", 500, size=16).labels, minlength=7) / 500
    shifted = np.bincount(generate("prior-shift", 500, size=16).labels, minlength=7) / 500
    assert balanced.max() < 0.22
    assert shifted[3] > 0.3 and shifted[1] < 0.07  # happiness dominates, fear is rare


def test_action_units_follow_the_prototypes() -> None:
    au = dict(zip(AU_NAMES, action_units(PROTOTYPES).T, strict=True))
    surprise, fear, disgust, happy, sad, anger, neutral = range(7)
    assert au["AU12"][happy] == 1 and au["AU6"][happy] > 0.5
    assert au["AU1"][surprise] > 0.5 and au["AU2"][surprise] == 1 and au["AU26"][surprise] == 1
    assert au["AU5"][fear] > 0.5 and au["AU20"][fear] == 1 and au["AU25"][fear] == 1
    assert au["AU9"][disgust] == 1 and au["AU10"][disgust] == 1
    assert au["AU15"][sad] == 1 and au["AU1"][sad] > 0.5
    assert au["AU4"][anger] == 1 and au["AU23"][anger] == 1
    assert float(action_units(NEUTRAL[None]).max()) == 0.0
    assert np.all(action_units(PROTOTYPES)[neutral] == 0)
    with pytest.raises(ConfigError, match="wrong shape"):
        action_units(np.zeros((2, len(PARAMS) - 1)))


def test_generated_aus_carry_the_expression() -> None:
    data = generate("studio", 300, size=16, seed=3)
    au12 = data.aus[:, AU_NAMES.index("AU12")]
    happy = data.labels == CLASSES.index("happiness")
    assert au12[happy].mean() > 0.8 and au12[~happy].mean() < 0.1


def test_unknown_domain_suggests_a_name() -> None:
    with pytest.raises(
        ConfigError, match="(?i)unknown synthetic domain .wild-mlid.*did you mean .wild-mild."
    ):
        get_domain("wild-mlid")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": -1}, "cannot generate n=-1 images"),
        ({"size": 8}, "cannot generate images of size 8"),
        ({"seed": -3}, "invalid seed -3"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs: dict[str, int], match: str) -> None:
    args = {"n": 4, "size": 32, "seed": 0} | kwargs
    with pytest.raises(ConfigError, match=match):
        generate("studio", **args)


def test_custom_domains_are_validated() -> None:
    with pytest.raises(ConfigError, match="severity blur=3.0 is out of range"):
        DomainSpec(name="x", blur=3.0)
    with pytest.raises(ConfigError, match="class prior is invalid"):
        DomainSpec(name="x", prior=(1.0, 2.0))
    custom = DomainSpec(name="noisy", noise=1.0)
    assert generate(custom, 3, size=24).images.shape == (3, 24, 24, 3)


def test_write_domain_round_trips_through_the_csv_reader(tmp_path: Path) -> None:
    out = write_domain(tmp_path / "wild", "wild-mild", 12, size=32, seed=2)
    names = sorted(p.name for p in out.iterdir())
    assert names[:2] == ["000000.png", "000001.png"]
    assert {"labels.csv", "aus.csv", DOMAIN_FILE} <= set(names)
    meta = json.loads((out / DOMAIN_FILE).read_text())
    assert meta["domain"]["name"] == "wild-mild" and meta["labels"] == list(CLASSES)
    ds = read_labels_csv(out / "labels.csv", labels=CLASSES)
    expected = generate("wild-mild", 12, size=32, seed=2)
    assert ds.targets.tolist() == expected.labels.tolist()
    loaded = ds.load(size=32)
    assert np.array_equal(loaded.images, expected.images)
    with open(out / "aus.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", *AU_NAMES] and len(rows) == 13


def test_write_domain_refuses_to_clobber(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="is not empty"):
        write_domain(mine, "studio", 2)
    with pytest.raises(DatasetError, match="was not written by `sourcefree synth`"):
        write_domain(mine, "studio", 2, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "precious"
    out = write_domain(tmp_path / "synth", "studio", 3)
    write_domain(out, "nir", 2, overwrite=True)
    assert json.loads((out / DOMAIN_FILE).read_text())["n"] == 2
    assert not (out / "000002.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "synth"]  # no temp dirs left
