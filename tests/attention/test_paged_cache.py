"""Writing a step's K/V into the plugin's ``[.., K|V]`` paged cache, and grouping a batch by sequence."""

from __future__ import annotations

import pytest
import torch

from vllm_helix.attention import paged_cache
from vllm_helix.attention.paged_cache import append_kv, row_groups


def _expected(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The cache after the write, one token and head at a time (no indexing tricks)."""
    cache = cache.clone()
    block_size, key_dim = cache.shape[2], key.shape[-1]
    for token, slot in enumerate(slots[: key.shape[0]]):
        if slot < 0:
            continue
        for head in range(key.shape[1]):
            cache[slot // block_size, head, slot % block_size, :key_dim] = key[token, head]
            cache[slot // block_size, head, slot % block_size, key_dim:] = value[token, head]
    return cache


@pytest.mark.parametrize("route", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads, key_dim, value_dim, block_size", [(1, 128, 128, 16), (2, 12, 8, 4)])
def test_append_writes_own_slots_and_nothing_else(monkeypatch, fresh_seed, route, dtype, kv_heads, key_dim,
                                                  value_dim, block_size) -> None:
    if route == "torch":
        monkeypatch.setattr(paged_cache, "native_kernel", lambda: None)
    elif paged_cache.native_kernel() is None:
        pytest.fail("the C++ kernel is not built: run `vllm-helix build-kernel --verbose`")
    gen = torch.Generator().manual_seed(fresh_seed)
    blocks, tokens = 5, 7
    cache = torch.randn(blocks, kv_heads, block_size, key_dim + value_dim, generator=gen).to(dtype)
    key = torch.randn(tokens, kv_heads, key_dim, generator=gen).to(dtype)
    value = torch.randn(tokens, kv_heads, value_dim, generator=gen).to(dtype)
    # distinct slots, other ranks' tokens at -1, and vLLM's padding past the batch (must be ignored)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    slots[torch.randperm(tokens, generator=gen)[:3]] = -1
    padded = torch.cat([slots, torch.tensor([0, 1])]).to(torch.int32)
    expected = _expected(cache, key, value, padded.tolist())
    append_kv(cache, key, value, padded)
    assert torch.equal(cache, expected)


def test_append_of_strided_key_and_value_views(fresh_seed) -> None:
    """vLLM hands K and V as views of one qkv projection: strided along tokens."""
    gen = torch.Generator().manual_seed(fresh_seed)
    cache = torch.zeros(3, 1, 4, 16)
    qkv = torch.randn(5, 3, 8, generator=gen)
    key, value = qkv[:, 1:2], qkv[:, 2:3]
    slots = torch.tensor([3, -1, 0, 11, -1])
    expected = _expected(cache, key, value, slots.tolist())
    append_kv(cache, key, value, slots)
    assert torch.equal(cache, expected)


def test_append_refuses_a_slot_past_the_cache() -> None:
    if paged_cache.native_kernel() is None:
        pytest.fail("the C++ kernel is not built: run `vllm-helix build-kernel --verbose`")
    cache = torch.zeros(2, 1, 4, 8)
    with pytest.raises(RuntimeError, match="past the cache"):
        append_kv(cache, torch.ones(1, 1, 4), torch.ones(1, 1, 4), torch.tensor([8]))


def test_row_groups_are_the_runs_of_equal_rows() -> None:
    table = torch.tensor([[3, 4], [3, 4], [7, 1], [3, 4], [3, 4], [3, 4]])
    assert row_groups(table) == [(0, 2), (2, 3), (3, 6)]
    assert row_groups(table[:0]) == []
