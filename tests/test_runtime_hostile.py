"""Hostile graphs and mismatched model files: onnxruntime failures, NaN logits and
graphs that compute another function than the weights are typed errors (exit 2)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sourcefree.errors import PackageError
from sourcefree.runtime.predictor import AUDetector, Predictor
from tests.parity_helpers import make_large_logit_package as _large_logit_package

Forge = Callable[[Path, str, bytes], None]


def _graft(pkg: Path, forge: Forge, tail: Callable[[Any, str, str], None], file: str) -> None:
    """Rewrite ``file``'s graph so ``tail(graph, raw, out)`` computes its first output
    from the original one (renamed ``raw``), then re-hash: a consistent forgery."""
    import onnx

    model = onnx.load_from_string((pkg / file).read_bytes())
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["raw" if o == out else o for o in node.output]
    tail(model.graph, "raw", out)
    forge(pkg, file, model.SerializeToString())


def _const(graph: Any, name: str, values: list[Any], dtype: Any) -> None:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))


def _type_clash(graph: Any, raw: str, out: str) -> None:
    """``out = raw + int64(raw)``: onnxruntime refuses mixed types when it loads."""
    from onnx import TensorProto, helper

    graph.node.extend(
        [
            helper.make_node("Cast", [raw], ["as_int"], to=TensorProto.INT64),
            helper.make_node("Add", [raw, "as_int"], [out]),
        ]
    )


def _bad_reshape(graph: Any, raw: str, out: str) -> None:
    """Reshape (N, 3) to (-1, 5) and back: fails at run time unless 5 divides 3 N."""
    from onnx import helper

    _const(graph, "to5", [-1, 5], np.int64)
    _const(graph, "to3", [-1, 3], np.int64)
    graph.node.extend(
        [
            helper.make_node("Reshape", [raw, "to5"], ["by5"], name="evil\x1b[2J"),
            helper.make_node("Reshape", ["by5", "to3"], [out]),
        ]
    )


def _log_of_first_pixel(graph: Any, raw: str, out: str) -> None:
    """``out = raw + log(x[:, 0, 0, 0])``: NaN for images whose first pixel is negative."""
    from onnx import helper

    for name, values in (("s0", [0, 0, 0]), ("s1", [1, 1, 1]), ("ax", [1, 2, 3]), ("col", [-1, 1])):
        _const(graph, name, values, np.int64)
    graph.node.extend(
        [
            helper.make_node("Slice", [graph.input[0].name, "s0", "s1", "ax"], ["px"]),
            helper.make_node("Reshape", ["px", "col"], ["px2"]),
            helper.make_node("Log", ["px2"], ["logpx"]),
            helper.make_node("Add", [raw, "logpx"], [out]),
        ]
    )


def _doubled(graph: Any, raw: str, out: str) -> None:
    """``out = concat(raw, raw)``: twice as many columns as the manifest declares."""
    from onnx import helper

    graph.node.append(helper.make_node("Concat", [raw, raw], [out], axis=1))


def _first_columns(graph: Any, raw: str, out: str) -> None:
    """``out = raw[:, :-1]``: one column fewer than the declared output shape."""
    from onnx import helper

    _const(graph, "c0", [0], np.int64)
    _const(graph, "c1", [-1], np.int64)
    _const(graph, "cax", [1], np.int64)
    graph.node.append(helper.make_node("Slice", [raw, "c0", "c1", "cax"], [out]))


def _images(folder: Path, shades: list[int]) -> Path:
    folder.mkdir()
    for i, shade in enumerate(shades):
        Image.new("RGB", (32, 32), (shade, shade, shade)).save(folder / f"{i}.png")
    return folder


def _cli(*args: str) -> tuple[int, str]:
    from sourcefree.cli.app import main

    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_graph_refused_by_onnxruntime_at_load(pkg_copy: Path, forge: Forge, tmp_path: Path) -> None:
    from sourcefree import load_package

    _graft(pkg_copy, forge, _type_clash, "model.onnx")
    load_package(pkg_copy)  # the static checks pass: onnxruntime is the one that refuses
    with pytest.raises(PackageError, match="'fer-small''s model.onnx cannot be loaded by onnx"):
        Predictor(pkg_copy, device="cpu")
    code, out = _cli("predict", str(pkg_copy), str(_images(tmp_path / "img", [128])))
    assert code == 2, out
    assert "cannot be loaded by onnxruntime: '" in out and "re-export" in out
    assert "Traceback" not in out


def test_graph_failing_at_run_time(
    pkg_copy: Path, forge: Forge, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _graft(pkg_copy, forge, _bad_reshape, "model.onnx")
    predictor = Predictor(pkg_copy, device="cpu")
    x = np.zeros((5, 3, 32, 32), np.float32)
    assert predictor.predict_array(x).probabilities.shape == (5, 3)  # 15 values reshape
    with pytest.raises(PackageError, match=r"model.onnx failed in onnxruntime: .\[ONNXRunt") as err:
        predictor.predict_array(x[:1])
    # The node name is the graph's: escaped in the error, and onnxruntime's own
    # log (which quotes it raw) stays off.
    assert "evil\\x1b[2J" in str(err.value) and "\x1b" not in str(err.value)
    assert "\x1b" not in capfd.readouterr().err
    code, out = _cli("predict", str(pkg_copy), str(_images(tmp_path / "img", [128])))
    assert code == 2 and "failed in onnxruntime" in out and "Traceback" not in out, out


def test_nan_logits_are_an_error(pkg_copy: Path, forge: Forge, tmp_path: Path) -> None:
    _graft(pkg_copy, forge, _log_of_first_pixel, "model.onnx")
    predictor = Predictor(pkg_copy, device="cpu")
    x = np.ones((3, 3, 32, 32), np.float32)
    assert np.isfinite(predictor.predict_array(x).probabilities).all()
    x[[0, 2], 0, 0, 0] = -1.0
    with pytest.raises(PackageError, match=r"NaN or Inf logits or features for 2 of 3 image"):
        predictor.predict_array(x)
    # Through the CLI: a black image is -1 after normalisation, a white one is 1.
    code, out = _cli("predict", str(pkg_copy), str(_images(tmp_path / "img", [0, 255])))
    assert code == 2 and "for 1 of 2 image(s)" in out and ",nan" not in out, out
    assert "Traceback" not in out


def test_outputs_of_another_shape_are_refused(pkg_copy: Path, forge: Forge) -> None:
    _graft(pkg_copy, forge, _doubled, "model.onnx")
    predictor = Predictor(pkg_copy, device="cpu")
    with pytest.raises(PackageError, match=r"float32 array of shape \(2, 6\) as logits"):
        predictor.predict_array(np.zeros((2, 3, 32, 32), np.float32))


def test_au_detector_failures_are_typed(au_source_pkg: Path, forge: Forge, tmp_path: Path) -> None:
    clash = tmp_path / "clash"
    shutil.copytree(au_source_pkg, clash)
    _graft(clash, forge, _type_clash, "au_detector.onnx")
    with pytest.raises(PackageError, match="'fer-au''s au_detector.onnx cannot be loaded"):
        AUDetector(clash)
    short = tmp_path / "short"
    shutil.copytree(au_source_pkg, short)
    _graft(short, forge, _first_columns, "au_detector.onnx")
    with pytest.raises(PackageError, match=r"shape \(2, 13\) as au_detector.onnx output"):
        AUDetector(short).detect_array(np.zeros((2, 3, 32, 32), np.float32))


def test_doctor_reports_a_provider_that_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from sourcefree.cli.doctor import diagnose, format_report
    from sourcefree.runtime.predictor import import_onnxruntime

    ort = import_onnxruntime()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : no such library\nsecond line")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    report = diagnose()
    assert report["providers_usable"] == []
    failed = report["providers_failed"]
    reason = "'[ONNXRuntimeError] : 1 : FAIL : no such library'"
    assert {"provider": "CPUExecutionProvider", "reason": reason} in failed
    rows = dict(format_report(report))
    assert rows["onnxruntime providers (usable)"] == "none"
    assert f"CPUExecutionProvider ({reason})" in rows["onnxruntime providers (failed)"]


# -- the two model files of a package compute the same function ---------------------


def _swap_weights(pkg: Path, forge: Forge) -> None:
    """Weights of a differently initialised smallcnn: a valid file of the same shape."""
    from safetensors.torch import save

    from sourcefree.engine.models import build_classifier

    torch.manual_seed(123)
    state = build_classifier("smallcnn", 3).state_dict()
    forge(pkg, "model.safetensors", save(state, metadata={"format": "pt"}))


def test_adapt_refuses_weights_that_differ_from_the_graph(
    pkg_copy: Path, forge: Forge, tmp_path: Path
) -> None:
    from sourcefree import load_package
    from sourcefree.cli.commands_adapt import adapt_command
    from sourcefree.data.synthetic import write_domain
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt

    _swap_weights(pkg_copy, forge)
    load_package(pkg_copy)  # hashes and headers are consistent: only the functions differ
    data = write_domain(tmp_path / "target", "wild-mild", 8, 32, seed=5)
    out = tmp_path / "o"
    args = [str(pkg_copy), str(data), "-m", "adabn", "-o", str(out), "--no-progress"]
    result = CliRunner().invoke(adapt_command, args)
    assert result.exit_code == 2, result.output
    assert "model.onnx and model.safetensors of package 'fer-small' compute different " in (
        result.output
    )
    assert "on logits" in result.output and "Traceback" not in result.output
    steps: list[Any] = []
    with pytest.raises(PackageError, match="cannot adapt one model and serve another"):
        adapt(
            AdaptRequest(pkg_copy, data, method="tent", out=out, device="cpu", on_step=steps.append)
        )
    assert steps == [], "refused before any training"
    assert not out.exists() and not (tmp_path / ".o.work").exists()


def test_large_logits_pass_the_agreement_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sourcefree.export.onnx as onnx_export
    from sourcefree import load_package
    from sourcefree.data.synthetic import write_domain
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt

    pkg = _large_logit_package(tmp_path / "big")  # the export's own gate accepts it
    calls: list[str] = []
    check = onnx_export.check_package_agreement

    def counted(p: Any, m: Any) -> Any:
        calls.append(p.manifest.name)
        return check(p, m)

    monkeypatch.setattr(onnx_export, "check_package_agreement", counted)
    data = write_domain(tmp_path / "target", "wild-mild", 8, 32, seed=5)
    adapt(AdaptRequest(pkg, data, method="adabn", out=tmp_path / "o", device="cpu", progress=False))
    assert calls == ["big"], "checked once per package load, not per batch"
    assert (tmp_path / "o" / "package" / "manifest.json").is_file()
    from sourcefree.engine.models import load_classifier

    loaded = load_package(pkg)
    parity = check(loaded, load_classifier(loaded.manifest.architecture, loaded.weights_bytes))
    assert parity.max_abs_logits < 1.0


def test_fp16_package_passes_the_agreement_check(tmp_path: Path) -> None:
    from sourcefree import load_package
    from sourcefree.engine.models import load_classifier
    from sourcefree.export.onnx import check_package_agreement

    pkg = load_package(_large_logit_package(tmp_path / "half", fp16=True))
    assert pkg.manifest.onnx.precision == "fp16"
    parity = check_package_agreement(
        pkg, load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    )
    assert parity.top1_agreement == 1.0


def test_agreement_check_leaves_the_model_as_it_was(source_pkg: Path) -> None:
    from sourcefree import load_package
    from sourcefree.engine.models import load_classifier
    from sourcefree.export.onnx import check_package_agreement

    pkg = load_package(source_pkg)
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes).train()
    model.head.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_package_agreement(pkg, model)
    assert model.training and model.backbone.training and not model.head.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BatchNorm stats untouched"


_RELEASE_PROBE = """
import gc, os, sys
import numpy as np
from sourcefree.runtime.predictor import Predictor

def resident():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

roomy = Predictor(sys.argv[1], device="cpu", memory_limit=1 << 30)
roomy.predict_array(np.ones((1, 3, 32, 32), np.float32))
held = resident()
del roomy
gc.collect()
print(held - resident())
"""


def _arena_freed_with_its_session(pkg: Path) -> int:
    """MiB the system gets back when a session that ran the bomb is deleted, measured in
    a fresh interpreter (in a long test process the allocator may keep freed pages)."""
    out = subprocess.run(
        [sys.executable, "-c", _RELEASE_PROBE, str(pkg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _memory_bomb(doublings: int) -> Callable[[Any, str, str], None]:
    """``out = raw + 0 * flatten(x doubled `doublings` times)[:, :1]``: allowed ops only,
    declared shapes all fine, yet the last Concat holds 2**doublings copies of the input."""

    def tail(graph: Any, raw: str, out: str) -> None:
        from onnx import helper

        prev = graph.input[0].name
        for i in range(doublings):
            graph.node.append(helper.make_node("Concat", [prev, prev], [f"bomb{i}"], axis=1))
            prev = f"bomb{i}"
        for name, values in (("b0", [0]), ("b1", [1]), ("bax", [1])):
            _const(graph, name, values, np.int64)
        _const(graph, "zero", [0.0], np.float32)
        graph.node.extend(
            [
                helper.make_node("Flatten", [prev], ["flat"], axis=1),
                helper.make_node("Slice", ["flat", "b0", "b1", "bax"], ["col"]),
                helper.make_node("Mul", ["col", "zero"], ["nothing"]),
                helper.make_node("Add", [raw, "nothing"], [out]),
            ]
        )

    return tail


def test_graph_growing_past_the_memory_cap_is_a_typed_error(
    pkg_copy: Path, source_pkg: Path, forge: Forge, tmp_path: Path
) -> None:
    # 14 doublings of one 3x32x32 float32 image: a 192 MiB tensor (and 96 MiB before it).
    _graft(pkg_copy, forge, _memory_bomb(14), "model.onnx")
    capped = Predictor(pkg_copy, device="cpu", memory_limit=64 << 20)
    x = np.ones((1, 3, 32, 32), np.float32)
    msg = r"model.onnx outgrew the memory cap of 64 MiB \(a further \d+ MiB tensor did not fit"
    with pytest.raises(PackageError, match=msg) as err:
        capped.predict_array(x)
    assert "lower the batch size" in err.value.fix and "memory_limit" in err.value.fix
    # Each session has its own arena: another cap leaves the first session's alone,
    # and the arena is freed with its session (its 192 MiB block goes back to the
    # system; were the arena kept by onnxruntime's environment, nothing would).
    roomy = Predictor(pkg_copy, device="cpu", memory_limit=1 << 30)
    assert roomy.predict_array(x).probabilities.shape == (1, 3)
    with pytest.raises(PackageError, match=msg):
        capped.predict_array(x)
    assert _arena_freed_with_its_session(pkg_copy) > 150
    assert Predictor(source_pkg, device="cpu").predict_array(x).probabilities.shape == (1, 3)
    images = str(_images(tmp_path / "img", [128]))
    code, out = _cli("predict", str(pkg_copy), images, "--memory-limit", "64")
    assert code == 2 and "outgrew the memory cap of 64 MiB" in out and "Traceback" not in out, out
    code, out = _cli("predict", str(pkg_copy), images, "--memory-limit", "1024")
    assert code == 0, out


def test_the_default_memory_cap_is_half_the_ram(
    pkg_copy: Path, forge: Forge, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourcefree.runtime import predictor as module

    monkeypatch.setattr(module, "physical_memory_bytes", lambda: 256 << 20)
    assert module.default_memory_limit() == 128 << 20
    _graft(pkg_copy, forge, _memory_bomb(14), "model.onnx")
    predictor = Predictor(pkg_copy, device="cpu")
    with pytest.raises(PackageError, match="outgrew the memory cap of 128 MiB"):
        predictor.predict_array(np.ones((1, 3, 32, 32), np.float32))
    monkeypatch.setattr(module, "physical_memory_bytes", lambda: None)
    assert module.default_memory_limit() == module.FALLBACK_MEMORY_LIMIT


@pytest.mark.parametrize("limit", [(64 << 20) - 1, 0, -1, True, 1.5e9, "1G"])
def test_a_memory_limit_below_the_least_or_not_bytes_is_refused(
    source_pkg: Path, limit: Any
) -> None:
    from sourcefree.errors import InputError

    with pytest.raises(InputError, match="memory_limit is"):
        Predictor(source_pkg, device="cpu", memory_limit=limit)


def test_cli_memory_limit_below_the_least_is_a_usage_error(
    source_pkg: Path, tmp_path: Path
) -> None:
    images = str(_images(tmp_path / "img", [128]))
    code, out = _cli("predict", str(source_pkg), images, "--memory-limit", "63")
    assert code == 2 and "--memory-limit" in out and "Traceback" not in out, out
