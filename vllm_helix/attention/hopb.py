"""Helix decode with HOP-B: the exchange of micro-batch i overlaps the attention of i+1.

Without overlap a decode step is ``attention(batch)`` then ``exchange(batch)``:
the all-to-all is fully exposed. HOP-B cuts the batch into ``hopb`` micro-batches
and launches each one's all-to-all asynchronously as soon as its local attention
is done, so communication hides behind the next micro-batch's compute; the
combine of micro-batch i runs once micro-batch i+1's exchange is in flight.
Requests are independent, so the result is the same as without overlap.

Each hop runs inside a ``helix/...`` profiler range
(:func:`vllm_helix.profiling.hop`: opened only while a profiler records), which
``benchmarks/decode_step_profile.py`` reads.
"""

from __future__ import annotations

from typing import Callable

import torch

from vllm_helix.attention.exchange import KVPExchange, PendingExchange
from vllm_helix.profiling import hop

# (query, block_table, seq_lens) -> (partial out, lse) over this rank's KV shard
ShardDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def micro_batch_bounds(batch: int, micro_batches: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal ``[start, end)`` slices; never an empty one."""
    if micro_batches < 1:
        raise ValueError(f"hopb={micro_batches} must be >= 1 (1 turns the overlap off)")
    count = min(micro_batches, batch)
    if count == 0:
        return []
    edges = [round(i * batch / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def helix_decode(
    decode: ShardDecode,
    query: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    exchange: KVPExchange,
    hopb: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention for this rank's ``H/N`` heads from its KV shard.

    Args:
        decode: local paged decode over this rank's shard (torch or FlashInfer).
        query: ``[batch, H/TPA, dim]`` queries of this rank's TPA head slice.
        block_table: ``[batch, max_blocks]`` this rank's block table.
        seq_lens: ``[batch]`` tokens of each sequence stored on this rank.
        exchange: the KVP group's all-to-all.
        hopb: micro-batches to overlap (1 = no overlap).

    Returns:
        ``(out [batch, H/N, dim_v], lse [batch, H/N])``: exact attention over the
        whole sequence for the heads this rank owns after the all-to-all.
    """
    finished: list[tuple[torch.Tensor, torch.Tensor]] = []
    in_flight: PendingExchange | None = None
    for start, end in micro_batch_bounds(query.shape[0], hopb):
        with hop("helix/shard_attention"):
            out, lse = decode(query[start:end], block_table[start:end], seq_lens[start:end])
        with hop("helix/exchange_launch"):
            launched = exchange.start(out, lse)
        if in_flight is not None:  # had this micro-batch's compute time to finish
            with hop("helix/exchange_wait_merge"):
                finished.append(in_flight.wait())
        in_flight = launched
    if in_flight is None:  # empty batch
        heads = query.shape[1] // exchange.kvp
        empty = decode(query, block_table, seq_lens)
        return empty[0][:, :heads], empty[1][:, :heads]
    with hop("helix/exchange_wait_merge"):
        finished.append(in_flight.wait())
    return torch.cat([o for o, _ in finished]), torch.cat([l for _, l in finished])
