"""Touch-point T8: the Helix impls set DCP/LSE flags per instance; the class-level flag stays vLLM's.

vLLM's ``AttentionBackend.supports_dcp()`` reads the impl *class* attribute, which
the plugin leaves ``False``; that is safe only because the CPU platform's backend
selection never asks (it does not call ``validate_configuration``). If a vLLM
release starts asking, Helix on CPU would be refused at start-up: this test goes
red first.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm.platforms.cpu import CpuPlatform  # noqa: E402
from vllm.v1.attention.backend import AttentionBackend  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.selector import AttentionSelectorConfig  # noqa: E402

from patches_free_hooks.cpu_attention import HelixCPUAttentionImpl  # noqa: E402
from patches_free_hooks.cpu_mla import HelixCPUMLAImpl  # noqa: E402


def test_cpu_backend_selection_never_asks_the_class_for_dcp_support(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def record(name: str):
        def ask(cls, *args, **kwargs):
            asked.append(f"{cls.__name__}.{name}")
            return [] if name == "validate_configuration" else False
        return classmethod(ask)

    monkeypatch.setattr(AttentionBackend, "validate_configuration", record("validate_configuration"))
    monkeypatch.setattr(AttentionBackend, "supports_dcp", record("supports_dcp"))
    for backend, use_mla, head_size, block in ((AttentionBackendEnum.CPU_ATTN, False, 128, 128),
                                               (AttentionBackendEnum.CPU_MLA, True, 576, 16)):
        path = CpuPlatform.get_attn_backend_cls(
            backend, AttentionSelectorConfig(head_size, torch.float32, None, block, use_mla=use_mla))
        assert path.rsplit(".", 1)[-1].endswith("Backend")
    assert asked == []


def test_the_class_level_dcp_flags_are_left_as_vllm_set_them() -> None:
    """The plugin flips the flags on its instances only (and only when kvp > 1)."""
    for impl in (HelixCPUAttentionImpl, HelixCPUMLAImpl):
        base = impl.__mro__[1]
        assert (impl.supports_dcp, impl.can_return_lse_for_decode) == (base.supports_dcp,
                                                                       base.can_return_lse_for_decode)
        assert impl.supports_dcp is False
