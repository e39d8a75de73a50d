"""Many query tokens per sequence against a paged KV shard (prefill, chunked prefill, decode).

Under KV striping a causal query at position ``p`` may attend exactly the tokens
of its rank's shard that precede it, and those are a *prefix* of the shard
(:func:`vllm_helix.striping.visible_local_lengths`). So a prefill chunk is a
set of decodes over growing prefixes of the same shard. Running them one by one
(:func:`paged_decode` per token) re-reads the shard once per query token, which
is quadratic in bytes for long prompts. This kernel reads each sequence's shard
once and attends all of its query tokens to it with a prefix mask, in query
chunks that bound the score matrix. Returns the partial output and the natural
log-sum-exp; a token that sees nothing (``visible = 0``) gets zeros and ``-inf``.
On CPU (``kernel="auto"``, :mod:`~vllm_helix.attention.kernel_choice`) decode tokens
run on the C++ decode kernel and prefill chunks on torch's flash kernel, which
reads the shard once for all of a chunk's tokens; the plain-torch reference stays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_helix.attention.cpu_flash import DEFAULT_QUERY_CHUNK, flash_extend, flash_supported
from vllm_helix.attention.cpu_native import native_decode
from vllm_helix.attention.kernel_choice import Kernel, choose_kernel
from vllm_helix.attention.merge import accumulation_dtype
from vllm_helix.attention.paged_cache import read_sequence, row_groups

# A sequence with more query tokens than this in one call is a prefill chunk: under
# "auto" it goes to the flash kernel, which reads its shard once for all of them
# (the decode kernel would read it once per token).
NATIVE_MAX_ROW_TOKENS = 4


def paged_extend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    visible_lens: torch.Tensor,
    scale: float,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    kernel: Kernel = "auto",
    runs: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query token over the first ``visible_lens[t]`` tokens of its shard.

    Args:
        query: ``[tokens, num_heads, head_dim]``.
        key_cache / value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim(_v)]``.
        block_table: ``[tokens, max_blocks]``: each token's sequence row (tokens of one
            sequence are consecutive, as in vLLM's flattened batches).
        visible_lens: ``[tokens]`` shard tokens each query may see (0 allowed).
        scale: softmax scale.
        query_chunk: query tokens per score block (bounds the temporaries).
        kernel: ``"auto"``, ``"native"``, ``"flash"`` (CPU) or ``"reference"``.
        runs: the ``[start, end)`` runs of tokens that share a sequence, where the
            caller knows them (vLLM's ``query_start_loc``: once per step, not per
            layer); found by comparing ``block_table`` rows otherwise.

    Returns:
        ``(out [tokens, num_heads, head_dim_v]`` in the query's dtype,
        ``lse [tokens, num_heads]`` natural log in the accumulation dtype).
    """
    choice = choose_kernel(query, kernel, key_cache.shape[-1], value_cache.shape[-1])
    if choice == "flash":
        return flash_extend(query, key_cache, value_cache, block_table, visible_lens, scale, query_chunk, runs)
    if choice == "native":
        if kernel == "native" or not flash_supported(query, key_cache.shape[-1], value_cache.shape[-1]):
            return native_decode(query, key_cache, value_cache, block_table, visible_lens, scale)
        return _decode_native_prefill_flash(query, key_cache, value_cache, block_table, visible_lens, scale,
                                            query_chunk, row_groups(block_table) if runs is None else runs)
    tokens, num_heads, _ = query.shape
    acc = accumulation_dtype(query.dtype)
    head_dim_v = value_cache.shape[-1]
    out = torch.zeros(tokens, num_heads, head_dim_v, dtype=acc, device=query.device)
    lse = torch.full((tokens, num_heads), float("-inf"), dtype=acc, device=query.device)
    visible = visible_lens.to(torch.int64)
    for start, end in row_groups(block_table) if runs is None else runs:
        longest = int(visible[start:end].max())
        if longest == 0:
            continue
        keys = read_sequence(key_cache, block_table[start], longest).to(acc)  # [L, kv_heads, D]
        values = read_sequence(value_cache, block_table[start], longest).to(acc)
        num_kv_heads = keys.shape[1]
        group = num_heads // num_kv_heads
        keys_t = keys.permute(1, 2, 0)  # [kv_heads, D, L]
        values_h = values.transpose(0, 1)  # [kv_heads, L, Dv]
        positions = torch.arange(longest, device=query.device)
        for lo in range(start, end, query_chunk):
            hi = min(end, lo + query_chunk)
            q = query[lo:hi].to(acc).view(hi - lo, num_kv_heads, group, -1).transpose(0, 1)  # [kvh, t, g, D]
            scores = torch.matmul(q.flatten(1, 2), keys_t).view(num_kv_heads, hi - lo, group, longest) * scale
            hidden = positions[None, :] >= visible[lo:hi, None]  # [t, L]
            scores = scores.masked_fill(hidden[None, :, None, :], float("-inf"))
            chunk_lse = torch.logsumexp(scores, dim=-1)  # [kvh, t, g]; -inf where nothing is visible
            probs = torch.exp(scores - chunk_lse.clamp_min(torch.finfo(acc).min)[..., None])
            chunk_out = torch.matmul(probs.flatten(1, 2), values_h).view(num_kv_heads, hi - lo, group, head_dim_v)
            out[lo:hi] = chunk_out.transpose(0, 1).reshape(hi - lo, num_heads, head_dim_v)
            lse[lo:hi] = chunk_lse.transpose(0, 1).reshape(hi - lo, num_heads)
    return out.to(query.dtype), lse


def _decode_native_prefill_flash(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    visible_lens: torch.Tensor,
    scale: float,
    query_chunk: int,
    runs: Sequence[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode tokens on the C++ kernel, prefill chunks (> ``NATIVE_MAX_ROW_TOKENS`` tokens) on flash."""
    chunks = [(start, end) for start, end in runs if end - start > NATIVE_MAX_ROW_TOKENS]
    if not chunks:
        return native_decode(query, key_cache, value_cache, block_table, visible_lens, scale)
    tokens, heads, _ = query.shape
    out = torch.empty(tokens, heads, value_cache.shape[-1], dtype=query.dtype)
    lse = torch.empty(tokens, heads, dtype=accumulation_dtype(query.dtype))
    in_chunk = torch.zeros(tokens, dtype=torch.bool)
    for start, end in chunks:
        in_chunk[start:end] = True
        out[start:end], lse[start:end] = flash_extend(query[start:end], key_cache, value_cache,
                                                      block_table[start:end], visible_lens[start:end], scale,
                                                      query_chunk, [(0, end - start)])
    decode = (~in_chunk).nonzero().flatten()
    if decode.numel():
        out[decode], lse[decode] = native_decode(query[decode], key_cache, value_cache, block_table[decode],
                                                 visible_lens[decode], scale)
    return out, lse
