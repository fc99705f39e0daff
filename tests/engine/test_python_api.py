"""The top-level Python API: lazy ``Predictor`` / ``export_package``, the typed report,
and the README's "Python API" snippet, run as written (on a tiny model)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_top_level_names_are_lazy_and_light() -> None:
    code = """
import sys
import sourcefree
assert "torch" not in sys.modules and "onnxruntime" not in sys.modules
assert "sourcefree.runtime.predictor" not in sys.modules
from sourcefree import Predictor
import sourcefree.runtime.predictor as rp
assert Predictor is rp.Predictor and "torch" not in sys.modules
assert sourcefree.InputSpec.__name__ == "InputSpec"
try:
    sourcefree.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise SystemExit("no AttributeError")
from sourcefree import export_package
from sourcefree.export import source_package
assert export_package is source_package and "torch" in sys.modules
print(sorted(set(sourcefree.__all__) - set(dir(sourcefree))))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "every name of __all__ resolves"


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "the Python API section has a python block"
    return found.group(1)


def test_readme_python_api_snippet_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The snippet as written, with resnet18 at 64 px swapped for smallcnn at 32 px."""
    from PIL import Image

    from sourcefree.data.synthetic import write_domain
    from sourcefree.engine.models import build_classifier

    snippet = _readme_snippet()
    for real, tiny in (
        ('architecture="resnet18"', 'architecture="smallcnn"'),
        ("64, 64", "32, 32"),
    ):
        assert real in snippet
        snippet = snippet.replace(real, tiny)
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(  # type: ignore[attr-defined]
        resnet18=lambda num_classes: build_classifier("smallcnn", num_classes)
    )
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.chdir(tmp_path)
    photos = write_domain(tmp_path / "photos", "wild-mild", 16, 32, seed=5)
    Image.open(sorted(photos.glob("*.png"))[0]).convert("RGB").save(tmp_path / "face1.jpg")
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(snippet, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    steps = [line for line in printed if re.match(r"\S+ epoch \d+ step \d+: loss ", line)]
    assert steps, "the on_step callback ran"
    result = namespace["result"]
    from sourcefree.pipeline.report import AdaptReport

    assert isinstance(result.report, AdaptReport)
    written = json.loads((tmp_path / "adapted" / "report.json").read_text())
    assert json.loads(json.dumps(result.report.to_dict())) == written
    assert printed[-3].split()[0] == result.report.gate.decision
    assert namespace["predictor"].package.path == Path("adapted", "package")
    assert printed[-1].startswith("['") and printed[-1].endswith("']")  # one label
