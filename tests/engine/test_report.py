"""What ``adapt`` leaves in OUT: an adapted package that audits clean, and the reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from sourcefree.adaptation import adapt
from sourcefree.audit import audit_package


def test_adapted_package_audits_clean(
    source_pkg: Path, target_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/alice")
    result = adapt(source_pkg, target_dir, method="adabn", out=tmp_path / "out", device="cpu")
    report = audit_package(result.out / "package")
    assert report.clean and report.verified, report.findings
    assert report.manifest["kind"] == "adapted"
    assert "method" in report.manifest["provenance_keys"]
