"""Striped slot mapping for vLLM's CPU workers.

vLLM computes each step's KV-cache slots in ``ComputeSlotMappingKernel.kernel``,
a Triton kernel that already knows KV striping; on CPU without Triton the
platform swaps in a C++ fallback that refuses context parallelism. vLLM's
public kernel-dispatch registry (``register_kernels``) lets the plugin put a
torch implementation of the same striping (:meth:`vllm_helix.striping.KVStriping.slot_mapping`)
in its place. It is registered by the Helix attention builders, i.e. after the
platform's own overrides, and only in workers that run Helix with kvp > 1.
"""

from __future__ import annotations

import torch

from vllm_helix.striping import KVStriping

from patches_free_hooks.compat import internal

KERNEL = "vllm.v1.worker.block_table.ComputeSlotMappingKernel.kernel"
_registered = False


def striped_slot_mapping(
    num_tokens: int,
    max_num_tokens: int,
    query_start_loc: torch.Tensor,
    positions: torch.Tensor,
    block_table: torch.Tensor,
    block_table_stride: int,
    slot_mapping: torch.Tensor,
    KV_CACHE_BLOCK_SIZE: int,
    TOTAL_CP_WORLD_SIZE: int = 1,
    TOTAL_CP_RANK: int = 0,
    CP_KV_CACHE_INTERLEAVE_SIZE: int = 1,
    PAD_ID: int = -1,
    BLOCK_SIZE: int = 1024,
) -> None:
    """Same arguments as vLLM's kernel; writes ``slot_mapping`` in place (-1: not mine)."""
    del block_table_stride, BLOCK_SIZE  # launch-geometry arguments of the Triton original
    slot_mapping[num_tokens:max_num_tokens] = PAD_ID
    num_requests = query_start_loc.numel() - 1
    start, end = int(query_start_loc[0]), int(query_start_loc[num_requests])
    if end <= start:
        return
    lens = (query_start_loc[1:] - query_start_loc[:-1]).to(torch.int64)
    request_index = torch.repeat_interleave(torch.arange(num_requests), lens)
    striping = KVStriping(TOTAL_CP_WORLD_SIZE, CP_KV_CACHE_INTERLEAVE_SIZE, KV_CACHE_BLOCK_SIZE)
    slots = striping.slot_mapping(positions[start:end].to(torch.int64), block_table, request_index, TOTAL_CP_RANK)
    slots[slots < 0] = PAD_ID
    slot_mapping[start:end] = slots


def register_striped_slot_mapping() -> None:
    """Route vLLM's slot-mapping kernel to :func:`striped_slot_mapping` (once per process)."""
    global _registered
    if _registered:
        return
    internal("vllm.v1.worker.block_table:ComputeSlotMappingKernel.kernel")
    internal("vllm.triton_utils.dispatcher:register_kernels")({KERNEL: striped_slot_mapping})
    _registered = True
