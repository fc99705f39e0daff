"""Package verification: every bad input is refused with a typed, explanatory error."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from sourcefree import IntegrityError, PackageError, SignatureError, load_package
from sourcefree.package.manifest import ONNX_NAME, WEIGHTS_NAME

Forge = Callable[[Path, str, bytes], None]


def _manifest(pkg: Path) -> dict[str, object]:
    return json.loads((pkg / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_valid_package_loads(source_pkg: Path) -> None:
    pkg = load_package(source_pkg)
    assert pkg.manifest.labels == ("surprise", "fear", "happiness")
    assert pkg.manifest.kind == "source"
    assert not pkg.signed
    assert set(pkg.blobs) == {WEIGHTS_NAME, ONNX_NAME}
    assert pkg.manifest.source_stats is not None
    assert pkg.manifest.source_stats.class_counts == (10, 20, 30)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, ONNX_NAME])
def test_tampered_byte_is_refused(pkg_copy: Path, name: str) -> None:
    data = bytearray((pkg_copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (pkg_copy / name).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"'{name}' does not match its sha256"):
        load_package(pkg_copy)


def test_tampered_manifest_byte_is_refused(pkg_copy: Path) -> None:
    text = (pkg_copy / "manifest.json").read_text()
    (pkg_copy / "manifest.json").write_text(text.replace('"surprise"', '"surprisf"', 1))
    with pytest.raises(PackageError, match="embedded manifest differs"):
        load_package(pkg_copy)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, ONNX_NAME])
def test_truncated_file_is_refused(pkg_copy: Path, name: str) -> None:
    data = (pkg_copy / name).read_bytes()
    (pkg_copy / name).write_bytes(data[:-10])
    with pytest.raises(IntegrityError, match="truncated or changed"):
        load_package(pkg_copy)


def test_missing_file_is_refused(pkg_copy: Path) -> None:
    (pkg_copy / ONNX_NAME).unlink()
    with pytest.raises(PackageError, match="'model.onnx' is missing"):
        load_package(pkg_copy)


def test_unlisted_file_is_refused(pkg_copy: Path) -> None:
    (pkg_copy / "notes.txt").write_text("hello")
    with pytest.raises(PackageError, match="unlisted entry 'notes.txt'"):
        load_package(pkg_copy)


def test_duplicate_manifest_key_is_refused(pkg_copy: Path) -> None:
    text = (pkg_copy / "manifest.json").read_text()
    (pkg_copy / "manifest.json").write_text(text.replace("{", '{"kind": "adapted",', 1))
    with pytest.raises(PackageError, match="has the key 'kind' twice"):
        load_package(pkg_copy)


def test_nan_in_manifest_is_refused(pkg_copy: Path) -> None:
    text = (pkg_copy / "manifest.json").read_text()
    (pkg_copy / "manifest.json").write_text(text.replace('"mean": [\n      0.5', '"mean": [NaN', 1))
    with pytest.raises(PackageError, match="NaN or Infinity"):
        load_package(pkg_copy)


def test_unknown_schema_version_is_refused(pkg_copy: Path) -> None:
    m = _manifest(pkg_copy)
    m["schema_version"] = 99
    (pkg_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="'schema_version' is 99.*reads schema version 1"):
        load_package(pkg_copy)


@pytest.mark.parametrize("field", ["labels", "input", "architecture", "files", "schema_version"])
def test_missing_field_is_named(pkg_copy: Path, field: str) -> None:
    m = _manifest(pkg_copy)
    del m[field]
    (pkg_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match=f"'{field}' is missing"):
        load_package(pkg_copy)


def test_nested_field_error_names_the_path(pkg_copy: Path) -> None:
    m = _manifest(pkg_copy)
    m["input"]["std"][1] = -1.0  # type: ignore[index]
    (pkg_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match=r"'input.std\[1\]' is invalid.*Must be positive"):
        load_package(pkg_copy)


def test_oversized_manifest_is_refused(pkg_copy: Path) -> None:
    (pkg_copy / "manifest.json").write_bytes(b" " * (9 * 1024 * 1024) + b"{}")
    with pytest.raises(PackageError, match="The limit is"):
        load_package(pkg_copy)


def test_deep_manifest_is_refused(pkg_copy: Path) -> None:
    m = _manifest(pkg_copy)
    deep: object = 1
    for _ in range(20):
        deep = [deep]
    m["provenance"] = {"note": deep}
    (pkg_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="nested deeper"):
        load_package(pkg_copy)


def test_pickle_renamed_safetensors_is_refused(pkg_copy: Path, forge: Forge) -> None:
    forge(pkg_copy, WEIGHTS_NAME, pickle.dumps({"backbone.x": [1, 2, 3]}, protocol=4))
    with pytest.raises(PackageError, match="is a Python pickle"):
        load_package(pkg_copy)


def test_zip_renamed_onnx_is_refused(pkg_copy: Path, forge: Forge, tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data.pkl", b"x")
    forge(pkg_copy, ONNX_NAME, archive.read_bytes())
    with pytest.raises(PackageError, match="pickle or zip archive"):
        load_package(pkg_copy)


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


def test_safetensors_with_nan_is_refused(pkg_copy: Path, forge: Forge) -> None:
    from safetensors.numpy import load

    tensors = load((pkg_copy / WEIGHTS_NAME).read_bytes())
    tensors["backbone.features.0.weight"][0, 0, 0, 0] = np.nan
    forge(pkg_copy, WEIGHTS_NAME, _safetensors(tensors))
    with pytest.raises(PackageError, match="'backbone.features.0.weight' contains NaN or Inf"):
        load_package(pkg_copy)


def test_safetensors_with_inf_bf16_is_refused(pkg_copy: Path, forge: Forge) -> None:
    tensors = {
        "head.weight": np.zeros((3, 128), np.float32),
        "head.bias": np.zeros(3, np.float32),
    }
    data = bytearray(_safetensors(tensors))
    # Rewrite as a bf16 payload holding +Inf (0x7F80) by hand: header + body.
    header = json.dumps(
        {
            "head.weight": {"dtype": "F32", "shape": [3, 128], "data_offsets": [0, 1536]},
            "head.bias": {"dtype": "BF16", "shape": [3], "data_offsets": [1536, 1542]},
        }
    ).encode()
    body = bytes(1536) + struct.pack("<3H", 0, 0x7F80, 0)
    data = bytearray(struct.pack("<Q", len(header)) + header + body)
    forge(pkg_copy, WEIGHTS_NAME, bytes(data))
    with pytest.raises(PackageError, match="'head.bias' contains NaN or Inf"):
        load_package(pkg_copy)


def test_safetensors_with_wrong_head_shape_is_refused(pkg_copy: Path, forge: Forge) -> None:
    from safetensors.numpy import load

    tensors = load((pkg_copy / WEIGHTS_NAME).read_bytes())
    tensors["head.weight"] = np.zeros((4, 128), np.float32)
    forge(pkg_copy, WEIGHTS_NAME, _safetensors(tensors))
    with pytest.raises(PackageError, match=r"'head.weight' has shape \[4, 128\]"):
        load_package(pkg_copy)


def test_safetensors_with_foreign_name_is_refused(pkg_copy: Path, forge: Forge) -> None:
    from safetensors.numpy import load

    tensors = load((pkg_copy / WEIGHTS_NAME).read_bytes())
    tensors["../../etc/passwd"] = np.zeros(1, np.float32)
    forge(pkg_copy, WEIGHTS_NAME, _safetensors(tensors))
    with pytest.raises(PackageError, match="named backbone.\\* or head.\\*"):
        load_package(pkg_copy)


def test_safetensors_names_and_shapes_checked_against_architecture(
    pkg_copy: Path, forge: Forge
) -> None:
    from safetensors.numpy import load

    from sourcefree.engine.models import load_classifier

    tensors = load((pkg_copy / WEIGHTS_NAME).read_bytes())
    renamed = dict(tensors)
    renamed["backbone.features.99.weight"] = renamed.pop("backbone.features.0.weight")
    pkg = load_package(pkg_copy)
    with pytest.raises(PackageError, match="does not match the architecture"):
        load_classifier(pkg.manifest.architecture, _safetensors(renamed))
    reshaped = dict(tensors)
    reshaped["backbone.features.0.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(
        PackageError, match="has shape \\[32, 3, 5, 5\\], expected \\[32, 3, 3, 3\\]"
    ):
        load_classifier(pkg.manifest.architecture, _safetensors(reshaped))
    retyped = dict(tensors)
    retyped["backbone.features.1.num_batches_tracked"] = np.zeros((), np.float32)
    with pytest.raises(PackageError, match="dtype torch.float32, expected torch.int64"):
        load_classifier(pkg.manifest.architecture, _safetensors(retyped))


def _onnx_model(pkg: Path):  # type: ignore[no-untyped-def]
    import onnx

    return onnx.load_model_from_string((pkg / ONNX_NAME).read_bytes())


@pytest.mark.parametrize(
    "location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "data.bin"]
)
def test_onnx_external_data_is_refused(pkg_copy: Path, forge: Forge, location: str) -> None:
    from onnx import TensorProto

    model = _onnx_model(pkg_copy)
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", location
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    with pytest.raises(PackageError, match="refers to external tensor data"):
        load_package(pkg_copy)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_linked_package_file_is_refused(
    pkg_copy: Path, forge: Forge, tmp_path: Path, kind: str
) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"private bytes outside the package")
    forge(pkg_copy, WEIGHTS_NAME, secret.read_bytes())  # a file the format defines
    (pkg_copy / WEIGHTS_NAME).unlink()
    if kind == "symlink":
        os.symlink(secret, pkg_copy / WEIGHTS_NAME)
        match = f"'{WEIGHTS_NAME}' is a symbolic link"
    else:
        os.link(secret, pkg_copy / WEIGHTS_NAME)
        match = f"'{WEIGHTS_NAME}' has 2 hard links"
    with pytest.raises(PackageError, match=match):
        load_package(pkg_copy)


def test_symlinked_package_directory_is_refused(source_pkg: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    os.symlink(source_pkg, link)
    with pytest.raises(PackageError, match="not a package directory"):
        load_package(link)


def test_onnx_custom_domain_is_refused(pkg_copy: Path, forge: Forge) -> None:
    model = _onnx_model(pkg_copy)
    model.graph.node[0].domain = "com.evil"
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    with pytest.raises(PackageError, match="custom domain 'com.evil'"):
        load_package(pkg_copy)


def test_onnx_custom_opset_import_is_refused(pkg_copy: Path, forge: Forge) -> None:
    model = _onnx_model(pkg_copy)
    extra = model.opset_import.add()
    extra.domain, extra.version = "ai.onnx.ml", 3
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    with pytest.raises(PackageError, match="custom op domain 'ai.onnx.ml'"):
        load_package(pkg_copy)


def test_onnx_op_outside_allowlist_is_refused(pkg_copy: Path, forge: Forge) -> None:
    from onnx import helper

    model = _onnx_model(pkg_copy)
    model.graph.node.append(helper.make_node("ConstantOfShape", ["shape_in"], ["big"]))
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    with pytest.raises(PackageError, match="'ConstantOfShape', which is not on the allowlist"):
        load_package(pkg_copy)


def test_onnx_with_foreign_metadata_is_refused(pkg_copy: Path, forge: Forge) -> None:
    model = _onnx_model(pkg_copy)
    entry = model.metadata_props.add()
    entry.key, entry.value = "dataset_path", "/home/alice/faces"
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    with pytest.raises(PackageError, match="unexpected metadata key 'dataset_path'"):
        load_package(pkg_copy)


def test_onnx_wrong_ir_version_is_refused(pkg_copy: Path, forge: Forge) -> None:
    model = _onnx_model(pkg_copy)
    model.ir_version = 14
    forge(pkg_copy, ONNX_NAME, model.SerializeToString())
    with pytest.raises(PackageError, match="IR version 14"):
        load_package(pkg_copy)


def test_garbage_onnx_is_refused(pkg_copy: Path, forge: Forge) -> None:
    forge(pkg_copy, ONNX_NAME, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
    with pytest.raises(PackageError, match="not a valid ONNX model"):
        load_package(pkg_copy)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="does not exist"):
        load_package(tmp_path / "nope")


def test_directory_without_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="has no manifest.json"):
        load_package(tmp_path)


def test_signature_required_but_absent(source_pkg: Path) -> None:
    with pytest.raises(SignatureError, match="is not signed"):
        load_package(source_pkg, require_signature=True)
