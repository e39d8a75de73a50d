"""The block layouts of vLLM's own CPU KV caches, for :mod:`vllm_helix.kv_handoff`.

vLLM's CPU attention (``CPU_ATTN``) stores a ``[blocks, kv_heads, block_size,
2 * head_size]`` cache whose (block, head) regions are packed by
``cpu_attn_reshape_and_cache`` in an ISA-dependent order (for its AVX kernels K
as ``[head_size, block_size]`` then V as ``[block_size, head_size]``; AMX and NEON
differ). Rather than transcribe each ISA's packing, :func:`cpu_attn_layout` asks
vLLM's kernel itself: it writes index-coded tokens into a scratch block and reads
back where each element landed. The answer is exact for any ISA the installed
vLLM runs, and moves with vLLM if the packing changes.

``CPU_MLA`` and the plugin's Helix caches are token-major (one row per token):
``BlockLayout(block_size, row)`` with no order.
"""

from __future__ import annotations

import functools
import math

import torch

from vllm_helix.kv_handoff import BlockLayout

from patches_free_hooks.compat import internal

# Integers a probe value can carry exactly in every KV dtype vLLM's CPU attention stores
# (bfloat16 has 8 significant bits): codes are sent in base-256 digits, one probe per digit.
_DIGIT = 256


def cpu_attn_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The packing vLLM's CPU attention picks for this cache (``vec``, ``vec16``, ``amx``, ``neon``, ...)."""
    return internal("vllm.v1.attention.backends.cpu_attn:_get_attn_isa")(dtype, block_size, head_size, "auto")


@functools.cache
def cpu_attn_layout(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> BlockLayout:
    """Where ``cpu_attn_reshape_and_cache(isa)`` puts element ``e`` of token ``n``'s ``K | V`` row.

    One scratch block, one KV head, every slot written once per probe; probe ``j``
    carries digit ``j`` (base 256) of each element's canonical index
    ``n * 2 * head_size + e``, so the region offset holding digit values
    ``(d0, d1, ...)`` is the offset of canonical element ``d0 + 256 * d1 + ...``.
    """
    reshape_and_cache = internal("vllm._custom_ops:cpu_attn_reshape_and_cache")
    row = 2 * head_size
    size = block_size * row
    codes = torch.arange(size, dtype=torch.int64).view(block_size, 1, row)
    decoded = torch.zeros(size, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(size, _DIGIT)))):
        values = (codes // _DIGIT**digit % _DIGIT).to(dtype)
        cache = torch.full((1, 1, 2 * block_size, head_size), -1.0, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        reshape_and_cache(values[..., :head_size].contiguous(), values[..., head_size:].contiguous(),
                          key_cache, value_cache, torch.arange(block_size, dtype=torch.int64), isa)
        landed = cache.flatten().to(torch.int64)
        if bool((landed < 0).any()):
            raise RuntimeError(f"vLLM's CPU attention packing ({isa}) left part of a block unwritten; "
                               "the KV handoff cannot map it")
        decoded += landed * _DIGIT**digit
    if not torch.equal(torch.sort(decoded).values, torch.arange(size)):
        raise RuntimeError(f"vLLM's CPU attention packing ({isa}) is not a permutation of a block's elements; "
                           "the KV handoff cannot map it")
    order = torch.empty(size, dtype=torch.int64)
    order[decoded] = torch.arange(size)
    return BlockLayout(block_size, row, order)
