"""The plugin's contract with vLLM internals: fails loudly the day vLLM moves one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from patches_free_hooks import compat  # noqa: E402
from patches_free_hooks.compat import HelixStartupError  # noqa: E402


def test_every_internal_the_plugin_uses_exists_in_the_installed_vllm() -> None:
    assert compat.missing_internals() == []


def test_installed_vllm_is_in_the_supported_range() -> None:
    compat.check_supported_version()


def test_an_unsupported_version_is_refused_with_the_supported_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    with pytest.raises(HelixStartupError, match=r"supports vLLM >=0.32,<0.34 but vLLM 0.40.1 is installed"):
        compat.check_supported_version()


def test_a_moved_internal_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    moved = "vllm.v1.attention.backends.cpu_attn:NoSuchBackend"
    monkeypatch.setattr(compat, "INTERNALS", compat.INTERNALS + (moved,))
    with pytest.raises(HelixStartupError, match="NoSuchBackend is missing"):
        compat.internal(moved)
    assert compat.missing_internals() == [moved]


def test_undeclared_internals_cannot_be_used() -> None:
    with pytest.raises(KeyError, match="not declared"):
        compat.internal("vllm.config:VllmConfig")


def test_direct_vllm_imports_are_exactly_the_declared_exceptions() -> None:
    hooks = Path(compat.__file__).parent
    imported = set()
    for path in hooks.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            imported |= {name for name in names if name.split(".")[0] == "vllm"}
    assert imported == set(compat.DIRECT_IMPORTS)
    catalogue = (hooks.parent / "docs" / "vllm-touchpoints.md").read_text()
    assert all(f"`{module}`" in catalogue for module in compat.DIRECT_IMPORTS)
