"""The docs cite only what exists: test names, module paths, repository files, the layer map.

Every ``docs/*.md`` and ``README.md`` is read as text. Cited are:

- tests: ``tests/x.py::test_y`` (the file defines ``test_y``), a bare ``test_y`` in
  backticks (defined in some file under ``tests/``), and ``tests/...py`` paths;
- modules: ``sourcefree.a.b`` or ``sourcefree.a.b.name``, resolved by importing the
  longest importable prefix and reading the rest as attributes;
- repository paths under ``sdk/``, ``adapters/``, ``export/``, ``benchmarks/``,
  ``tests/``, ``examples/`` and ``docs/``, and relative Markdown links.

The method references are checked too (point 3 of issue 17): docs/methods.md and every
``adapters/*.py`` module docstring cite papers by arXiv id or DOI, never by a folder of
this repository. docs/engine.md's "Layers" table is ``LAYERS`` of tests/test_layers.py.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
#: Strings shaped like a module path that name something else.
NOT_MODULES = {
    # the ONNX metadata key that carries the manifest (docs/package-format.md)
    "sourcefree.manifest",
}
TOP = ("sdk", "adapters", "export", "benchmarks", "tests", "examples", "docs")

_TEST_FILE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*test_\w+\.py)((?:::[A-Za-z_]\w*)*)")
_BARE_TEST = re.compile(r"`(test_\w+)(?:\[[^\]`]*\])?`")
_MODULE = re.compile(r"(?<![\w.-])sourcefree(?:\.[A-Za-z_]\w*)+")
_PATH = re.compile(rf"(?<![\w/.<>-])((?:{'|'.join(TOP)})/[\w./-]*)")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
#: How a paper is cited: an arXiv id or a DOI.
_STABLE_REF = re.compile(r"arxiv(?:[ :]|\.org/abs/)\d{4}\.\d{4,5}|\b10\.\d{4,9}/\S+", re.IGNORECASE)
_REPO_FOLDER_REF = re.compile(r"papers/|shared/papers")


def _defined_names(path: Path) -> set[str]:
    """Names of every function and class defined anywhere in a Python file."""
    tree = ast.parse(path.read_text(), str(path))
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {n.name for n in ast.walk(tree) if isinstance(n, kinds)}


@cache
def _all_test_names() -> frozenset[str]:
    return frozenset(n for p in (ROOT / "tests").rglob("*.py") for n in _defined_names(p))


def _test_files(path: str, root: Path) -> list[Path]:
    """The files a cited test file means: ``tests/a/test_b.py`` itself, or every
    ``tests/**/test_b.py`` (or ``**/a/test_b.py``) for a path cited without ``tests/``."""
    if path.startswith("tests/"):
        return [root / path] if (root / path).is_file() else []
    return sorted(p for p in (root / "tests").rglob(Path(path).name) if p.as_posix().endswith(path))


def missing_tests(text: str, root: Path = ROOT) -> list[str]:
    """Test files, test ids and bare test names cited in ``text`` that do not exist.

    ``test_b.py::test_c`` (or ``tests/a/test_b.py::test_c``) needs the file and a
    ``test_c`` defined in it; a bare ``test_c`` in backticks needs it defined in
    some file under ``tests/``.
    """
    bad = []
    for path, names in _TEST_FILE.findall(text):
        files = _test_files(path, root)
        if not files:
            bad.append(f"{path}{names} (no such file)")
            continue
        defined = set().union(*(_defined_names(f) for f in files))
        bad += [f"{path}::{n}" for n in names.split("::")[1:] if n not in defined]
    known = _all_test_names() if root == ROOT else frozenset()
    bad += [f"`{name}`" for name in _BARE_TEST.findall(text) if name not in known]
    return bad


def _find_spec_safe(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def resolve_module_path(dotted: str) -> Any:
    """Import the longest importable prefix of ``dotted`` and read the rest as attributes.

    Raises:
        LookupError: no prefix imports, or an attribute is missing.
    """
    parts = dotted.split(".")
    module: ModuleType | None = None
    rest: list[str] = []
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        if not _find_spec_safe(name):
            continue
        module, rest = importlib.import_module(name), parts[cut:]
        break
    if module is None:
        raise LookupError(f"{dotted}: no part of it can be imported")
    value: Any = module
    for i, attr in enumerate(rest):
        if not hasattr(value, attr):
            have = ".".join(parts[: len(parts) - len(rest) + i])
            raise LookupError(f"{dotted}: {have} has no attribute {attr!r}")
        value = getattr(value, attr)
    return value


def missing_modules(text: str) -> list[str]:
    """``sourcefree...`` paths cited in ``text`` that neither import nor resolve."""
    bad = []
    for dotted in sorted(set(_MODULE.findall(text)) - NOT_MODULES):
        try:
            resolve_module_path(dotted)
        except (LookupError, ModuleNotFoundError) as exc:
            bad.append(str(exc))
    return bad


def missing_paths(text: str, doc: Path, root: Path = ROOT) -> list[str]:
    """Repository paths and relative Markdown links cited in ``text`` that do not exist."""
    bad = []
    for m in _PATH.finditer(text):
        raw, path = m.group(1), m.group(1).rstrip("./")
        if path in TOP or text[m.end() : m.end() + 1] == "<":  # "tests/", "adapters/<name>.py"
            continue
        if not (root / path).exists():
            bad.append(raw)
    bad = sorted(set(bad))
    for link in sorted(set(_LINK.findall(text))):
        if "://" in link or link.startswith("mailto:"):
            continue
        if not (doc.parent / link).exists():
            bad.append(f"link {link}")
    return bad


def _doc_id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_cited_tests_exist(doc: Path) -> None:
    assert missing_tests(doc.read_text()) == []


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_cited_modules_exist(doc: Path) -> None:
    assert missing_modules(doc.read_text()) == []


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_cited_repository_paths_exist(doc: Path) -> None:
    assert missing_paths(doc.read_text(), doc) == []


def test_the_checker_finds_wrong_citations() -> None:
    """Each check fails on a deliberately wrong citation and passes on a right one."""
    fake = (
        "See `tests/test_docs.py::test_no_such_test`, `test_never_written_anywhere`,\n"
        "`tests/no_such_file.py`, `test_runtime.py::test_nope`, `sourcefree.no_such_module`, "
        "`sourcefree.package.loader.no_such_name`, `sdk/no_such_layer/x.py` and\n"
        "[a page](no-such-page.md).\n"
    )
    assert missing_tests(fake) == [
        "tests/test_docs.py::test_no_such_test",
        "test_runtime.py::test_nope",
        "`test_never_written_anywhere`",
    ]
    assert missing_modules(fake) == [
        "sourcefree.no_such_module: sourcefree has no attribute 'no_such_module'",
        "sourcefree.package.loader.no_such_name: sourcefree.package.loader has no attribute "
        "'no_such_name'",
    ]
    doc = ROOT / "docs" / "fake.md"
    assert missing_paths(fake, doc) == [
        "sdk/no_such_layer/x.py",
        "tests/no_such_file.py",
        "link no-such-page.md",
    ]
    good = (
        "`tests/test_docs.py::test_the_checker_finds_wrong_citations`, "
        "`test_cited_tests_exist`, `test_docs.py::test_layer_table_parser`, `test_package.py`, "
        "`sourcefree.package.loader.load_package`, "
        "`sdk/package/loader.py`, [engine](engine.md#layers), `sourcefree.manifest`\n"
    )
    assert missing_tests(good) == []
    assert missing_modules(good) == []
    assert missing_paths(good, doc) == []


def _module_docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""


METHOD_FILES = sorted(p for p in (ROOT / "adapters").glob("*.py") if p.name != "__init__.py")


#: Papers with neither an arXiv version nor a DOI that could be found (2026-12-04): the
#: citation names venue and year instead, and says so.
NO_IDENTIFIER = {"pocan": "ACCV 2022"}


def _cites_paper(name: str, text: str) -> bool:
    if name in NO_IDENTIFIER:
        return NO_IDENTIFIER[name] in text and "no DOI" in text
    return _STABLE_REF.search(text) is not None


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.name)
def test_each_method_cites_a_stable_reference(path: Path) -> None:
    """The module docstring cites its paper by arXiv id or DOI, not by a repository folder."""
    doc = _module_docstring(path)
    assert _cites_paper(path.stem, doc), f"{path.name}: no arXiv id or DOI in the docstring"
    assert not _REPO_FOLDER_REF.search(doc)


def test_methods_md_cites_papers_not_folders() -> None:
    text = (ROOT / "docs" / "methods.md").read_text()
    assert not _REPO_FOLDER_REF.search(text)
    table = text.split("\n| method | paper |", 1)[1].split("\n\n", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines()[2:]}
    from sourcefree.engine.registry import list_methods, load_builtin_methods

    load_builtin_methods()
    for name in list_methods():
        assert name in rows, f"docs/methods.md has no table row for {name}"
        assert _cites_paper(name, rows[name]), f"the {name} row cites no arXiv id or DOI"


def test_stable_reference_pattern() -> None:
    assert _STABLE_REF.search("ICML 2020, arXiv 2002.08546")
    assert _STABLE_REF.search("DOI 10.1007/978-3-031-25072-9_17")
    assert not _STABLE_REF.search("the project's papers/001 copy, ACCV 2022")
    assert _REPO_FOLDER_REF.search("../shared/papers/003_eef7361345b50592.txt")


def _layers_module() -> ModuleType:
    path = ROOT / "tests" / "test_layers.py"
    spec = importlib.util.spec_from_file_location("_docs_test_layers", path)
    if spec is None or spec.loader is None:
        raise ImportError("tests/test_layers.py cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_layer_table(text: str) -> tuple[dict[str, set[str]], set[str]]:
    """(layer -> may import, torch-free layers) from the table under ``## Layers``.

    A row is ``| `layer` | holds | `a`, `b` (or "nothing") | torch |``; the torch cell
    says ``never`` for a layer that never imports torch.
    """
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    allowed: dict[str, set[str]] = {}
    torch_free: set[str] = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.fullmatch(r"`[\w_]+`", cells[0]):
            continue
        name = cells[0].strip("`")
        allowed[name] = set(re.findall(r"`(\w+)`", cells[2]))
        if cells[3].lower().startswith("never"):
            torch_free.add(name)
    return allowed, torch_free


def test_engine_md_layer_table_is_the_layer_map() -> None:
    layers = _layers_module()
    allowed, torch_free = parse_layer_table((ROOT / "docs" / "engine.md").read_text())
    assert allowed == {k: set(v) for k, v in layers.LAYERS.items()}
    assert torch_free == set(layers.TORCH_FREE)


def test_layer_table_parser() -> None:
    text = (
        "# t\n\n## Layers\n\n| layer | holds | may import | torch |\n|---|---|---|---|\n"
        "| `package` | format | nothing | never |\n| `data` | readers | `package` | lazily |\n"
        "\n## Next\n| `cli` | x | `data` | yes |\n"
    )
    assert parse_layer_table(text) == ({"package": set(), "data": {"package"}}, {"package"})
