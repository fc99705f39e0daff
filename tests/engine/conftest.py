"""Target folders for the engine tests (32 px synthetic faces)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from sourcefree.data.synthetic import write_domain

PKG_LABELS = ("surprise", "fear", "happiness")


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 wild-mild images with the generator's labels.csv (7 classes)."""
    return write_domain(tmp_path_factory.mktemp("target") / "wild", "wild-mild", 64, 32, seed=5)


@pytest.fixture(scope="session")
def eval_csv(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labels of the rows whose class the 3-class test package knows (paths relative to DATA)."""
    out = tmp_path_factory.mktemp("labels") / "eval.csv"
    with open(target_dir / "labels.csv", newline="") as fh:
        rows = [r for r in csv.reader(fh)][1:]
    with open(out, "w", newline="") as fh:
        fh.write("path,label\n")
        fh.writelines(f"{p},{lab}\n" for p, lab in rows if lab in PKG_LABELS)
    return out
