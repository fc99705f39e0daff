"""Privacy scan of a package (``sourcefree audit``): what it holds, what looks private.

The audit lists every file (size, sha256 prefix, listed or not), the manifest
fields and provenance keys, a summary of the ONNX graph, of any auxiliary graph
(an action-unit detector, listed in the manifest like the model files) and of the
safetensors weights, and flags strings that look private:

- file-system paths: any ``/`` or ``\\`` between characters in free strings
  (manifest values, metadata, doc strings); in graph and tensor names only
  strong signs (absolute paths under a home or data root, drive letters);
- file names of images (``.jpg``, ``.png``, ...) and of code or data files
  (``.py``, ``.ipynb``, ``.csv``);
- the auditing user's home directory and user name (from ``$HOME``);
- free text longer than :data:`MAX_FREE_TEXT` characters;
- files the manifest does not list, manifest fields outside the schema,
  ONNX metadata other than the embedded manifest (none at all in an auxiliary
  graph) or repeated keys, doc strings, node metadata, sparse tensors,
  and safetensors ``__metadata__`` other than ``format=pt``.

A package that fails verification is still audited (whatever can be read is
read, never executed) and the failure is the first finding. No torch import.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sourcefree.errors import SourcefreeError
from sourcefree.fsutil import IMAGE_SUFFIXES
from sourcefree.package import strictjson
from sourcefree.package.inspect import size_text
from sourcefree.package.loader import (
    Package,
    _list_dir,
    _open_regular,
    load_package,
    resolve_package_dir,
)
from sourcefree.package.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    ONNX_MANIFEST_KEY,
    ONNX_NAME,
    PROVENANCE_KEYS,
    SIGNATURE_NAME,
    TOP_LEVEL,
    WEIGHTS_NAME,
    Manifest,
)
from sourcefree.package.onnx_check import GraphSummary, summarize, summarize_auxiliary
from sourcefree.package.weights import TensorInfo, read_header_with_metadata

#: Exit code of ``sourcefree audit`` when it has findings (0: clean, 2: not auditable).
EXIT_FINDINGS = 3
#: Strings longer than this many characters are reported as free text.
MAX_FREE_TEXT = 200
#: Largest file the audit reads (bigger files are listed by size only).
MAX_READ_BYTES = 4 << 30
#: safetensors metadata every exporter writes; anything else is a finding.
EXPECTED_WEIGHTS_METADATA = {"format": "pt"}

_IMAGE_RE = re.compile(
    r"[^\s/\\]\.(?:" + "|".join(sorted(s[1:] for s in IMAGE_SUFFIXES)) + r")(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_CODE_RE = re.compile(r"[^\s/\\]\.(?:py|pyc|ipynb|csv)(?![A-Za-z0-9])", re.IGNORECASE)
_ROOT_RE = re.compile(
    r"(?:^|[^A-Za-z0-9_.])(?:/(?:home|Users|root|tmp|mnt|media|Volumes|data|srv|opt|var|"
    r"private|workspace|content)/|[A-Za-z]:[\\/]|\\\\[A-Za-z0-9]|~[/\\])",
    re.IGNORECASE,
)
#: Graph strings that are names: only strong signs of a path count there.
_NAME_TEXTS = frozenset(
    {"producer name", "graph name", "node name", "value name", "tensor name", "attribute name"}
    | {"dim param", "opset domain"}
)
_SEPARATOR_RE = re.compile(r"(?:^|[\s\"'(=:,])(?:~|\.{1,2})?[/\\](?=\S)|[^\s/\\][/\\][^\s/\\]")


@dataclass(frozen=True)
class Finding:
    """One thing that looks private, or breaks the package's rules."""

    where: str
    """File and location, e.g. ``manifest.json provenance.note``."""
    kind: str
    """``unverified``, ``unreadable``, ``extra-file``, ``unknown-field``, ``home-directory``,
    ``user-name``, ``file-name``, ``path``, ``free-text``, ``onnx-metadata``, ``doc-string``,
    ``node-metadata``, ``sparse-tensor`` or ``safetensors-metadata``."""
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "kind": self.kind, "detail": self.detail}


@dataclass
class AuditReport:
    """What :func:`audit_package` found."""

    verified: bool
    sha256: str | None
    """sha256 of manifest.json (the package identity), when it could be read."""
    files: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] | None = None
    safetensors: dict[str, Any] | None = None
    auxiliary: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Graph summaries of auxiliary models by file name (an action-unit detector)."""
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No finding at all."""
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "verified": self.verified,
            "sha256": self.sha256,
            "files": self.files,
            "manifest": self.manifest,
            "onnx": self.onnx,
            "safetensors": self.safetensors,
            "auxiliary": self.auxiliary,
            "max_free_text": MAX_FREE_TEXT,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class _Scanner:
    """Decides whether a string looks private, for one auditing user."""

    home: str
    user: str

    @classmethod
    def from_env(cls, home: str | None = None) -> _Scanner:
        home = os.environ.get("HOME", "") if home is None else home
        home = home.rstrip("/\\")
        user = re.split(r"[/\\]", home)[-1] if home else ""
        return cls(home=home if len(home) > 1 else "", user=user if len(user) >= 3 else "")

    def reasons(self, text: str, *, free: bool) -> list[tuple[str, str]]:
        """(kind, why) pairs, most telling first; ``free``: any separator counts as a path."""
        out: list[tuple[str, str]] = []
        if self.home and self.home in text:
            out.append(("home-directory", "contains your home directory"))
        if self.user and re.search(
            rf"(?<![A-Za-z0-9]){re.escape(self.user)}(?![A-Za-z0-9])", text, re.IGNORECASE
        ):
            out.append(("user-name", f"contains your user name {self.user!r}"))
        if _IMAGE_RE.search(text):
            out.append(("file-name", "names an image file"))
        elif _CODE_RE.search(text):
            out.append(("file-name", "names a code or data file"))
        if _ROOT_RE.search(text) or (free and _SEPARATOR_RE.search(text)):
            out.append(("path", "looks like a file-system path"))
        if free and len(text) > MAX_FREE_TEXT:
            out.append(("free-text", f"{len(text)} characters of free text"))
        return out

    def check(self, text: str, where: str, *, free: bool = True) -> Finding | None:
        found = self.reasons(text, free=free)
        if not found:
            return None
        why = "; ".join(w for _, w in found)
        return Finding(where, found[0][0], f"{why}: {_excerpt(text)}")


def _excerpt(text: str, limit: int = 60) -> str:
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(json path, string) for every string key and value of a parsed JSON value."""
    if isinstance(value, str):
        yield path or "<root>", value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            yield f"{sub} (key)", str(k)
            yield from _walk(v, sub)


def _manifest_summary(raw: dict[str, Any], manifest: Manifest | None) -> dict[str, Any]:
    if manifest is None:
        return {"fields": sorted(str(k) for k in raw)}
    m = manifest
    out: dict[str, Any] = {
        "fields": sorted(str(k) for k in raw),
        "kind": m.kind,
        "name": m.name,
        "version": m.version,
        "labels": list(m.labels),
        "input": f"{m.input.size[0]}x{m.input.size[1]}, {m.input.channels} channel(s), "
        f"{m.input.color}, {m.input.interpolation}"
        + (f", faces: {m.input.faces.describe()}" if m.input.faces.active else ""),
        "architecture": f"{m.architecture.name} ({m.architecture.num_classes} classes, "
        f"feature_dim {m.architecture.feature_dim})",
        "onnx": f"opset {m.onnx.opset}, IR {m.onnx.ir_version}, {m.onnx.precision}",
        "provenance_keys": sorted(m.provenance),
    }
    if m.source_stats is not None:
        out["source_stats_keys"] = sorted(m.source_stats.to_dict())
    if m.auxiliary is not None and m.auxiliary.au_detector is not None:
        det = m.auxiliary.au_detector
        out["au_detector"] = (
            f"{det.file}: {len(det.au_names)} action units, threshold {det.threshold:g}"
        )
    return out


def _graph_summary(g: GraphSummary) -> dict[str, Any]:
    return {
        "ir_version": g.ir_version,
        "opsets": {k or "ai.onnx": v for k, v in sorted(g.opsets.items())},
        "nodes": sum(g.ops.values()),
        "ops": dict(sorted(g.ops.items())),
        "inputs": g.inputs,
        "outputs": g.outputs,
        "metadata_keys": sorted(g.metadata),
        "doc_strings": g.doc_strings,
        "node_metadata": g.node_metadata,
        "producer": g.producer,
        "sparse_tensors": g.sparse_tensors,
        "elements": g.elements,
    }


def _weights_summary(infos: dict[str, TensorInfo], meta: dict[str, str]) -> dict[str, Any]:
    params = 0
    dtypes: dict[str, int] = {}
    prefixes: dict[str, int] = {}
    for t in infos.values():
        count = 1
        for d in t.shape:
            count *= d
        params += count
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
        prefix = t.name.split(".", 1)[0]
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
    return {
        "tensors": len(infos),
        "parameters": params,
        "dtypes": dict(sorted(dtypes.items())),
        "by_prefix": dict(sorted(prefixes.items())),
        "metadata_keys": sorted(meta),
        "shapes": {name: list(t.shape) for name, t in sorted(infos.items())},
    }


class _Audit:
    """One audit run: reads what it can, collects findings."""

    def __init__(self, root: Path, scanner: _Scanner) -> None:
        self.root = root
        self.scan = scanner
        self.findings: list[Finding] = []

    def flag(self, where: str, kind: str, detail: str) -> None:
        self.findings.append(Finding(where, kind, detail))

    def text(self, text: str, where: str, *, free: bool = True) -> None:
        found = self.scan.check(text, where, free=free)
        if found is not None:
            self.findings.append(found)

    def read(self, name: str, limit: int) -> bytes | None:
        try:
            return _open_regular(self.root, name, limit)
        except SourcefreeError as exc:
            self.flag(name, "unreadable", str(exc))
        except OSError as exc:
            self.flag(name, "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")
        return None

    def run(self) -> AuditReport:
        entries = _list_dir(self.root)  # not a directory: nothing to audit (PackageError)
        pkg: Package | None = None
        try:
            pkg = load_package(self.root)
        except SourcefreeError as exc:
            self.flag("package", "unverified", f"the package does not verify: {exc}")
        report = AuditReport(verified=pkg is not None, sha256=pkg.sha256 if pkg else None)

        raw, manifest = self.manifest(pkg, entries, report)
        listed = dict(manifest.files) if manifest is not None else {}
        expected = set(listed) if manifest is not None else {ONNX_NAME, WEIGHTS_NAME}
        blobs: dict[str, bytes] = dict(pkg.blobs) if pkg is not None else {}
        for name in sorted(entries - {MANIFEST_NAME}):
            report.files.append(self.file(name, expected, listed, blobs))

        if raw is not None:
            self.manifest_strings(raw)
            report.manifest = _manifest_summary(raw, manifest)
        if ONNX_NAME in blobs:
            report.onnx = self.graph(ONNX_NAME, blobs[ONNX_NAME], raw, auxiliary=False)
        if WEIGHTS_NAME in blobs:
            report.safetensors = self.weights(blobs[WEIGHTS_NAME])
        aux = manifest.auxiliary if manifest is not None else None
        for name in aux.files() if aux is not None else ():
            if name in blobs:
                summary = self.graph(name, blobs[name], None, auxiliary=True)
                if summary is not None:
                    report.auxiliary[name] = summary
        report.findings = self.findings
        return report

    def manifest(
        self, pkg: Package | None, entries: set[str], report: AuditReport
    ) -> tuple[dict[str, Any] | None, Manifest | None]:
        if pkg is not None:
            raw = strictjson.loads(
                pkg.manifest_bytes, what=MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES
            )
            return raw, pkg.manifest
        if MANIFEST_NAME not in entries:
            return None, None
        data = self.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        if data is None:
            return None, None
        report.sha256 = hashlib.sha256(data).hexdigest()
        try:
            raw = strictjson.loads(data, what=MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
        except SourcefreeError:
            return None, None  # the verification finding says why
        if not isinstance(raw, dict):
            return None, None
        try:
            return raw, Manifest.from_dict(raw)
        except SourcefreeError:
            return raw, None

    def file(
        self, name: str, expected: set[str], listed: dict[str, Any], blobs: dict[str, bytes]
    ) -> dict[str, Any]:
        if name in listed:
            status = "listed"
        elif name == SIGNATURE_NAME:
            status = "signature"
        elif name in expected:
            status = "unverified"
        else:
            status = "NOT LISTED"
            self.flag(
                name,
                "extra-file",
                "the manifest does not list this entry; packages hold listed files only",
            )
            self.text(name, f"file name {name!r}", free=False)
        data = blobs.get(name)
        if data is None:
            data = self.read(name, MAX_READ_BYTES)
            if data is not None and name in expected:
                blobs[name] = data
        row: dict[str, Any] = {"name": name, "status": status}
        if data is not None:
            digest = hashlib.sha256(data).hexdigest()
            row.update(size=len(data), sha256=digest[:16])
            entry = listed.get(name)
            if entry is not None and (entry.size != len(data) or entry.sha256 != digest):
                row["status"] = "listed, DIFFERS"
        return row

    def manifest_strings(self, raw: dict[str, Any]) -> None:
        for key in sorted(set(raw) - TOP_LEVEL):
            self.flag(f"{MANIFEST_NAME} {key}", "unknown-field", "not a field of the schema")
        prov = raw.get("provenance")
        if isinstance(prov, dict):
            for key in sorted(set(prov) - PROVENANCE_KEYS):
                self.flag(
                    f"{MANIFEST_NAME} provenance.{key}",
                    "unknown-field",
                    "not an allowlisted provenance key",
                )
        for path, text in _walk(raw):
            self.text(text, f"{MANIFEST_NAME} {path}")

    def graph(
        self, name: str, data: bytes, raw: dict[str, Any] | None, *, auxiliary: bool
    ) -> dict[str, Any] | None:
        """Check one ONNX graph and summarise it (None when it cannot be read).

        The model graph may carry the embedded manifest (compared with ``raw``) and no
        other metadata; an auxiliary graph carries no metadata at all. Every graph then
        gets the flags and string scan of :meth:`graph_strings`.
        """
        try:
            graph = summarize_auxiliary(data, name) if auxiliary else summarize(data)
        except SourcefreeError as exc:
            self.flag(name, "unreadable", str(exc))
            return None
        for key, value in sorted(graph.metadata.items()):
            where = f"{name} metadata {key!r}"
            if not auxiliary and key == ONNX_MANIFEST_KEY:
                self.embedded(value, raw, where)
                continue
            why = (
                "an auxiliary graph carries no metadata"
                if auxiliary
                else "only the embedded manifest belongs here"
            )
            self.flag(where, "onnx-metadata", why)
            self.text(key, where + " (key)")
            self.text(value, where)
        self.graph_strings(name, graph)
        return _graph_summary(graph)

    def graph_strings(self, name: str, graph: GraphSummary) -> None:
        """Flags shared by every graph, and a scan of every string it carries."""
        for key in graph.duplicate_metadata:
            self.flag(
                f"{name} metadata {_excerpt(key)}",
                "onnx-metadata",
                "the key appears more than once; readers keep only one of the values",
            )
        if graph.doc_strings:
            self.flag(name, "doc-string", f"{graph.doc_strings} doc string(s) in the graph")
        if graph.node_metadata:
            self.flag(name, "node-metadata", f"{graph.node_metadata} metadata entries")
        if graph.sparse_tensors:
            self.flag(
                name, "sparse-tensor", f"{graph.sparse_tensors} sparse tensor(s): never exported"
            )
        for where, text in graph.texts:
            self.text(text, f"{name} {where}", free=where not in _NAME_TEXTS)

    def embedded(self, value: str, raw: dict[str, Any] | None, where: str) -> None:
        try:
            parsed = strictjson.loads(value.encode(), what=where, max_bytes=MAX_MANIFEST_BYTES)
        except SourcefreeError as exc:
            self.flag(where, "unreadable", str(exc))
            return
        if raw is not None and parsed == {k: v for k, v in raw.items() if k != "files"}:
            return  # identical to manifest.json, already scanned
        for path, text in _walk(parsed):
            self.text(text, f"{where} {path}")

    def weights(self, data: bytes) -> dict[str, Any] | None:
        try:
            infos, meta = read_header_with_metadata(data)
        except SourcefreeError as exc:
            self.flag(WEIGHTS_NAME, "unreadable", str(exc))
            return None
        for key, value in sorted(meta.items()):
            if EXPECTED_WEIGHTS_METADATA.get(key) != value:
                where = f"{WEIGHTS_NAME} __metadata__ {key!r}"
                self.flag(where, "safetensors-metadata", f"unexpected entry: {_excerpt(value)}")
                self.text(key, where + " (key)")
                self.text(value, where)
        for name in infos:
            self.text(name, f"{WEIGHTS_NAME} tensor name", free=False)
        return _weights_summary(infos, meta)


def audit_package(path: str | os.PathLike[str], *, home: str | None = None) -> AuditReport:
    """List what a package holds and flag what looks private.

    Args:
        path: the package directory (verified or not), or an adapt output folder
            (its package/ is audited: :func:`~sourcefree.package.loader.resolve_package_dir`).
        home: home directory whose path and user name count as private
            (default: ``$HOME``).

    Raises:
        PackageError: ``path`` is not a directory (nothing to audit).

    Examples:
        >>> from sourcefree.package.audit import audit_package, format_report
        >>> report = audit_package("adapted/package")
        >>> report.clean, [(f.kind, f.where) for f in report.findings]
        >>> print(format_report(report))  # what `sourcefree audit` prints
    """
    return _Audit(resolve_package_dir(path), _Scanner.from_env(home)).run()


def _graph_lines(title: str, g: dict[str, Any], row: tuple[str, str]) -> list[str]:
    """The report's block for one graph summary: title, graph line, ``row``, metadata, docs."""
    label, text = row
    opsets = ", ".join(f"{k} {v}" for k, v in g["opsets"].items())
    return [
        "",
        title,
        f"  {'graph':<18} IR {g['ir_version']}, opsets {opsets}, {g['nodes']} nodes, "
        f"producer {g['producer']!r}",
        f"  {label:<18} {text}",
        f"  {'metadata keys':<18} {', '.join(g['metadata_keys']) or '-'}",
        f"  {'doc strings':<18} {g['doc_strings']}",
    ]


def format_report(report: AuditReport) -> str:
    """A readable report: package, files, manifest, graph, weights, findings."""
    lines: list[str] = []
    m = report.manifest
    if "name" in m:
        lines.append(f"package    {m['name']} {m['version']} ({m['kind']})")
    if report.sha256:
        lines.append(f"sha256     {report.sha256}")
    lines.append(f"verified   {'yes' if report.verified else 'NO (see findings)'}")
    lines += ["", "files"]
    width = max([4, *(len(row["name"]) for row in report.files)])
    lines.append(f"  {'name':<{width}}  {'size':>10}  {'sha256':<16}  status")
    for f in report.files:
        size = size_text(f["size"]) if "size" in f else "?"
        lines.append(
            f"  {f['name']:<{width}}  {size:>10}  {f.get('sha256', '?'):<16}  {f['status']}"
        )
    if m:
        lines += ["", "manifest"]
        for key, value in m.items():
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            lines.append(f"  {key:<18} {text}")
    if report.onnx is not None:
        g = report.onnx
        ops = ", ".join(f"{k} x{v}" for k, v in g["ops"].items())
        lines += _graph_lines("onnx", g, ("ops", ops))
        lines.append(f"  {'node metadata':<18} {g['node_metadata']}")
    for fname, g in report.auxiliary.items():
        outputs = ", ".join(f"{k} {v}" for k, v in g["outputs"].items())
        lines += _graph_lines(f"auxiliary graph {fname}", g, ("outputs", outputs))
    if report.safetensors is not None:
        w = report.safetensors
        lines += [
            "",
            "safetensors",
            f"  {'tensors':<18} {w['tensors']} ("
            + ", ".join(f"{k} {v}" for k, v in w["by_prefix"].items())
            + f"), {w['parameters']:,} parameters",
            f"  {'dtypes':<18} " + ", ".join(f"{k} x{v}" for k, v in w["dtypes"].items()),
            f"  {'metadata keys':<18} {', '.join(w['metadata_keys']) or '-'}",
        ]
    lines.append("")
    if report.clean:
        lines.append("findings   none: nothing in this package looks private")
        return "\n".join(lines)
    lines.append(f"findings   {len(report.findings)}")
    where_w = min(48, max(len(x.where) for x in report.findings))
    kind_w = max(len(x.kind) for x in report.findings)
    for item in report.findings:
        lines.append(f"  {item.where:<{where_w}}  {item.kind:<{kind_w}}  {item.detail}")
    return "\n".join(lines)
