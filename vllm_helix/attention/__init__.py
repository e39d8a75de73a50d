"""Helix attention: per-shard decode with LSE, the exact combine, the KVP exchange, HOP-B.

One decode step on one rank (shapes for batch B, H query heads, N = kvp * tpa):

1. ``paged_decode`` / ``paged_decode_mla``: queries ``[B, H/TPA, D]`` against this
   rank's KV shard -> partial ``out [B, H/TPA, Dv]`` and ``lse [B, H/TPA]``. On CPU the
   kernel is chosen per call (:mod:`~vllm_helix.attention.kernel_choice`: the C++ decode
   kernel, torch's flash kernel, or the float64-checked reference).
2. ``KVPExchange``: one all-to-all over the KVP group -> ``[kvp, B, H/N, Dv]``.
3. ``merge_attention_states``: exact rescale-and-sum -> ``[B, H/N, Dv]``.

``helix_decode`` runs 1-3 with HOP-B micro-batching.

Where it runs: inside vLLM on CPU, the plugin's backends (``patches_free_hooks``) call
this package for every step. Inside vLLM on CUDA none of it runs: the plugin picks one
of vLLM's own LSE-returning backends and vLLM's all-to-all DCP combine
(``patches_free_hooks/cuda_attention.py``; never run on a GPU). :mod:`.flashinfer_decode`
is a standalone CUDA decoder for direct use of this core, reached only by its tests
(which skip without CUDA): also never run on a GPU.
"""

from vllm_helix.attention.exchange import KVPExchange, PendingExchange
from vllm_helix.attention.hopb import helix_decode, micro_batch_bounds
from vllm_helix.attention.merge import merge_attention_states
from vllm_helix.attention.paged_decode import paged_decode, paged_decode_mla
from vllm_helix.attention.paged_extend import paged_extend

__all__ = [
    "KVPExchange",
    "PendingExchange",
    "helix_decode",
    "merge_attention_states",
    "micro_batch_bounds",
    "paged_decode",
    "paged_decode_mla",
    "paged_extend",
]
