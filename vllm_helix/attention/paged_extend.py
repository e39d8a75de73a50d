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
As :func:`~vllm_helix.attention.paged_decode.paged_decode`, it runs on torch's CPU
flash kernel by default (``kernel="auto"``) and keeps the plain-torch reference.
"""

from __future__ import annotations

import torch

from vllm_helix.attention.cpu_flash import DEFAULT_QUERY_CHUNK, Kernel, flash_extend, use_flash
from vllm_helix.attention.merge import accumulation_dtype
from vllm_helix.attention.paged_cache import read_sequence, row_groups


def paged_extend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    visible_lens: torch.Tensor,
    scale: float,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    kernel: Kernel = "auto",
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
        kernel: ``"auto"``, ``"flash"`` (CPU) or ``"reference"``.

    Returns:
        ``(out [tokens, num_heads, head_dim_v]`` in the query's dtype,
        ``lse [tokens, num_heads]`` natural log in the accumulation dtype).
    """
    if use_flash(query, kernel, key_cache.shape[-1], value_cache.shape[-1]):
        return flash_extend(query, key_cache, value_cache, block_table, visible_lens, scale, query_chunk)
    tokens, num_heads, _ = query.shape
    acc = accumulation_dtype(query.dtype)
    head_dim_v = value_cache.shape[-1]
    out = torch.zeros(tokens, num_heads, head_dim_v, dtype=acc, device=query.device)
    lse = torch.full((tokens, num_heads), float("-inf"), dtype=acc, device=query.device)
    visible = visible_lens.to(torch.int64)
    for start, end in row_groups(block_table):
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
