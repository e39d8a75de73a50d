"""docs/vllm-touchpoints.md names the tests that guard each touch-point, and the plugin and vLLM
code each touch-point is about; every one must exist.

A catalogue entry whose test was renamed or deleted would still read as guarded, and one that
points at a function vLLM or the plugin has since moved or renamed would send the reader (and the
next version bump's review) to the wrong place. The catalogue cites code by file and symbol, not by
line number, so that these checks can be exact.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# `file.py::test_name` or, continuing the previous file, `::test_name`
REFERENCE = re.compile(r"`(?:[\w/]*?(test_\w+\.py))?::(test_\w+)")
# `path/file.py::Symbol` or `path/file.py::Class.method`, the whole backticked span; test files
# (test_*.py) are REFERENCE's, so a source citation never names one
SOURCE = re.compile(r"`((?:[\w.-]+/)*(?!test_)[\w.-]+\.py)::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)`")
# a bare `::name` that is not a test: it would continue a source file, which SOURCE does not read
BARE_SOURCE = re.compile(r"`::(?!test_)\w")


def _references(text: str) -> list[tuple[str, str]]:
    found, current = [], None
    for match in REFERENCE.finditer(text):
        current = match.group(1) or current
        assert current is not None, f"::{match.group(2)} follows no test file"
        found.append((current, match.group(2)))
    return found


def test_every_test_the_catalogue_names_exists() -> None:
    references = _references((ROOT / "docs" / "vllm-touchpoints.md").read_text())
    assert len(references) > 30
    files: dict[str, list[Path]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):  # a basename may exist in two folders
        files.setdefault(path.name, []).append(path)
    missing = [f"{name}::{test}" for name, test in references
               if not any(re.search(rf"^(async )?def {test}\b", path.read_text(), re.M)
                          for path in files.get(name, []))]
    assert not missing, missing


def test_a_bare_reference_continues_the_previous_file() -> None:
    assert _references("`a/test_x.py::test_one`, `::test_two`, `test_y.py::test_three`") == [
        ("test_x.py", "test_one"), ("test_x.py", "test_two"), ("test_y.py", "test_three")]


def _source_citations(text: str) -> list[tuple[str, str]]:
    """Every `path/file.py::Symbol` citation of a non-test file, in order: (path, symbol)."""
    return [(match.group(1), match.group(2)) for match in SOURCE.finditer(text)]


def _members(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """The names a module or class body binds: defs, classes and assignments, also those under a
    top-level ``if``/``try``/``with`` (``if TYPE_CHECKING:``, optional imports)."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = node
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            nested = [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                      *(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)]
            names.update(_members(nested))
    return names


def _defines(tree: ast.Module, symbol: str) -> bool:
    """Whether ``symbol`` (``Name`` or ``Class.member``) is bound at the top of the module, or in
    the class body for a member (a def, or a method or class attribute set by assignment)."""
    scope: ast.AST = tree
    for part in symbol.split("."):
        if not isinstance(scope, (ast.Module, ast.ClassDef)) or part not in (found := _members(scope.body)):
            return False
        scope = found[part]
    return True


def _vllm_dir() -> Path | None:
    """The installed ``vllm`` package directory, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def test_every_source_symbol_the_catalogue_cites_exists() -> None:
    text = (ROOT / "docs" / "vllm-touchpoints.md").read_text()
    citations = _source_citations(text)
    assert len(citations) >= 20, citations
    vllm_dir = _vllm_dir()
    missing = [f"`{bare.group(0)}...`: a bare `::name` continues only test files; name the file"
               for bare in BARE_SOURCE.finditer(text)]
    unchecked = 0
    trees: dict[Path, ast.Module] = {}
    for path, symbol in citations:
        if path.startswith("vllm/"):
            if vllm_dir is None:
                unchecked += 1
                continue
            file = vllm_dir / path.removeprefix("vllm/")
        else:
            file = ROOT / path
        if not file.is_file():
            missing.append(f"{path}::{symbol} (no such file)")
            continue
        if file not in trees:
            trees[file] = ast.parse(file.read_text(), filename=str(file))
        if not _defines(trees[file], symbol):
            missing.append(f"{path}::{symbol}")
    assert not missing, "cited symbols that do not exist:\n" + "\n".join(missing)
    if unchecked:
        pytest.skip(f"vllm is not installed: {unchecked} `vllm/...` citations were not checked")


def test_source_citations_are_parsed_apart_from_test_citations() -> None:
    text = ("(`patches_free_hooks/plugin.py::register`, `vllm/v1/attention/backend.py::AttentionImplBase.__new__`,"
            " `a/test_x.py::test_one`, `::test_two`, `plugin.py:register`, `vllm/x.py::A.b` and more)")
    assert _source_citations(text) == [("patches_free_hooks/plugin.py", "register"),
                                       ("vllm/v1/attention/backend.py", "AttentionImplBase.__new__"),
                                       ("vllm/x.py", "A.b")]
    assert _references(text) == [("test_x.py", "test_one"), ("test_x.py", "test_two")]
    tree = ast.parse("X: int = 1\nclass A:\n    b = staticmethod(len)\n    def c(self): ...\n"
                     "if True:\n    def d(): ...\n")
    assert all(_defines(tree, symbol) for symbol in ("X", "A", "A.b", "A.c", "d"))
    assert not any(_defines(tree, symbol) for symbol in ("Y", "A.z", "X.real", "A.c.x"))
