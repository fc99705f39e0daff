"""``sourcefree audit``: a clean package audits clean; each kind of private string is flagged."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from click.testing import CliRunner
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sourcefree.cli.app import main
from sourcefree.package.audit import EXIT_FINDINGS, MAX_FREE_TEXT, AuditReport, audit_package
from sourcefree.package.manifest import ONNX_MANIFEST_KEY, ONNX_NAME, WEIGHTS_NAME

Forge = Callable[[Path, str, bytes], None]
HOME = "/home/alice"


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed auditing user, so findings do not depend on the machine."""
    monkeypatch.setenv("HOME", HOME)


def _kinds(report: AuditReport) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        out.setdefault(f.kind, set()).add(f.where)
    return out


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)
    return result.exit_code, result.output


def _edit_onnx(pkg: Path, edit: Callable[[Any], None], forge: Forge) -> None:
    model = onnx.load_from_string((pkg / ONNX_NAME).read_bytes())
    edit(model)
    forge(pkg, ONNX_NAME, model.SerializeToString())


def _set_provenance(pkg: Path, key: str, value: object, forge: Forge) -> None:
    """Change provenance consistently: manifest.json, the ONNX copy and the file hash."""

    def edit(model: Any) -> None:
        for prop in model.metadata_props:
            if prop.key == ONNX_MANIFEST_KEY:
                embedded = json.loads(prop.value)
                embedded["provenance"][key] = value
                prop.value = json.dumps(embedded)

    _edit_onnx(pkg, edit, forge)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["provenance"][key] = value
    (pkg / "manifest.json").write_text(json.dumps(manifest))


def test_clean_package_audits_clean(source_pkg: Path) -> None:
    report = audit_package(source_pkg)
    assert report.clean and report.verified, report.findings
    assert [r["name"] for r in report.files] == [ONNX_NAME, WEIGHTS_NAME]
    assert all(r["status"] == "listed" and len(r["sha256"]) == 16 for r in report.files)
    assert report.manifest["provenance_keys"] == ["created_utc", "sdk_version", "torch_version"]
    assert report.onnx is not None and report.onnx["nodes"] > 0
    assert report.onnx["metadata_keys"] == [ONNX_MANIFEST_KEY]
    assert report.safetensors is not None
    assert report.safetensors["by_prefix"]["head"] == 2
    assert report.safetensors["shapes"]["head.weight"] == [3, 128]
    code, out = _cli(str(source_pkg))
    assert code == 0 and "nothing in this package looks private" in out
    assert "model.safetensors" in out and "Conv x" in out
    code, out = _cli(str(source_pkg), "--json")
    assert code == 0 and json.loads(out)["clean"] is True


def test_path_in_provenance_is_flagged(pkg_copy: Path, forge: Forge) -> None:
    _set_provenance(pkg_copy, "note", "exported from data/studio-faces", forge)
    report = audit_package(pkg_copy)
    assert report.verified, "a consistent package that verifies can still leak"
    assert _kinds(report) == {"path": {"manifest.json provenance.note"}}
    assert "'exported from data/studio-faces'" in report.findings[0].detail
    code, out = _cli(str(pkg_copy))
    assert code == EXIT_FINDINGS == 3
    assert "provenance.note" in out and "looks like a file-system path" in out


def test_home_directory_and_user_name_are_flagged(pkg_copy: Path, forge: Forge) -> None:
    _set_provenance(pkg_copy, "config", {"cache": f"{HOME}/cache", "by": "Alice"}, forge)
    kinds = _kinds(audit_package(pkg_copy))
    assert kinds == {
        "home-directory": {"manifest.json provenance.config.cache"},
        "user-name": {"manifest.json provenance.config.by"},
    }


def test_long_free_text_is_flagged(pkg_copy: Path, forge: Forge) -> None:
    note = "a long story " * 17  # within the schema's 256 characters
    _set_provenance(pkg_copy, "note", note, forge)
    report = audit_package(pkg_copy)
    assert report.verified and len(note) > MAX_FREE_TEXT
    assert _kinds(report) == {"free-text": {"manifest.json provenance.note"}}
    assert "221 characters of free text" in report.findings[0].detail


def test_field_outside_the_schema_is_flagged_without_crashing(pkg_copy: Path) -> None:
    manifest = json.loads((pkg_copy / "manifest.json").read_text())
    manifest["description"] = "photos in /Users/bob/Pictures/faces"
    (pkg_copy / "manifest.json").write_text(json.dumps(manifest))
    report = audit_package(pkg_copy)
    assert not report.verified
    kinds = _kinds(report)
    assert kinds["unverified"] == {"package"}
    assert "'description' is invalid. Unknown field" in report.findings[0].detail
    assert kinds["unknown-field"] == {"manifest.json description"}
    assert kinds["path"] == {"manifest.json description"}
    assert report.manifest["fields"][:2] == ["architecture", "description"]
    assert _cli(str(pkg_copy))[0] == EXIT_FINDINGS


def test_file_names_in_onnx_doc_string_and_node_name_are_flagged(
    pkg_copy: Path, forge: Forge
) -> None:
    def edit(model: Any) -> None:
        model.graph.node[0].doc_string = "traced on img_0001.jpg"
        model.graph.node[1].name = "/home/carol/train.py:42"

    _edit_onnx(pkg_copy, edit, forge)
    report = audit_package(pkg_copy)
    assert report.verified
    kinds = _kinds(report)
    assert kinds["doc-string"] == {ONNX_NAME}
    assert kinds["file-name"] == {"model.onnx node doc string", "model.onnx node name"}
    detail = " ".join(f.detail for f in report.findings)
    assert "names an image file" in detail and "names a code or data file" in detail


def test_onnx_metadata_is_flagged(pkg_copy: Path, forge: Forge) -> None:
    def edit(model: Any) -> None:
        entry = model.metadata_props.add()
        entry.key = "author"
        entry.value = "C:\\Users\\dave\\faces"

    _edit_onnx(pkg_copy, edit, forge)
    report = audit_package(pkg_copy)
    assert not report.verified, "the package check refuses foreign metadata"
    kinds = _kinds(report)
    assert kinds["onnx-metadata"] == {"model.onnx metadata 'author'"}
    assert kinds["path"] == {"model.onnx metadata 'author'"}
    assert report.onnx is not None and report.onnx["metadata_keys"] == ["author", ONNX_MANIFEST_KEY]


def test_safetensors_metadata_is_flagged(pkg_copy: Path, forge: Forge) -> None:
    tensors = load_safetensors((pkg_copy / WEIGHTS_NAME).read_bytes())
    data = save_safetensors(tensors, metadata={"format": "pt", "dataset": "faces/train"})
    forge(pkg_copy, WEIGHTS_NAME, data)
    report = audit_package(pkg_copy)
    assert report.verified
    where = "model.safetensors __metadata__ 'dataset'"
    assert _kinds(report) == {"safetensors-metadata": {where}, "path": {where}}


def test_extra_files_are_flagged(pkg_copy: Path) -> None:
    (pkg_copy / "notes.txt").write_text("hello")
    (pkg_copy / "face_0001.jpg").write_bytes(b"\xff\xd8\xff")
    report = audit_package(pkg_copy)
    assert not report.verified
    kinds = _kinds(report)
    assert kinds["extra-file"] == {"notes.txt", "face_0001.jpg"}
    assert kinds["file-name"] == {"file name 'face_0001.jpg'"}
    rows = {r["name"]: r for r in report.files}
    assert rows["notes.txt"]["status"] == "NOT LISTED"
    assert rows["notes.txt"]["sha256"] == hashlib.sha256(b"hello").hexdigest()[:16]
    assert report.onnx is not None, "the rest of the package is still audited"


def test_tampered_package_is_audited_not_refused(pkg_copy: Path) -> None:
    data = bytearray((pkg_copy / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 1
    (pkg_copy / WEIGHTS_NAME).write_bytes(bytes(data))
    report = audit_package(pkg_copy)
    assert _kinds(report) == {"unverified": {"package"}}
    assert "does not match its sha256" in report.findings[0].detail
    rows = {r["name"]: r for r in report.files}
    assert rows[WEIGHTS_NAME]["status"] == "listed, DIFFERS"
    assert report.safetensors is not None and report.onnx is not None


def test_not_a_directory_is_an_error(tmp_path: Path) -> None:
    code, out = _cli(str(tmp_path / "nothing"))
    assert code == 2 and "does not exist" in out


def test_audit_never_imports_torch(source_pkg: Path) -> None:
    code = f"""
        import sys
        from sourcefree.package.audit import audit_package
        report = audit_package({str(source_pkg)!r})
        assert report.clean
        assert "torch" not in sys.modules, "audit pulled in torch"
        print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
