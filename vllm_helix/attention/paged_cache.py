"""Reading a vLLM-style paged KV cache: one sequence's tokens, and a flattened batch's sequences."""

from __future__ import annotations

import torch


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
