"""The layer map of docs/engine.md, checked on the code: import cycles, layer edges, no network.

Every module of ``sdk/``, ``adapters/`` and ``export/`` is parsed (never imported). A
module-level import is one executed when the module loads: top-level statements and
those inside top-level ``if``/``try`` blocks, except ``if TYPE_CHECKING:``. Imports
inside functions are lazy and are not edges of the module graph.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = {"sdk": "sourcefree", "adapters": "sourcefree.adapters", "export": "sourcefree.export"}

#: What each layer may import, lazily or not (besides itself and the shared modules). The
#: same map is drawn in docs/engine.md; the layer graph itself has no cycle.
SHARED = {"sourcefree", "sourcefree._version", "sourcefree.errors", "sourcefree.fsutil"}
LOW = {"package", "data"}
LAYERS: dict[str, set[str]] = {
    "package": set(),
    "data": {"package"},
    "runtime": {"package", "data"},
    "engine": LOW,
    "kernels": {"engine"},
    "ops": LOW | {"engine", "kernels"},
    "adapters": LOW | {"engine", "kernels", "ops", "runtime"},
    "export": LOW | {"engine", "runtime"},
    "vendor": LOW | {"engine", "ops"},
    "pipeline": LOW | {"engine", "kernels", "ops", "runtime", "adapters", "export", "vendor"},
    "cli": LOW
    | {"engine", "kernels", "ops", "runtime", "adapters", "export", "vendor", "pipeline"},
    "__main__": {"cli"},
}
#: Layers that never import torch, even lazily: an application serves packages without it.
TORCH_FREE = {"package", "runtime"}
NETWORK = {
    "socket",
    "urllib",
    "http",
    "requests",
    "httpx",
    "aiohttp",
    "urllib3",
    "ftplib",
    "smtplib",
    "huggingface_hub",
    "hf_xet",
    "torch.hub",
    "timm.models.hub",
    "websocket",
}


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for tree, prefix in TREES.items():
        for path in sorted((ROOT / tree).rglob("*.py")):
            parts = list(path.relative_to(ROOT / tree).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _module_level(block)


def _targets(node: ast.Import | ast.ImportFrom, known: set[str]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
        return
    base = node.module or ""
    for alias in node.names:
        full = f"{base}.{alias.name}"
        yield full if full in known else base


def edges(every_level: bool = False) -> dict[str, set[str]]:
    known = set(modules())
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = (
            [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
            if every_level
            else list(_module_level(tree.body))
        )
        graph[name] = {t for n in nodes for t in _targets(n, known)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> str | None:
    if module in SHARED:
        return None
    parts = module.split(".")
    if parts[0] != "sourcefree" or len(parts) < 2:
        return None
    return parts[1]


def test_no_module_level_import_cycles() -> None:
    assert cycles(edges()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_layer_map_has_no_cycle() -> None:
    assert cycles({k: set(v) for k, v in LAYERS.items()}) == []


def test_layers_import_only_what_the_map_allows() -> None:
    bad = []
    for src, targets in edges(every_level=True).items():
        here = layer(src)
        for dst in targets:
            there = layer(dst)
            if here is None or there is None or there == here or not dst.startswith("sourcefree"):
                continue
            if there not in LAYERS.get(here, set()):
                bad.append(f"{src} -> {dst}")
    assert bad == []


@pytest.mark.parametrize("name", sorted(TORCH_FREE))
def test_torch_free_layers_never_import_torch(name: str) -> None:
    bad = [
        f"{src} -> {dst}"
        for src, targets in edges(every_level=True).items()
        if layer(src) == name
        for dst in targets
        if dst.split(".")[0] in {"torch", "torchvision", "timm", "lightly", "triton"}
    ]
    assert bad == []


def test_no_module_imports_a_network_client() -> None:
    """The privacy claim on the code: nothing can open a connection or reach a model hub."""
    bad = [
        f"{src} -> {dst}"
        for src, targets in edges(every_level=True).items()
        for dst in targets
        if any(dst == n or dst.startswith(n + ".") for n in NETWORK)
    ]
    assert bad == []


def test_at_most_twelve_modules_directly_in_sdk() -> None:
    assert len(list((ROOT / "sdk").glob("*.py"))) <= 12
