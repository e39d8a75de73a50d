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
all ranks' partials, unpacked, and reads the heads it owns. It moves ``kvp`` times
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

# () -> (outs [kvp, batch, H/N, D], lses [kvp, batch, H/N]): what every source sent this rank.
Partials = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PendingExchange:
    """An exchange in flight; :meth:`wait` completes it and combines exactly."""

    work: dist.Work | None
    partials: Partials  # read once ``work`` is done
    result_dtype: torch.dtype  # the dtype of the outputs handed in (the payload may be wider)

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [batch, heads, head_dim], lse [batch, heads])`` for this rank's heads."""
        if self.work is not None:
            self.work.wait()
        out, lse = merge_attention_states(*self.partials())
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
        if self.all_gather is not None and out.dtype != torch.float64:
            return self._start_gathered(out, lse)
        per_rank = heads // self.kvp
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
        else:
            received = torch.empty_like(send)
            work = dist.all_to_all_single(received, send, group=self.group, async_op=True)
        lse_bytes = batch * per_rank * lse_dtype.itemsize

        def partials() -> tuple[torch.Tensor, torch.Tensor]:
            lses = received[:, :lse_bytes].contiguous().view(lse_dtype)
            outs = received[:, lse_bytes:].contiguous().view(out.dtype)
            return (outs.view(self.kvp, batch, per_rank, head_dim), lses.view(self.kvp, batch, per_rank))

        return PendingExchange(work=work, partials=partials, result_dtype=out.dtype)

    def _start_gathered(self, out: torch.Tensor, lse: torch.Tensor) -> PendingExchange:
        """Every rank gathers every rank's whole ``[lse | out]`` (float32) and keeps its own heads.

        Gathering the partials as they are (no per-destination packing) leaves two
        copies per step: the message and the gather; the receiver reads its heads
        through strided views.
        """
        assert self.all_gather is not None
        batch, heads, head_dim = out.shape
        per_rank = heads // self.kvp
        send = torch.cat([lse.reshape(-1).float(), out.reshape(-1).float()])
        everything = torch.empty(self.kvp * send.numel(), dtype=torch.float32)
        self.all_gather(everything, send)
        sources = everything.view(self.kvp, -1)
        lse_words = batch * heads
        # [source, batch, destination, H/N(, D)] -> this rank's column of heads
        lses = sources[:, :lse_words].view(self.kvp, batch, self.kvp, per_rank)[:, :, self.rank]
        outs = sources[:, lse_words:].view(self.kvp, batch, self.kvp, per_rank, head_dim)[:, :, self.rank]
        return PendingExchange(work=None, partials=lambda: (outs, lses), result_dtype=out.dtype)
