"""Rank grids of a Helix instance and the torch.distributed groups over them.

Attention runs on a KVP x TPA grid. Ranks of one TPA slice are consecutive
(``rank = tpa_index * kvp + kvp_index``), like vLLM's decode-context-parallel
groups, so the KVP group of a slice is a contiguous run of ranks. With this order
the all-to-all leaves rank ``r`` holding query heads ``[r*H/N, (r+1)*H/N)``:
exactly the head shard that a row-parallel output projection with TP=N expects,
so nothing is permuted between attention and the FFN.

The FFN's TPF x EP grid over the same ranks is built by the MoE hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist

from vllm_helix.config import HelixConfig


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in both grids."""

    rank: int
    tpa_index: int
    kvp_index: int


@dataclass(frozen=True)
class HelixLayout:
    """The pure arithmetic of a Helix rank grid (no process groups)."""

    kvp: int
    tpa: int

    @classmethod
    def from_config(cls, config: HelixConfig) -> "HelixLayout":
        return cls(kvp=config.kvp, tpa=config.tpa)

    @property
    def world_size(self) -> int:
        return self.kvp * self.tpa

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a Helix world of {self.world_size} ranks")
        return RankCoords(
            rank=rank,
            tpa_index=rank // self.kvp,
            kvp_index=rank % self.kvp,
        )

    def kvp_groups(self) -> list[list[int]]:
        """Ranks that share a TPA head slice and split its KV along the sequence."""
        return [[t * self.kvp + k for k in range(self.kvp)] for t in range(self.tpa)]

    def query_heads(self, rank: int, num_heads: int) -> range:
        """Query heads this rank computes attention for (its TPA slice, all KVP shards)."""
        per_slice = num_heads // self.tpa
        start = self.coords(rank).tpa_index * per_slice
        return range(start, start + per_slice)

    def output_heads(self, rank: int, num_heads: int) -> range:
        """Query heads whose exact output this rank holds after the all-to-all."""
        per_rank = num_heads // self.world_size
        return range(rank * per_rank, (rank + 1) * per_rank)

    def kv_heads(self, rank: int, num_kv_heads: int) -> range:
        """KV heads whose cache this rank stores (a shard of their sequence)."""
        per_slice = num_kv_heads // self.tpa
        start = self.coords(rank).tpa_index * per_slice
        return range(start, start + per_slice)


@dataclass(frozen=True)
class HelixGroups:
    """This rank's process groups, built over a global rank list."""

    layout: HelixLayout
    coords: RankCoords
    kvp_group: dist.ProcessGroup


def build_helix_groups(
    layout: HelixLayout,
    global_ranks: Sequence[int],
    backend: str | None = None,
) -> HelixGroups:
    """Create the KVP groups of a Helix instance and return this rank's.

    ``global_ranks[i]`` is the torch.distributed rank playing Helix rank ``i``, so a
    Helix instance can live inside a larger world (several instances, or vLLM's
    own world). Every process of the default group must call this with the same
    arguments: ``new_group`` is collective over the default group.
    """
    if len(global_ranks) != layout.world_size:
        raise ValueError(
            f"a kvp={layout.kvp} x tpa={layout.tpa} layout needs {layout.world_size} "
            f"ranks, got {len(global_ranks)}: {list(global_ranks)}"
        )
    if len(set(global_ranks)) != len(global_ranks):
        raise ValueError(f"duplicate ranks in {list(global_ranks)}")
    me = dist.get_rank()
    mine: dist.ProcessGroup | None = None
    for helix_ranks in layout.kvp_groups():
        ranks = [global_ranks[r] for r in helix_ranks]
        group = dist.new_group(ranks, backend=backend)
        if me in ranks:
            mine = group
    if mine is None:
        raise ValueError(f"process rank {me} is not among the Helix ranks {list(global_ranks)}")
    return HelixGroups(
        layout=layout,
        coords=layout.coords(list(global_ranks).index(me)),
        kvp_group=mine,
    )
