"""The Helix all-to-all: per-rank partials for H/TPA heads -> exact outputs for H/N heads.

Every KVP rank holds, for the whole batch, a partial output and LSE for all
``H/TPA`` heads of its TPA slice, computed over its shard of the sequence. Rank
``k`` of the KVP group is responsible for the ``k``-th block of ``H/N`` of those
heads, so it sends block ``j`` to peer ``j`` and receives block ``k`` from every
peer: one ``all_to_all_single``. Volume per rank is ``batch x H/TPA x (D + 1)``
elements, independent of context length.

The LSE travels in the same message as the output (both packed as bytes), so the
exchange is one collective, not two; it is kept in float32 (float64 for float64
outputs) because a bf16 LSE would cost the combine its exactness.

Where the caller has a faster *all-gather* than the group's all-to-all (vLLM's
shared-memory collectives on CPU: about 10 us against gloo's 0.5 ms, measured
between two processes here), the exchange is that all-gather: every rank gathers
all ranks' messages and keeps the blocks addressed to it. It moves ``kvp`` times
the bytes (a few KB per step, whatever the context) and is synchronous, so
HOP-B's overlap then has nothing to hide; payloads travel as float32 (half-type
outputs are widened exactly; the merge accumulates in float32 anyway), float64
takes the all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from vllm_helix.attention.merge import accumulation_dtype, merge_attention_states


@dataclass
class PendingExchange:
    """An all-to-all in flight; :meth:`wait` completes it and combines exactly."""

    work: dist.Work | None
    received: torch.Tensor  # [kvp, bytes]: per-source packed (lse, out)
    batch: int
    heads: int
    head_dim: int
    out_dtype: torch.dtype
    lse_dtype: torch.dtype
    result_dtype: torch.dtype  # the dtype of the outputs handed in (the payload may be wider)

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [batch, heads, head_dim], lse [batch, heads])`` for this rank's heads."""
        if self.work is not None:
            self.work.wait()
        sources = self.received.shape[0]
        lse_bytes = self.batch * self.heads * self.lse_dtype.itemsize
        lses = self.received[:, :lse_bytes].contiguous().view(self.lse_dtype)
        outs = self.received[:, lse_bytes:].contiguous().view(self.out_dtype)
        out, lse = merge_attention_states(
            outs.view(sources, self.batch, self.heads, self.head_dim),
            lses.view(sources, self.batch, self.heads),
        )
        return out.to(self.result_dtype), lse


# (output [ranks * n], input [n]) -> None: a float32 all-gather over the KVP group.
AllGather = Callable[[torch.Tensor, torch.Tensor], None]


class KVPExchange:
    """All-to-all over one KVP group (gloo on CPU, NCCL on CUDA), or a faster all-gather where given."""

    def __init__(self, group: dist.ProcessGroup | None, kvp: int, all_gather: AllGather | None = None) -> None:
        if kvp > 1 and group is None:
            raise ValueError(f"kvp={kvp} needs a process group for the exchange")
        if group is not None and dist.get_world_size(group) != kvp:
            raise ValueError(
                f"KVP group has {dist.get_world_size(group)} ranks but kvp={kvp}"
            )
        self.group = group
        self.kvp = kvp
        self.all_gather = all_gather if kvp > 1 else None
        self.rank = dist.get_rank(group) if group is not None else 0

    def start(self, out: torch.Tensor, lse: torch.Tensor) -> PendingExchange:
        """Launch the exchange of ``out [batch, H_t, D]`` and ``lse [batch, H_t]`` (async)."""
        batch, heads, head_dim = out.shape
        if heads % self.kvp:
            raise ValueError(f"{heads} heads per TPA slice do not split over kvp={self.kvp}")
        per_rank = heads // self.kvp
        gathered = self.all_gather is not None and out.dtype != torch.float64
        result_dtype = out.dtype
        if gathered:
            out = out.float()
        lse_dtype = accumulation_dtype(out.dtype)
        # [kvp, batch, H/N, ...]: the block destined for each peer, contiguous.
        out_blocks = out.reshape(batch, self.kvp, per_rank, head_dim).transpose(0, 1)
        lse_blocks = lse.to(lse_dtype).reshape(batch, self.kvp, per_rank).transpose(0, 1)
        send = torch.cat(
            [
                lse_blocks.contiguous().view(self.kvp, -1).view(torch.uint8),
                out_blocks.contiguous().view(self.kvp, -1).view(torch.uint8),
            ],
            dim=1,
        )
        if self.kvp == 1:
            work, received = None, send
        elif gathered:
            assert self.all_gather is not None
            words = send.view(torch.float32).view(-1)
            everything = torch.empty(self.kvp * words.numel(), dtype=torch.float32)
            self.all_gather(everything, words)
            # [source, destination, message]: keep what every source addressed to this rank
            work, received = None, everything.view(self.kvp, self.kvp, -1)[:, self.rank].view(torch.uint8)
        else:
            received = torch.empty_like(send)
            work = dist.all_to_all_single(received, send, group=self.group, async_op=True)
        return PendingExchange(
            work=work,
            received=received,
            batch=batch,
            heads=per_rank,
            head_dim=head_dim,
            out_dtype=out.dtype,
            lse_dtype=lse_dtype,
            result_dtype=result_dtype,
        )
