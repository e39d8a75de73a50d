"""The per-worker Helix runtime belongs to the config it was built from, never to a later engine's."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from patches_free_hooks.runtime import helix_runtime  # noqa: E402


def _config(stripe: int) -> SimpleNamespace:
    return SimpleNamespace(additional_config={"helix": {"kvp": 1, "tpa": 1, "stripe": stripe}},
                           parallel_config=SimpleNamespace(decode_context_parallel_size=1,
                                                           cp_kv_cache_interleave_size=stripe),
                           cache_config=SimpleNamespace(block_size=64))


def test_a_new_engines_config_gets_its_own_runtime_even_where_ids_are_reused() -> None:
    for stripe in (8, 16, 32, 8, 16):  # configs die between rounds: CPython reuses their ids
        config = _config(stripe)
        runtime = helix_runtime(config)
        assert runtime is helix_runtime(config)  # cached for the same config
        assert runtime.striping.stripe == stripe and runtime.exchange is None
        del config
        gc.collect()
    assert helix_runtime(SimpleNamespace(additional_config={}, parallel_config=None, cache_config=None)) is None
