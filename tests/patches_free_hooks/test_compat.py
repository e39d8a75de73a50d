"""The plugin's contract with vLLM internals: fails loudly the day vLLM moves one."""

from __future__ import annotations

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
