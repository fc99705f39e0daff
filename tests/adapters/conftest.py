"""Target images for the method contract tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from sourcefree.data.synthetic import write_domain


@pytest.fixture(scope="session")
def target_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 unlabelled-by-use wild-mild images (32 px)."""
    return write_domain(tmp_path_factory.mktemp("target") / "wild", "wild-mild", 48, 32, seed=3)
