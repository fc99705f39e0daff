"""The core install takes exactly one onnxruntime wheel on every platform (issue 21, point 10).

onnxruntime and onnxruntime-gpu install into the same directory; having both breaks
the runtime (``sourcefree doctor`` reports the conflict). The GPU wheel is chosen
where PyPI publishes it (Linux x86_64, Windows x64), the CPU wheel elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parents[1]
GPU_WHEELS = {("linux", "x86_64"), ("win32", "AMD64")}
PLATFORMS = [
    ("linux", "x86_64"),
    ("linux", "aarch64"),
    ("darwin", "arm64"),
    ("darwin", "x86_64"),
    ("win32", "AMD64"),
    ("win32", "ARM64"),
    ("freebsd14", "amd64"),
]


def _runtime_requirements() -> list[Requirement]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return [r for r in reqs if r.name in {"onnxruntime", "onnxruntime-gpu"}]


@pytest.mark.parametrize(("platform", "machine"), PLATFORMS)
def test_exactly_one_onnxruntime_wheel(platform: str, machine: str) -> None:
    env = {"sys_platform": platform, "platform_machine": machine}
    chosen = [r.name for r in _runtime_requirements() if r.marker and r.marker.evaluate(env)]
    expected = "onnxruntime-gpu" if (platform, machine) in GPU_WHEELS else "onnxruntime"
    assert chosen == [expected]


def test_every_runtime_requirement_has_a_marker() -> None:
    reqs = _runtime_requirements()
    assert {r.name for r in reqs} == {"onnxruntime", "onnxruntime-gpu"}
    assert all(r.marker is not None for r in reqs)
