"""The TPF x EP grid of a MoE FFN layer: which rank holds what, in plain torch.

After Helix attention every one of the N = kvp * tpa ranks holds the full
hidden states of every token (the output projection all-reduces over N). The
FFN re-uses the same N ranks as a ``tpf x ep`` grid: rank ``r`` is in EP group
``r // tpf`` (it holds the routed experts of that group, a contiguous block of
``E / ep``) and at TPF position ``r % tpf`` (it holds the ``1/tpf`` slice of
those experts' intermediate dimension). Its partial output, the sum over the
tokens' routed experts it holds of ``w2[:, slice] @ act(w13[slice] @ x)``,
summed over all N ranks, is exactly the MoE output: each (expert, intermediate
slice) pair lives on exactly one rank, and the down projection is linear in the
intermediate dimension. So one all-reduce over N, the same one TP = N already
does, completes the layer; no all-to-all is needed because every rank already
has every token.

This module is the layout arithmetic and a reference implementation, free of
vLLM, used by the multi-process tests and the benchmark; the vLLM hook in
``patches_free_hooks/moe_grid_hook.py`` builds the same grid inside vLLM's fused MoE.
Weight layout follows vLLM's: ``w13 [E, 2I, H]`` (gate rows then up rows) and
``w2 [E, H, I]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def grid_position(rank: int, tpf: int, ep: int) -> tuple[int, int]:
    """``(tpf_rank, ep_rank)`` of ``rank`` in a ``tpf x ep`` grid: EP groups of ``tpf`` consecutive ranks.

    The one statement of the placement: :class:`GridShard` (the reference) and the
    vLLM hook (``patches_free_hooks.moe_grid_hook``) both ask it.
    """
    if not 0 <= rank < tpf * ep:
        raise ValueError(f"rank {rank} is outside a tpf={tpf} x ep={ep} grid")
    return rank % tpf, rank // tpf


@dataclass(frozen=True)
class GridShard:
    """What rank ``rank`` of a ``tpf x ep`` grid holds of a MoE layer."""

    rank: int
    tpf: int
    ep: int
    num_experts: int
    intermediate_size: int

    def __post_init__(self) -> None:
        grid_position(self.rank, self.tpf, self.ep)
        if self.num_experts % self.ep:
            raise ValueError(f"ep={self.ep} must divide the {self.num_experts} experts")
        if self.intermediate_size % self.tpf:
            raise ValueError(f"tpf={self.tpf} must divide the intermediate size {self.intermediate_size}")

    @property
    def tpf_rank(self) -> int:
        """Position inside the EP group: which intermediate slice this rank holds."""
        return grid_position(self.rank, self.tpf, self.ep)[0]

    @property
    def ep_rank(self) -> int:
        """EP group of this rank: which block of experts it holds."""
        return grid_position(self.rank, self.tpf, self.ep)[1]

    @property
    def experts(self) -> range:
        """Global ids of the routed experts held here (vLLM's linear placement)."""
        per = self.num_experts // self.ep
        return range(self.ep_rank * per, (self.ep_rank + 1) * per)

    @property
    def intermediate(self) -> slice:
        """The slice of each held expert's intermediate dimension held here."""
        per = self.intermediate_size // self.tpf
        return slice(self.tpf_rank * per, (self.tpf_rank + 1) * per)

    def expert_map(self) -> torch.Tensor:
        """``[E]`` int32: local index of each global expert, -1 where not held (vLLM's convention)."""
        mapping = torch.full((self.num_experts,), -1, dtype=torch.int32)
        mapping[self.experts.start:self.experts.stop] = torch.arange(len(self.experts), dtype=torch.int32)
        return mapping

    def take(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of full ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``."""
        experts, inter = slice(self.experts.start, self.experts.stop), self.intermediate
        size = self.intermediate_size
        gate = w13[experts, inter]
        up = w13[experts, size + inter.start:size + inter.stop]
        return torch.cat([gate, up], dim=1).contiguous(), w2[experts, :, inter].contiguous()

    def weight_bytes(self, hidden_size: int, element_size: int) -> int:
        """Bytes of routed-expert weights held here: ``3 * E/ep * I/tpf * H`` elements."""
        return 3 * len(self.experts) * (self.intermediate_size // self.tpf) * hidden_size * element_size


def moe_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiLU-gated MoE: ``sum_k weight_k * w2[e_k] @ (silu(gate) * up)``, ``e_k = topk_ids[:, k]``.

    With ``expert_map`` the weights are a rank's shard: global ids map to local
    ones and experts mapped to -1 contribute nothing (they live on another EP
    group). One expert at a time, no fused kernels: this is the ground truth
    the grid and vLLM's kernels are compared with.
    """
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=acc)
    inter = w13.shape[1] // 2
    ids = topk_ids.long() if expert_map is None else expert_map.long()[topk_ids.long()]
    for local in range(w13.shape[0]):
        tokens, slots = torch.nonzero(ids == local, as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens].to(acc) @ w13[local].to(acc).t()
        act = F.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tokens, (act @ w2[local].to(acc).t()) * topk_weights[tokens, slots, None].to(acc))
    return out.to(x.dtype)
