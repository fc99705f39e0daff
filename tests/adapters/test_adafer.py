"""AdaFER: eq. 1-4 on hand-computed tensors, the AU detector in the package, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from sourcefree.adapters.adafer import (
    AdaFER,
    AdaFERConfig,
    au_codes,
    au_posterior,
    modal_codes,
    s_hard_labels,
    sample_triplets,
    soft_cross_entropy,
    soft_kl,
    t_hard_labels,
    triplet_loss,
)
from sourcefree.data.synthetic import AU_NAMES, generate
from sourcefree.engine import config as cfgmod
from sourcefree.engine.feature_bank import MemoryBudget
from sourcefree.engine.method import MethodContext, ScheduleSpec, SourceModel, TargetData
from sourcefree.engine.models import build_classifier, load_classifier
from sourcefree.engine.reproducibility import seed_everything
from sourcefree.errors import (
    ConfigError,
    ExportError,
    IntegrityError,
    PackageError,
    RequirementError,
    SignatureError,
)
from sourcefree.export import source_package
from sourcefree.package.audit import audit_package
from sourcefree.package.loader import Package, load_package, sign_package
from sourcefree.package.manifest import AU_DETECTOR_NAME, ONNX_MANIFEST_KEY, InputSpec, Manifest
from sourcefree.package.signing import keygen
from sourcefree.runtime.predictor import AUDetector
from sourcefree.vendor.training import AUDetectorNet, au_frequencies, detect_aus, to_tensor

Forge = Callable[[Path, str, bytes], None]
SPEC = InputSpec(size=(32, 32))


# --- eq. 1-3: AU-guided annotating, with the frequencies standing in for source images ---


F2 = torch.tensor([[0.9, 0.2], [0.1, 0.6]], dtype=torch.float64)


def test_t_soft_posterior_by_hand() -> None:
    codes = torch.tensor([[True, False], [False, True]])
    q = au_posterior(codes, F2, torch.tensor([1.0, 3.0]))
    # [1, 0]: P(E|0) = 0.9 * 0.8 = 0.72, P(E|1) = 0.1 * 0.4 = 0.04; prior 1 : 3.
    assert q[0].tolist() == pytest.approx([0.72 / 0.84, 0.12 / 0.84], abs=1e-12)
    # [0, 1]: P(E|0) = 0.1 * 0.2 = 0.02, P(E|1) = 0.9 * 0.6 = 0.54.
    assert q[1].tolist() == pytest.approx([0.02 / 1.64, 1.62 / 1.64], abs=1e-12)
    assert t_hard_labels(q).tolist() == [0, 1]


def test_posterior_clips_frequencies_so_no_class_is_ruled_out() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    q = au_posterior(torch.tensor([[True, True]]), f, torch.ones(2), floor=0.01)
    # P(E|0) = 0.99 * 0.01 = P(E|1): a tie, not 0/0.
    assert q[0].tolist() == pytest.approx([0.5, 0.5])
    assert bool(torch.isfinite(q).all())


def test_s_hard_matches_each_class_modal_code() -> None:
    assert modal_codes(F2).tolist() == [[True, False], [False, True]]
    codes = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    q = au_posterior(codes, F2, torch.ones(2))
    assert s_hard_labels(codes, F2, q).tolist() == [0, 1, -1, -1]


def test_s_hard_classes_sharing_a_modal_code_go_to_the_larger_posterior() -> None:
    # Classes 0 and 2 share the modal code [1, 0]; class 2 is likelier for it.
    f = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.95, 0.05]], dtype=torch.float64)
    codes = torch.tensor([[True, False]])
    q = au_posterior(codes, f, torch.ones(3))
    assert q[0, 2] > q[0, 0]
    assert s_hard_labels(codes, f, q).tolist() == [2]


def test_soft_terms_by_hand() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0]])  # softmax = (0.75, 0.25)
    y = torch.tensor([[0.5, 0.5]])
    want_kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(soft_kl(logits, y)) == pytest.approx(want_kl, abs=1e-6)
    ref = torch.nn.functional.kl_div(torch.log_softmax(logits, 1), y, reduction="batchmean")
    assert float(soft_kl(logits, y)) == pytest.approx(float(ref), abs=1e-6)
    assert float(soft_kl(logits, torch.tensor([[1.0, 0.0]]))) == pytest.approx(-math.log(0.75))
    want_ce = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert float(soft_cross_entropy(logits, y)) == pytest.approx(want_ce, abs=1e-6)


# --- eq. 4: AU-guided triplets among target images ------------------------------------


def test_triplet_loss_by_hand() -> None:
    a = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # normalised inside: both (1, 0)
    p = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    n = torch.tensor([[0.8, 0.6], [0.0, 3.0]])
    d_ap = math.sqrt(0.4**2 + 0.8**2)
    first = 0.5 - (math.sqrt(0.2**2 + 0.6**2) - d_ap)  # > 0: a violated triplet
    second = max(0.0, 0.5 - (math.sqrt(2.0) - d_ap))  # satisfied: 0
    assert second == 0.0
    got = triplet_loss(a, p, n, margin=0.5)
    assert float(got) == pytest.approx((first + second) / 2, abs=1e-6)
    assert float(triplet_loss(a[:0], p[:0], n[:0], 0.5)) == 0.0


def test_triplets_positives_share_the_code_negatives_are_hard() -> None:
    aus = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # 0: code 100
            [0.8, 0.2, 0.1],  # 1: code 100
            [0.9, 0.6, 0.0],  # 2: code 110, similar to 0 and 1 (a hard negative)
            [0.0, 0.0, 0.9],  # 3: code 001, dissimilar to all
            [0.1, 0.1, 0.8],  # 4: code 001
            [0.0, 0.9, 0.0],  # 5: code 010, unique: no positive
        ]
    )
    codes = au_codes(aus, 0.5)
    pos, neg, hard = sample_triplets(aus, codes, 0.5, torch.Generator().manual_seed(0))
    assert pos.tolist()[:2] == [1, 0] and pos.tolist()[3:5] == [4, 3]
    assert pos[2] == -1 and pos[5] == -1 and neg[2] == -1 and neg[5] == -1
    # Anchors 0 and 1: the only hard negative (similarity > 0.5 with another code) is 2.
    assert neg[0] == 2 and neg[1] == 2 and bool(hard[0]) and bool(hard[1])
    # Anchors 3 and 4 have no negative above 0.5: the most similar other code is taken.
    for i in (3, 4):
        sims = torch.nn.functional.cosine_similarity(aus[i : i + 1], aus)
        others = [j for j in range(6) if not torch.equal(codes[j], codes[i])]
        assert neg[i] == max(others, key=lambda j: float(sims[j]))
        assert not bool(hard[i])
    again = sample_triplets(aus, codes, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip((pos, neg, hard), again, strict=True))


def test_triplets_are_drawn_uniformly_from_the_pool() -> None:
    aus = torch.tensor([[0.9, 0.0]] * 4 + [[0.9, 0.9]] * 3)
    codes = au_codes(aus, 0.5)
    seen: set[int] = set()
    for seed in range(30):
        pos, neg, _ = sample_triplets(aus, codes, 0.5, torch.Generator().manual_seed(seed))
        assert pos[0] in (1, 2, 3) and neg[0] in (4, 5, 6)
        seen.add(int(neg[0]))
    assert seen == {4, 5, 6}


@pytest.mark.parametrize("pairs", [171, 200])  # 513 images: a last tile of 1 anchor; 600: 88
def test_triplets_do_not_depend_on_the_block_size(pairs: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.rand(pairs, 14, generator=g, dtype=torch.float64), 1)
    y = x + 0.01 * torch.rand(pairs, 14, generator=g, dtype=torch.float64)
    y = torch.nn.functional.normalize(y, dim=1)
    # Anchors x + y are as similar to x as to y up to rounding: with no hard negative
    # (threshold above 1) the easy negative is whichever the product rounds higher, so
    # similarities from a product that rounds otherwise (BLAS on a few rows) change it.
    aus = torch.cat([x + y, x, y])
    codes = torch.zeros(3 * pairs, 2, dtype=torch.bool)
    codes[pairs:, 0] = True
    for threshold in (1.01, 0.999):
        want = sample_triplets(aus, codes, threshold, torch.Generator().manual_seed(1))
        assert bool((want[0] >= 0).all()) and bool((want[1] >= 0).all())
        for chunk in (1, 2, 7, 16, 100, 255, 256, 1000):
            got = sample_triplets(aus, codes, threshold, torch.Generator().manual_seed(1), chunk)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), chunk
    with pytest.raises(ConfigError):
        sample_triplets(aus, codes, 0.5, torch.Generator(), 0)


def test_exp_schedule() -> None:
    s = ScheduleSpec(name="exp", final=0.9**4)
    assert s.factor(0, 100) == 1.0
    assert s.factor(50, 100) == pytest.approx(0.81)
    assert s.factor(100, 100) == pytest.approx(0.9**4)


def test_config_defaults_are_the_papers_and_bad_values_are_refused() -> None:
    cfg = AdaFERConfig()
    assert (cfg.beta, cfg.epsilon, cfg.margin, cfg.negative_threshold) == (1.0, 1.0, 0.5, 0.5)
    assert (cfg.hard_labels, cfg.soft_labels) == ("s-hard", True)
    assert (cfg.optim.lr, cfg.optim.decay) == (1e-3, 0.9)
    with pytest.raises(ConfigError, match="negative_threshold=1.5"):
        AdaFERConfig(negative_threshold=1.5)
    with pytest.raises(ConfigError, match="nothing to minimise"):
        AdaFERConfig(source_weight=0, epsilon=0, beta=0)
    with pytest.raises(ConfigError, match="decay=0"):
        cfgmod.from_dict(AdaFERConfig, {"optim": {"decay": 0}})


# --- the method on a package with an AU detector ----------------------------------------


def _data(n: int = 48) -> TargetData:
    s = generate("wild-mild", n, 32, seed=1)
    return TargetData(images=s.images, spec=SPEC, fingerprint="x")


def _method(
    pkg: Package, data: TargetData, memory: MemoryBudget | None = None, **cfg: Any
) -> AdaFER:
    model = load_classifier(pkg.manifest.architecture, pkg.weights_bytes)
    ctx = MethodContext((SourceModel(pkg, model),), data, torch.device("cpu"), 0, memory)
    seed_everything(0)
    return AdaFER(cfgmod.from_dict(AdaFERConfig, {"batch_size": 16, **cfg}), ctx)


def test_labels_come_from_the_packaged_detector(au_source_pkg: Path) -> None:
    pkg = load_package(au_source_pkg)
    data = _data()
    method = _method(pkg, data)
    method.label()
    want = AUDetector(pkg).detect_array(data.tensor().numpy())
    np.testing.assert_allclose(method.aus.numpy(), want, atol=1e-6)
    codes = au_codes(torch.from_numpy(want), 0.5)
    freqs = torch.tensor(pkg.manifest.source_stats.au_frequencies, dtype=torch.float64)  # type: ignore[union-attr]
    q = au_posterior(codes, freqs, torch.tensor([10.0, 20.0, 30.0]))
    assert torch.allclose(method.soft.double(), q, atol=1e-6)
    assert method.hard.tolist() == s_hard_labels(codes, freqs, q).tolist()
    selection = method.pseudo_label_selection()
    if bool((method.hard >= 0).any()):
        assert selection is not None
        idx, labels = selection
        assert labels.tolist() == method.hard[idx].tolist() and bool((labels >= 0).all())
    report = method.report()
    assert report["labels"]["prior"] == "class_counts"
    assert len(report["labels"]["active_fraction_per_au"]) == len(AU_NAMES)
    method.sample(0)
    ok = method.positives >= 0
    assert bool(ok.any()), "the fixture detector repeats codes, so triplets exist"
    for i in torch.nonzero(ok).flatten().tolist():
        assert torch.equal(codes[i], codes[method.positives[i]]) and method.positives[i] != i
        assert not torch.equal(codes[i], codes[method.negatives[i]])


def test_triplet_blocks_follow_the_memory_budget(
    au_source_pkg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sourcefree.adapters.adafer as adafer

    chunks: list[int] = []
    real = adafer.sample_triplets

    def spy(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chunks.append(args[4])
        return real(*args)

    monkeypatch.setattr(adafer, "sample_triplets", spy)
    pkg, data = load_package(au_source_pkg), _data()
    n = len(data)
    drawn = []
    for budget in (1 << 40, 8 * n * adafer.TRIPLET_PAIR_BYTES * 5, 1):
        method = _method(pkg, data, MemoryBudget(budget))
        method.sample(3)
        drawn.append((method.positives, method.negatives, method.hard_negative))
    assert chunks == [256, 5, 1]
    for other in drawn[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, drawn[0], strict=True))


def test_t_hard_and_no_hard_labels(au_source_pkg: Path) -> None:
    pkg = load_package(au_source_pkg)
    t = _method(pkg, _data(), hard_labels="t-hard")
    t.label()
    assert t.hard.tolist() == t.soft.argmax(1).tolist()
    none = _method(pkg, _data(), hard_labels="none")
    none.label()
    assert bool((none.hard == -1).all()) and none.pseudo_label_selection() is None
    step = none.phases()[2].step
    assert none.phases()[2].name == "adapt"
    from sourcefree.engine.method import Batch

    idx = torch.arange(16)
    out = step(Batch(_data().tensor(idx), idx, torch.Generator().manual_seed(0), 0, 0, 0.0))
    assert out.loss is not None and bool(torch.isfinite(out.loss))


def test_missing_detector_is_a_typed_error(source_pkg: Path) -> None:
    with pytest.raises(RequirementError) as err:
        _method(load_package(source_pkg), _data())
    text = str(err.value)
    assert "adafer: package 'fer-small' carries no action-unit detector" in text
    assert "auxiliary.au_detector" in text and "Fix: ask the vendor" in text
    with pytest.raises(RequirementError, match="carries no action-unit detector"):
        AUDetector(source_pkg)


def test_missing_au_frequencies_is_a_typed_error(au_source_pkg: Path) -> None:
    pkg = load_package(au_source_pkg)
    stats = dataclasses.replace(pkg.manifest.source_stats, au_frequencies=None)  # type: ignore[type-var]
    bare = dataclasses.replace(pkg, manifest=dataclasses.replace(pkg.manifest, source_stats=stats))
    with pytest.raises(RequirementError) as err:
        _method(bare, _data())
    assert "has no source_stats.au_frequencies" in str(err.value)
    assert "sourcefree.vendor.training.au_frequencies" in str(err.value)


def test_without_class_counts_the_prior_is_uniform_with_a_warning(au_source_pkg: Path) -> None:
    pkg = load_package(au_source_pkg)
    stats = dataclasses.replace(pkg.manifest.source_stats, class_counts=None)  # type: ignore[type-var]
    bare = dataclasses.replace(pkg, manifest=dataclasses.replace(pkg.manifest, source_stats=stats))
    with pytest.warns(UserWarning, match="no source_stats.class_counts"):
        method = _method(bare, _data())
    assert method.prior.tolist() == [1.0, 1.0, 1.0]


# --- package format: the auxiliary model in the manifest and on disk -------------------


def test_manifest_round_trip_with_auxiliary(au_source_pkg: Path) -> None:
    pkg = load_package(au_source_pkg)
    m = pkg.manifest
    assert m.auxiliary is not None and pkg.au_detector is not None
    assert set(m.files) == {"model.safetensors", "model.onnx", AU_DETECTOR_NAME}
    raw = json.loads((au_source_pkg / "manifest.json").read_text())
    assert raw["auxiliary"]["au_detector"] == {
        "file": AU_DETECTOR_NAME,
        "input": "input",
        "output": "au_probabilities",
        "au_names": list(AU_NAMES),
        "threshold": 0.5,
    }
    assert Manifest.from_dict(m.to_dict()) == m
    # The classifier graph's embedded manifest names the detector too.
    graph = onnx.load_from_string(pkg.onnx_bytes)
    embedded = {p.key: p.value for p in graph.metadata_props}[ONNX_MANIFEST_KEY]
    assert json.loads(embedded)["auxiliary"] == raw["auxiliary"]


def _raw(pkg: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pkg / "manifest.json").read_text())
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["files"].pop(AU_DETECTOR_NAME), "'files.au_detector.onnx' is missing"),
        (lambda r: r["auxiliary"]["au_detector"].update(extra=1), "au_detector.extra"),
        (lambda r: r["auxiliary"].update(face_detector={}), "auxiliary.face_detector"),
        (lambda r: r["auxiliary"]["au_detector"].update(threshold=1.0), "threshold"),
        (lambda r: r["auxiliary"]["au_detector"].update(file="model.onnx"), "au_detector.file"),
        (lambda r: r["auxiliary"]["au_detector"]["au_names"].pop(), "au_frequencies"),
        (lambda r: r["source_stats"]["au_frequencies"][0].__setitem__(0, 1.5), "outside [0, 1]"),
        (lambda r: r.update(auxiliary={}), "names no model"),
    ],
)
def test_manifest_auxiliary_errors(
    au_source_pkg: Path, edit: Callable[[dict[str, Any]], Any], message: str
) -> None:
    raw = _raw(au_source_pkg)
    edit(raw)
    with pytest.raises(PackageError, match=re.escape(message)):
        Manifest.from_dict(raw)


@pytest.fixture
def au_copy(au_source_pkg: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(au_source_pkg, dst)
    return dst


def test_tampered_detector_is_detected(au_copy: Path) -> None:
    path = au_copy / AU_DETECTOR_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="'au_detector.onnx' does not match its sha256"):
        load_package(au_copy)
    row = {r["name"]: r for r in audit_package(au_copy).files}[AU_DETECTOR_NAME]
    assert row["status"] == "listed, DIFFERS"


def test_missing_detector_file_is_detected(au_copy: Path) -> None:
    (au_copy / AU_DETECTOR_NAME).unlink()
    with pytest.raises(PackageError, match="'au_detector.onnx' is missing"):
        load_package(au_copy)


def test_signature_covers_the_detector(au_copy: Path, tmp_path: Path, forge: Forge) -> None:
    private, public = keygen(tmp_path / "vendor")
    sign_package(au_copy, private)
    assert load_package(au_copy, public_key=public).signature_verified
    forge(au_copy, AU_DETECTOR_NAME, (au_copy / AU_DETECTOR_NAME).read_bytes() + b"\x00")
    with pytest.raises(SignatureError):
        load_package(au_copy, public_key=public)


def _edit_detector(pkg: Path, edit: Callable[[Any], None], forge: Forge) -> None:
    model = onnx.load_from_string((pkg / AU_DETECTOR_NAME).read_bytes())
    edit(model)
    forge(pkg, AU_DETECTOR_NAME, model.SerializeToString())


def _add_metadata(model: Any) -> None:
    entry = model.metadata_props.add()
    entry.key, entry.value = "trained_on", "/home/alice/faces/img001.jpg"


def _custom_op(model: Any) -> None:
    model.graph.node[0].op_type = "Loop"


def _wrong_width(model: Any) -> None:
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 13


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_add_metadata, "au_detector.onnx carries metadata key 'trained_on'"),
        (_custom_op, "au_detector.onnx uses the op 'Loop'"),
        (_wrong_width, r"au_detector.onnx output has shape \['batch', 13\]"),
    ],
)
def test_forged_detector_graph_gets_the_onnx_checks(
    au_copy: Path, forge: Forge, edit: Callable[[Any], None], message: str
) -> None:
    _edit_detector(au_copy, edit, forge)
    with pytest.raises(PackageError, match=message):
        load_package(au_copy)


def test_audit_and_inspect_recognise_the_detector(au_copy: Path, forge: Forge) -> None:
    from sourcefree.package.inspect import summarize_package

    report = audit_package(au_copy)
    assert report.clean, report.findings
    assert {r["name"]: r["status"] for r in report.files}[AU_DETECTOR_NAME] == "listed"
    assert AU_DETECTOR_NAME in report.auxiliary
    assert "14 action units" in report.manifest["au_detector"]
    info = summarize_package(au_copy)["auxiliary"]
    assert info["au_threshold"] == 0.5 and info["action_units"].startswith("AU1, AU2")
    _edit_detector(au_copy, _add_metadata, forge)
    kinds = {(f.kind, f.where.split(" ")[0]) for f in audit_package(au_copy).findings}
    assert ("onnx-metadata", AU_DETECTOR_NAME) in kinds and ("unverified", "package") in kinds


# --- export: the vendor's side ----------------------------------------------------------


def test_au_frequencies_helper() -> None:
    aus = np.array([[0.9, 0.1], [0.6, 0.5], [0.2, 0.7], [0.4, 0.4]])
    labels = np.array([0, 0, 1, 1])
    assert au_frequencies(aus, labels, 3) == [[1.0, 0.5], [0.0, 0.5], [0.0, 0.0]]
    assert au_frequencies(aus, labels, 3, threshold=0.3)[1] == [0.5, 1.0]
    with pytest.raises(ConfigError, match="labels outside"):
        au_frequencies(aus, labels, 1)


class _Logits(torch.nn.Module):
    """A detector that forgot its sigmoid."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)[0] * 100.0
        return logits


def test_export_refuses_bad_detectors(tmp_path: Path) -> None:
    model = build_classifier("smallcnn", 3)
    base: dict[str, Any] = {
        "architecture": "smallcnn",
        "labels": ["a", "b", "c"],
        "input_spec": SPEC,
        "out": tmp_path / "p",
    }
    det = AUDetectorNet(build_classifier("smallcnn", 4)).eval()
    with pytest.raises(ExportError, match="without au_names"):
        source_package(model, **base, au_detector=det)
    with pytest.raises(ExportError, match=r"returns \(4, 4\)"):
        source_package(model, **base, au_detector=det, au_names=["AU1", "AU2"])
    with pytest.raises(ExportError, match="outside"):
        source_package(
            model, **base, au_detector=_Logits(det.net), au_names=[f"AU{i}" for i in range(4)]
        )
    with pytest.raises(ExportError, match="au_frequencies rows have 3 values"):
        source_package(
            model,
            **base,
            au_detector=det,
            au_names=["AU1", "AU2", "AU4", "AU5"],
            source_stats={"au_frequencies": [[0.5] * 3] * 3},
        )
    with pytest.raises(ExportError, match="au_names were given without an au_detector"):
        source_package(model, **base, au_names=["AU1"])
    assert not (tmp_path / "p").exists()


def test_detector_in_the_package_matches_torch(
    au_source_pkg: Path, au_detector_factory: Callable[[], torch.nn.Module]
) -> None:
    x = to_tensor(generate("studio", 8, 32, seed=5).images, SPEC)
    want = detect_aus(au_detector_factory(), x)
    got = AUDetector(au_source_pkg).detect_array(x.numpy())
    np.testing.assert_allclose(got, want, atol=1e-4)
