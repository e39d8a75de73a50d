"""Per-shard decode attention over a paged KV cache, returning the log-sum-exp.

Three kernels behind one call (``kernel=``, :mod:`~vllm_helix.attention.kernel_choice`):
``"reference"``, written in plain torch ops for any device, accumulating in float32
(float64 for float64 inputs): the reference every faster kernel is tested against;
``"native"``, the C++ decode kernel (:mod:`~vllm_helix.attention.cpu_native`), the
CPU path for GQA; and ``"flash"``, torch's fused CPU flash-attention kernel over
views of the cache (:mod:`~vllm_helix.attention.cpu_flash`), the CPU path for MLA's
576-dim latent, where it measured faster. ``"auto"`` (the default) picks those. All return the
natural-log LSE that the Helix combine needs. A sequence whose shard is empty (local length 0) returns zeros and
``lse = -inf``, so it weighs nothing in the combine.

Cache layouts follow vLLM:
    GQA/MHA: K and V ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    MLA: one latent cache ``[num_blocks, block_size, kv_lora_rank + rope_dim]``;
    the query is the absorbed query ``[batch, heads, kv_lora_rank + rope_dim]``
    (``q_nope @ W_UK`` next to ``q_pe``) and the values are the first
    ``kv_lora_rank`` latent dims, so MLA decode is MQA with a 576-dim key and a
    512-dim value.
"""

from __future__ import annotations

import torch

from vllm_helix.attention.cpu_flash import flash_extend
from vllm_helix.attention.cpu_native import native_decode
from vllm_helix.attention.kernel_choice import Kernel, choose_kernel
from vllm_helix.attention.merge import accumulation_dtype
from vllm_helix.attention.paged_cache import read_sequence


def _decode(
    query: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    read_kv,
    head_dim_v: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode each sequence on its own, reading exactly its tokens.

    One sequence at a time, rather than a padded batch, makes every result
    independent of what else is in the batch (bitwise: HOP-B micro-batching
    cannot change a number) and never touches a slot past a sequence's end.
    ``read_kv(block_row, length)`` returns ``(keys, values)`` as
    ``[length, kv_heads, dim]``.
    """
    batch, num_heads, _ = query.shape
    acc = accumulation_dtype(query.dtype)
    out = torch.zeros(batch, num_heads, head_dim_v, dtype=acc, device=query.device)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=acc, device=query.device)
    for row, length in enumerate(seq_lens.tolist()):
        if length == 0:  # empty shard: weight 0 in the combine
            continue
        keys, values = read_kv(block_table[row], length)
        num_kv_heads = keys.shape[1]
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
        # [kv_heads, group, dim] x [kv_heads, dim, len] -> [kv_heads, group, len]
        q = query[row].to(acc).view(num_kv_heads, num_heads // num_kv_heads, -1)
        scores = torch.matmul(q, keys.to(acc).permute(1, 2, 0)) * scale
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse[..., None])
        out[row] = torch.matmul(probs, values.to(acc).transpose(0, 1)).reshape(num_heads, head_dim_v)
        lse[row] = row_lse.reshape(num_heads)
    return out.to(query.dtype), lse


def paged_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kernel: Kernel = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence against its paged KV shard.

    Args:
        query: ``[batch, num_heads, head_dim]``.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim_v]``.
        block_table: ``[batch, max_blocks]`` block ids of each sequence's shard.
        seq_lens: ``[batch]`` tokens of each sequence in this shard (may be 0).
        scale: softmax scale applied to ``q . k``.
        kernel: ``"auto"``, ``"native"``, ``"flash"`` (CPU) or ``"reference"`` (see the module docstring).

    Returns:
        ``(out [batch, num_heads, head_dim_v]`` in the query's dtype,
        ``lse [batch, num_heads]`` natural log in the accumulation dtype).
        Query head ``h`` attends KV head ``h // (num_heads // num_kv_heads)``.
    """
    choice = choose_kernel(query, kernel, key_cache.shape[-1], value_cache.shape[-1])
    # A decode is an extend with one query token per sequence that sees its whole shard.
    if choice == "native":
        return native_decode(query, key_cache, value_cache, block_table, seq_lens, scale)
    if choice == "flash":
        return flash_extend(query, key_cache, value_cache, block_table, seq_lens, scale)

    def read_kv(block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_sequence(key_cache, block_row, length), read_sequence(
            value_cache, block_row, length
        )

    return _decode(query, block_table, seq_lens, scale, read_kv, value_cache.shape[-1])


def paged_decode_mla(
    query: torch.Tensor,
    latent_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    kernel: Kernel = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decode with the absorbed query: returns ``([batch, heads, kv_lora_rank], lse)``.

    Args:
        query: ``[batch, num_heads, kv_lora_rank + rope_dim]`` absorbed query.
        latent_cache: ``[num_blocks, block_size, kv_lora_rank + rope_dim]``.
        kv_lora_rank: latent dims that double as the value (512 for DeepSeek).
        kernel: ``"auto"``, ``"native"``, ``"flash"`` (CPU) or ``"reference"`` (see the module docstring).
    """
    if query.shape[-1] != latent_cache.shape[-1]:
        raise ValueError(
            f"absorbed query dim {query.shape[-1]} != latent cache dim {latent_cache.shape[-1]}"
        )
    choice = choose_kernel(query, kernel, latent_cache.shape[-1], latent_cache.shape[-1])
    if kernel == "auto" and choice == "native":
        # For the 576-dim latent torch's flash kernel (AVX-512 GEMM tiles) reads contiguous runs
        # faster than the C++ kernel's AVX2 tiles (benchmarks/results/shard_kernels_cpu.md).
        choice = "flash"
    if choice == "native":  # the latent is the one KV head; its first kv_lora_rank dims the value
        latent = latent_cache.unsqueeze(2)
        return native_decode(query, latent, latent[..., :kv_lora_rank], block_table, seq_lens, scale)
    if choice == "flash":
        # The latent is the one KV head and, whole, the value: its first kv_lora_rank
        # output dims are the MLA output (the rope dims' share is computed and dropped).
        latent = latent_cache.unsqueeze(2)
        out, lse = flash_extend(query, latent, latent, block_table, seq_lens, scale)
        return out[..., :kv_lora_rank].contiguous(), lse

    def read_kv(block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # One latent KV head shared by every query head; read once, used as K and V.
        latent = read_sequence(latent_cache, block_row, length).unsqueeze(1)
        return latent, latent[..., :kv_lora_rank]

    return _decode(query, block_table, seq_lens, scale, read_kv, kv_lora_rank)
