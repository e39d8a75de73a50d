"""The CPU striped slot mapping against vLLM's documented DCP placement rule."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from patches_free_hooks.slot_mapping import striped_slot_mapping  # noqa: E402


def _vllm_rule(position: int, row: list[int], block_size: int, world: int, rank: int, interleave: int) -> int:
    """vLLM's Triton kernel, one token: a block-table entry covers block_size*world tokens."""
    virtual_block, offset = divmod(position, block_size * world)
    if (offset // interleave) % world != rank:
        return -1
    local_offset = (offset // (world * interleave)) * interleave + offset % interleave
    return row[virtual_block] * block_size + local_offset


@pytest.mark.parametrize("world,interleave,block_size", [(1, 1, 16), (2, 1, 16), (2, 16, 16), (4, 4, 32), (3, 8, 16)])
def test_matches_vllm_placement_for_a_ragged_batch(world: int, interleave: int, block_size: int, fresh_seed: int) -> None:
    rng = random.Random(fresh_seed)
    num_requests, max_blocks = 4, 12
    block_table = torch.tensor([rng.sample(range(100), max_blocks) for _ in range(num_requests)], dtype=torch.int32)
    lens = [rng.randint(0, 40) for _ in range(num_requests)]
    capacity = max_blocks * block_size * world  # tokens one block-table row can address
    starts = [rng.randint(0, min(200, capacity - 41)) for _ in range(num_requests)]
    query_start_loc = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    positions = torch.tensor([s + j for s, n in zip(starts, lens) for j in range(n)], dtype=torch.int64)
    num_tokens = int(query_start_loc[-1])
    for rank in range(world):
        slots = torch.full((num_tokens + 5,), 7, dtype=torch.int64)
        striped_slot_mapping(num_tokens, num_tokens + 5, query_start_loc, positions, block_table,
                             max_blocks, slots, block_size, world, rank, interleave)
        expected = [
            _vllm_rule(int(positions[t]), block_table[r].tolist(), block_size, world, rank, interleave)
            for r in range(num_requests) for t in range(int(query_start_loc[r]), int(query_start_loc[r + 1]))
        ]
        assert slots[:num_tokens].tolist() == expected
        assert slots[num_tokens:].tolist() == [-1] * 5  # padding slots are never written
