"""The packages' import graph has no cycles, counting imports inside functions too (issue 14).

A cycle hidden behind a function-level import still ties two modules together:
neither can be read, tested or moved without the other.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vllm_helix", "patches_free_hooks")
SCRIPTS = ("benchmarks", "scripts")  # no cycles there either; the part rules below are the packages'


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (``from pkg import mod`` counts as ``pkg.mod``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in modules:  # a symbol of a module: walk up to the module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph(roots: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    files = {_module_name(p): p for package in roots for p in (ROOT / package).rglob("*.py")}
    modules = set(files)
    # a package's own __init__ is not an edge back from its submodules
    return {name: {m for m in _imports(path, modules) if m != name and not name.startswith(m + ".")}
            for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_is_acyclic() -> None:
    graph = _graph((*PACKAGES, *SCRIPTS))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_benchmarks_and_scripts_import_nothing_by_path() -> None:
    """Scripts reach the library through packages (``from benchmarks import long_context``, ``vllm_helix``),
    never by editing ``sys.path``: an import that works only from one directory is a hidden dependency."""
    edits = ("sys.path." + "insert", "sys.path." + "append")  # spelled apart: this file is scanned too
    for root in (*SCRIPTS, "tests"):
        for path in (ROOT / root).rglob("*.py"):
            assert not any(edit in path.read_text() for edit in edits), path


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_does_not_import_vllm() -> None:
    for path in (ROOT / "vllm_helix").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "vllm" for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "vllm", path


def _part(module: str) -> str:
    """Which part of the tree a module belongs to (the map at the top of docs/design.md)."""
    for part in ("vllm_helix.commands", "vllm_helix.harness", "vllm_helix.planner"):
        if module == part or module.startswith(part + "."):
            return part
    return "patches_free_hooks" if module.startswith("patches_free_hooks") else "vllm_helix core"


# What each part may import besides itself: the core imports no other part; the planner sits
# on the core; the harness on the core and the planner (the calibration fits the planner's
# constants to engine runs); the commands on all of them (the CLI is the top: `calibrate` hands
# vLLM's collectives from the hooks to the harness); the vLLM hooks on the core only.
MAY_IMPORT = {
    "vllm_helix core": set(),
    "vllm_helix.planner": {"vllm_helix core"},
    "vllm_helix.harness": {"vllm_helix core", "vllm_helix.planner"},
    "vllm_helix.commands": {"vllm_helix core", "vllm_helix.planner", "vllm_helix.harness", "patches_free_hooks"},
    "patches_free_hooks": {"vllm_helix core"},
}


def test_each_part_imports_only_the_parts_below_it() -> None:
    wrong = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                   if _part(b) != _part(a) and _part(b) not in MAY_IMPORT[_part(a)])
    assert not wrong, wrong


def test_the_part_rule_sees_a_wrong_edge() -> None:
    assert _part("vllm_helix.striping") == "vllm_helix core"
    assert _part("vllm_helix.commands.cli") == "vllm_helix.commands"
    assert "vllm_helix.commands" not in MAY_IMPORT[_part("vllm_helix.attention.exchange")]


def _modules_on_disk() -> set[str]:
    return {p.name for package in PACKAGES for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"}


def _subpackages() -> set[str]:
    return {f"{p.parent.relative_to(ROOT)}/" for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")}


def test_the_design_map_names_every_module_and_only_modules_that_exist() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    block = text[text.index("## Map of the tree"):].split("```text\n", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"\w+\.py", block))
    assert _modules_on_disk() - named == set(), "modules missing from docs/design.md's map"
    assert named - _modules_on_disk() == set(), "docs/design.md's map names modules that do not exist"
    folders = {line.strip() for line in block.splitlines() if line.strip().endswith("/") or "/ " in line}
    for subpackage in _subpackages():
        assert any(f.split()[0] == subpackage.rsplit("/", 2)[-2] + "/" for f in folders), subpackage


def test_the_readme_layout_names_every_subpackage() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout of the repository"):]
    missing = {s for s in _subpackages() if f"`{s}`" not in section}
    assert not missing, f"README's layout section does not name {sorted(missing)}"
