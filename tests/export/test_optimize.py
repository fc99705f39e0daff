"""``sourcefree optimize`` (issue 21, point 4): int8 and fp16 deployment variants.

Each variant verifies, serves, records its precision, origin and agreement, and
is written whole or not at all; the verifier accepts QDQ only in int8 graphs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from sourcefree.cli.commands_optimize import optimize
from sourcefree.data.synthetic import write_domain
from sourcefree.errors import ConfigError, DatasetError, ExportError, PackageError
from sourcefree.export import optimize as optmod
from sourcefree.export.optimize import calibration_inputs, optimize_package
from sourcefree.package.audit import audit_package
from sourcefree.package.loader import load_package
from sourcefree.package.manifest import (
    MANIFEST_NAME,
    MIN_CALIBRATION_IMAGES,
    ONNX_NAME,
    WEIGHTS_NAME,
    Manifest,
)
from sourcefree.package.onnx_check import summarize
from sourcefree.package.signing import keygen
from sourcefree.pipeline.prepare import load_packages
from sourcefree.runtime import Predictor

Forge = Callable[[Path, str, bytes], None]
N_IMAGES = 40


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site's own images: 40 synthetic faces of a shifted domain (plus CSVs, ignored)."""
    return write_domain(tmp_path_factory.mktemp("site") / "photos", "wild-mild", N_IMAGES, 32)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("keys") / "site")


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(optimize, [str(a) for a in args])


@pytest.fixture(scope="module")
def int8_pkg(
    source_pkg: Path,
    calibration: Path,
    keys: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The int8 variant, written by the CLI and signed. Do not modify."""
    out = tmp_path_factory.mktemp("int8") / "fer-int8"
    result = _run(source_pkg, "--int8", "--calibration", calibration, "-o", out, "--key", keys[0])
    assert result.exit_code == 0, result.output
    assert "int8, top-1 agreement with fp32 100.00% on 40 calibration images" in result.output
    assert "signed ed25519:" in result.output
    return out


@pytest.fixture(scope="module")
def fp16_pkg(source_pkg: Path, calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp16 variant, written by the Python API. Do not modify."""
    out = tmp_path_factory.mktemp("fp16") / "fer-fp16"
    done = optimize_package(source_pkg, calibration, out, precision="fp16")
    assert done.signer is None and done.calibration_images == N_IMAGES
    return out


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_variant_verifies_serves_and_records_its_origin(
    request: pytest.FixtureRequest, source_pkg: Path, calibration: Path, variant: str
) -> None:
    path: Path = request.getfixturevalue(f"{variant}_pkg")
    source = load_package(source_pkg)
    pkg = load_package(path)
    m = pkg.manifest
    assert m.onnx.precision == variant
    assert m.name == f"fer-small-{variant}"
    record = m.optimization
    assert record is not None
    assert record.from_sha256 == source.sha256
    assert record.calibration_images == N_IMAGES
    assert record.min_agreement == 0.99 and record.top1_agreement >= 0.99
    # Everything but the graph and the manifest is the fp32 package's, byte for byte.
    assert pkg.weights_bytes == source.weights_bytes
    assert (m.labels, m.input, m.architecture, m.kind) == (
        source.manifest.labels,
        source.manifest.input,
        source.manifest.architecture,
        source.manifest.kind,
    )
    ops = summarize(pkg.onnx_bytes).ops
    assert ("QuantizeLinear" in ops and "DequantizeLinear" in ops) == (variant == "int8")
    # Served by the runtime; its classes are the fp32 package's on the site's images.
    x = calibration_inputs(calibration, source, 512, 0.05)
    got = Predictor(pkg, device="cpu").predict_array(x).indices
    want = Predictor(source, device="cpu").predict_array(x).indices
    assert (got == want).mean() == record.top1_agreement
    assert audit_package(path).clean


def test_images_never_reach_the_package(int8_pkg: Path, calibration: Path) -> None:
    """Only the aggregate count and agreement are recorded: no name, path or per-image value."""
    names = [p.name for p in calibration.iterdir()]
    for fname in (MANIFEST_NAME, ONNX_NAME):
        data = (int8_pkg / fname).read_bytes()
        assert calibration.name.encode() not in data
        assert not [n for n in names if n.encode() in data]
    provenance = json.loads((int8_pkg / MANIFEST_NAME).read_bytes())["provenance"]
    assert sorted(provenance["optimization"]) == [
        "calibration_images",
        "from_sha256",
        "min_agreement",
        "top1_agreement",
    ]


def test_int8_keeps_the_image_input_and_the_head_in_float(int8_pkg: Path) -> None:
    """8-bit steps fitted to the input's range fall between pixel values; logits keep theirs."""
    import onnx

    graph = onnx.load_from_string((int8_pkg / ONNX_NAME).read_bytes()).graph
    readers = [n.op_type for n in graph.node if "input" in n.input]
    writers = [n.op_type for n in graph.node if "logits" in n.output]
    assert readers == ["Conv"] and writers == ["Gemm"]
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("Conv")


def test_signed_when_a_key_is_given(int8_pkg: Path, keys: tuple[Path, Path]) -> None:
    assert load_package(int8_pkg, public_key=keys[1]).signature_verified


def test_below_the_threshold_nothing_is_written(
    source_pkg: Path, calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(optmod, "top1_agreement", lambda *a: 0.95)
    out = tmp_path / "variant"
    with pytest.raises(ExportError, match=r"agrees with the fp32 package on 95\.00%.*99\.00%"):
        optimize_package(source_pkg, calibration, out, precision="int8")
    assert list(tmp_path.iterdir()) == []  # no OUT, no staging folder
    result = _run(source_pkg, "--int8", "--calibration", calibration, "-o", out)
    assert result.exit_code == 2
    assert "error: the int8 variant agrees" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--int8", "--min-agreement", "1.01"], "1.01 is not in the range"),
        (["--int8", "--fp16"], "exactly one of --int8 and --fp16"),
        ([], "exactly one of --int8 and --fp16"),
        (["--int8", "--max-images", "3"], "3 is not in the range x>=16"),
    ],
    ids=["agreement above 1", "both", "neither", "too few images"],
)
def test_cli_refuses_bad_options(
    source_pkg: Path, calibration: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "variant"
    result = _run(source_pkg, *args, "--calibration", calibration, "-o", out)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_missing_empty_or_small_calibration_folders_are_refused(
    source_pkg: Path, calibration: Path, tmp_path: Path
) -> None:
    out = tmp_path / "variant"
    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small"
    small.mkdir()
    for img in sorted(calibration.glob("*.png"))[: MIN_CALIBRATION_IMAGES - 1]:
        shutil.copy(img, small / img.name)
    for folder, message in [
        (tmp_path / "missing", "does not exist"),
        (empty, "no image"),
        (small, "has 15 readable image"),
    ]:
        with pytest.raises(DatasetError, match=message):
            optimize_package(source_pkg, folder, out, precision="int8")
        result = _run(source_pkg, "--int8", "--calibration", folder, "-o", out)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "small"]


def test_calibration_images_must_fit_in_memory(
    source_pkg: Path, calibration: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sourcefree.package import manifest

    monkeypatch.setattr(manifest, "batch_budget_bytes", lambda: 20 * 3 * 32 * 32 * 4)
    with pytest.raises(ConfigError, match="--max-images 40 is too large.*pass --max-images 20"):
        optimize_package(source_pkg, calibration, tmp_path / "v", precision="int8")
    assert list(tmp_path.iterdir()) == []


def test_variants_are_made_from_fp32_packages_only(
    int8_pkg: Path, source_pkg: Path, calibration: Path, tmp_path: Path
) -> None:
    with pytest.raises(PackageError, match="already int8.*optimize the fp32 package"):
        optimize_package(int8_pkg, calibration, tmp_path / "again", precision="fp16")
    for out in (source_pkg, source_pkg / "int8"):
        with pytest.raises(ConfigError, match=r"is \(inside\) the package being optimised"):
            optimize_package(source_pkg, calibration, out, precision="int8", overwrite=True)
    assert load_package(source_pkg).manifest.onnx.precision == "fp32"


def test_adapt_refuses_an_int8_package(int8_pkg: Path, source_pkg: Path) -> None:
    sha = load_package(source_pkg).sha256
    with pytest.raises(PackageError, match=f"int8 deployment variant.*{sha[:16]}.*optimize again"):
        load_packages([int8_pkg])


def _edit_manifest(pkg: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((pkg / MANIFEST_NAME).read_bytes())
    edit(raw)
    (pkg / MANIFEST_NAME).write_text(json.dumps(raw, sort_keys=True))


def test_manifest_precision_and_optimization_go_together(int8_pkg: Path) -> None:
    raw = json.loads((int8_pkg / MANIFEST_NAME).read_bytes())
    Manifest.from_dict(raw)
    opt = raw["provenance"]["optimization"]
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"optimization": None}, "int8", "'provenance.optimization' is missing"),
        ({}, "fp32", "'provenance.optimization' is invalid.*not an optimised variant"),
        ({"top1_agreement": 1.5}, "int8", "top1_agreement' is invalid.*outside"),
        ({"top1_agreement": 0.5}, "int8", "below min_agreement"),
        ({"calibration_images": 0}, "int8", "calibration_images' is invalid"),
        ({"from_sha256": "../x"}, "int8", "from_sha256' is invalid"),
        ({"path": "/home/a"}, "int8", "optimization.path' is invalid.*Unknown field"),
    ]
    for change, precision, message in cases:
        bad = json.loads(json.dumps(raw))
        bad["onnx"]["precision"] = precision
        if change.get("optimization", 1) is None:
            del bad["provenance"]["optimization"]
        else:
            bad["provenance"]["optimization"] = {**opt, **change}
        with pytest.raises(PackageError, match=message):
            Manifest.from_dict(bad)


def _with_initializer(pkg: Path, tensor: TensorProto, forge: Forge) -> None:
    import onnx

    model = onnx.load_from_string((pkg / ONNX_NAME).read_bytes())
    model.graph.initializer.append(tensor)
    forge(pkg, ONNX_NAME, model.SerializeToString())


def test_quantised_ops_and_8_bit_tensors_only_in_int8_graphs(
    int8_pkg: Path, source_pkg: Path, tmp_path: Path, forge: Forge
) -> None:
    def copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        (dst / "signature").unlink(missing_ok=True)
        return dst

    # The int8 graph under a manifest that claims fp32 (every hash still consistent).
    fake = copy(int8_pkg, "fake")

    def as_fp32(raw: dict[str, Any]) -> None:
        raw["onnx"]["precision"] = "fp32"
        del raw["provenance"]["optimization"]

    _edit_manifest(fake, as_fp32)
    with pytest.raises(
        PackageError, match="uses the op DequantizeLinear, but its precision is fp32"
    ):
        load_package(fake)
    # An int8 or float64 tensor in an fp32 graph; a float64 one in an int8 graph.
    for dtype, message in [(np.int8, "a tensor of int8"), (np.float64, "a tensor of data type 11")]:
        pkg = copy(source_pkg, f"fp32-{np.dtype(dtype).name}")
        _with_initializer(pkg, numpy_helper.from_array(np.zeros(2, dtype), "extra"), forge)
        with pytest.raises(PackageError, match=f"{ONNX_NAME} holds {message}"):
            load_package(pkg)
    pkg = copy(int8_pkg, "int8-float64")
    _with_initializer(pkg, helper.make_tensor("extra", TensorProto.DOUBLE, [1], [0.0]), forge)
    with pytest.raises(PackageError, match="holds a tensor of data type 11"):
        load_package(pkg)


def test_weights_file_is_untouched_and_listed(int8_pkg: Path, source_pkg: Path) -> None:
    """The optimised package lists exactly the fp32 package's files, the graph re-hashed."""
    new = json.loads((int8_pkg / MANIFEST_NAME).read_bytes())["files"]
    old = json.loads((source_pkg / MANIFEST_NAME).read_bytes())["files"]
    assert sorted(new) == sorted(old)
    assert new[WEIGHTS_NAME] == old[WEIGHTS_NAME]
    assert new[ONNX_NAME] != old[ONNX_NAME]


@pytest.mark.parametrize(
    ("scores", "kept"),
    [
        ({b"minmax": 0.98, b"percentile": 0.995}, (b"percentile", 0.995)),
        ({b"minmax": 0.995, b"percentile": 0.99}, (b"minmax", 0.995)),
        ({b"minmax": 0.99, b"percentile": 0.99}, (b"minmax", 0.99)),  # a tie keeps the first
    ],
)
def test_int8_keeps_the_range_estimator_that_agrees_most(
    source_pkg: Path,
    monkeypatch: pytest.MonkeyPatch,
    scores: dict[bytes, float],
    kept: tuple[bytes, float],
) -> None:
    tried: list[str] = []

    def quantize(pkg: Any, x: Any, ranges: str = "minmax") -> bytes:
        tried.append(ranges)
        return ranges.encode()

    monkeypatch.setattr(optmod, "quantize_int8", quantize)
    monkeypatch.setattr(optmod, "top1_agreement", lambda pkg, graph, x: scores[graph])
    assert optmod._best_int8(load_package(source_pkg), np.zeros((1, 3, 32, 32))) == kept
    assert tried == list(optmod.INT8_RANGES)


def test_percentile_ranges_print_nothing_on_stdout(
    source_pkg: Path, calibration: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg = load_package(source_pkg)
    x = calibration_inputs(calibration, pkg, 64, 0.05)
    graph = optmod.quantize_int8(pkg, x, "percentile")
    assert optmod.top1_agreement(pkg, graph, x) >= 0.9
    assert capsys.readouterr().out == ""
    with pytest.raises(ConfigError, match="unknown int8 range estimator"):
        optmod.quantize_int8(pkg, x, "mse")
