"""A vLLM-style paged KV cache: writing a step's tokens, reading one sequence, grouping a batch."""

from __future__ import annotations

import torch

from vllm_helix.attention.cpu_native import native_kernel


def append_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write each token's K and V at its slot of a ``[blocks, kv_heads, block_size, Dk + Dv]`` cache.

    A row holds K in its first ``Dk`` and V in its last ``Dv`` entries; slot
    ``s`` is block ``s // block_size``, offset ``s % block_size``; a slot < 0 is
    skipped (under Helix: a token another KVP rank stores). ``slot_mapping`` may
    be longer than the batch (vLLM pads it). On CPU the C++ extension writes the
    rows in one call where it is built; the torch indexing below is the
    reference and the fallback.
    """
    tokens = key.shape[0]
    module = native_kernel() if kv_cache.device.type == "cpu" else None
    if module is not None and key.dtype == value.dtype == kv_cache.dtype:
        module.append_kv(key, value, kv_cache, slot_mapping)
        return
    block_size = kv_cache.shape[2]
    slots = slot_mapping[:tokens].to(torch.int64)
    mine = slots >= 0
    slots = slots[mine]
    blocks, offsets = slots // block_size, slots % block_size
    key_dim = key.shape[-1]
    kv_cache[blocks, :, offsets, :key_dim] = key[mine].to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, key_dim:] = value[mine].to(kv_cache.dtype)


def read_sequence(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence's shard, in order: ``[length, ...]`` (a copy)."""
    num_blocks = -(-length // cache.shape[1])
    return cache[block_row[:num_blocks].to(torch.int64)].flatten(0, 1)[:length]


def row_groups(block_table: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` runs of consecutive query tokens that share a block-table row.

    vLLM flattens a batch so that the query tokens of one sequence are consecutive;
    tokens with the same row read the same KV, so each run reads its shard once.
    """
    tokens = block_table.shape[0]
    if tokens == 0:
        return []
    changes = (block_table[1:] != block_table[:-1]).any(dim=1).nonzero().flatten() + 1
    edges = [0, *changes.tolist(), tokens]
    return list(zip(edges[:-1], edges[1:]))
