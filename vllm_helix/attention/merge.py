"""The exact combine of partial attention states.

Attention over a sequence split into shards is recovered exactly from each
shard's normalised output ``o_s`` and log-sum-exp ``lse_s`` (natural log):

    lse = log(sum_s exp(lse_s)),      o = sum_s exp(lse_s - lse) * o_s

computed with the running maximum subtracted so nothing overflows. An empty shard
has ``lse_s = -inf`` and weight exactly 0; a row whose shards are all empty yields
zeros and ``-inf`` rather than the NaN a naive ``0/0`` would give.
"""

from __future__ import annotations

import torch


# The dtypes both CPU kernels (torch's flash kernel, the C++ decode kernel) run.
CPU_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 stays float64: the combine never loses precision."""
    return torch.promote_types(dtype, torch.float32)


def merge_attention_states(
    outputs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``S`` partial attention states into the exact result.

    Args:
        outputs: ``[S, T, H, D]`` per-shard normalised attention outputs.
        lses: ``[S, T, H]`` per-shard log-sum-exp of the scaled scores (natural log).

    Returns:
        ``(out [T, H, D], lse [T, H])`` in the dtypes of ``outputs`` and ``lses``,
        accumulated in float32 (float64 for float64 inputs).

    A decode step calls this once per layer for a handful of rows, so it is
    written as few elementwise operations as the formula allows (no ``einsum``,
    no masks: empty rows come out right from ``log(0)`` and a clamped divisor).
    """
    if outputs.dim() != 4 or lses.shape != outputs.shape[:3]:
        raise ValueError(
            f"expected outputs [S, T, H, D] and lses [S, T, H], got "
            f"{tuple(outputs.shape)} and {tuple(lses.shape)}"
        )
    acc = accumulation_dtype(torch.promote_types(outputs.dtype, lses.dtype))
    lse = lses.to(acc)
    # An all-empty row has max -inf; shift by 0 there so its weights are exp(-inf) = 0.
    shift = lse.amax(dim=0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    weights = (lse - shift).exp_()
    # >= 1 where any shard is non-empty (the largest weight is exp(0)), 0 where all are.
    total = weights.sum(dim=0)
    merged = (weights.unsqueeze(-1) * outputs.to(acc)).sum(dim=0)
    # Dividing by max(total, tiny) leaves non-empty rows alone and keeps an empty row's 0 (not 0/0).
    merged = merged.div_(total.clamp_min(torch.finfo(acc).tiny).unsqueeze(-1))
    # log(0) = -inf for an empty row (its shift is 0): no special case needed.
    merged_lse = total.log_().add_(shift)
    return merged.to(outputs.dtype), merged_lse.to(lses.dtype)
