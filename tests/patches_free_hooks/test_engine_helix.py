"""The layout is resolved once per engine config, held on it, and checked against vLLM's settings.

Two engines in one process (or a config reusing a dead one's ``id()``) each get their own
layout and runtime; a copy of a config with another ``additional_config`` resolves afresh.
"""

from __future__ import annotations

import copy
import gc
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from patches_free_hooks.compat import HelixStartupError  # noqa: E402
from patches_free_hooks.engine_helix import engine_helix  # noqa: E402
from patches_free_hooks.runtime import helix_runtime  # noqa: E402


def _config(stripe: int, kvp: int = 1, dcp: int | None = None, interleave: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(additional_config={"helix": {"kvp": kvp, "tpa": 1, "stripe": stripe}},
                           parallel_config=SimpleNamespace(decode_context_parallel_size=kvp if dcp is None else dcp,
                                                           cp_kv_cache_interleave_size=interleave or stripe),
                           cache_config=SimpleNamespace(block_size=64))


def test_each_config_holds_its_own_layout_and_runtime_even_where_ids_are_reused() -> None:
    for stripe in (8, 16, 32, 8, 16):  # configs die between rounds: CPython reuses their ids
        config = _config(stripe)
        layout, runtime = engine_helix(config), helix_runtime(config)
        assert layout is engine_helix(config) and runtime is helix_runtime(config)  # resolved once
        assert layout.striping.stripe == runtime.striping.stripe == stripe and runtime.exchange is None
        del config
        gc.collect()
    plain = SimpleNamespace(additional_config={}, parallel_config=None, cache_config=None)
    assert engine_helix(plain) is None and helix_runtime(plain) is None


def test_a_copy_with_another_layout_resolves_afresh() -> None:
    config = _config(8)
    assert engine_helix(config).striping.stripe == 8
    other = copy.copy(config)  # shares the held slot, not the additional_config
    other.additional_config = {"helix": {"kvp": 1, "tpa": 1, "stripe": 32}}
    other.parallel_config = SimpleNamespace(decode_context_parallel_size=1, cp_kv_cache_interleave_size=32)
    assert engine_helix(other).striping.stripe == 32 and engine_helix(config).striping.stripe == 8


@pytest.mark.parametrize(("config", "message"), [
    (_config(16, kvp=2, dcp=1), "helix kvp=2 but vLLM runs decode_context_parallel_size=1"),
    (_config(16, kvp=2, interleave=64), "helix stripe=16 but cp_kv_cache_interleave_size=64"),
])
def test_a_layout_vllm_does_not_run_is_refused(config: SimpleNamespace, message: str) -> None:
    with pytest.raises(HelixStartupError, match=message):
        engine_helix(config)
