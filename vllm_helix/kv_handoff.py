"""One sequence's KV cache in a canonical, token-ordered form, and the moves into and out of paged caches.

A prefill engine and a Helix decode engine (issue 15) store the same tokens
differently: vLLM's CPU attention packs each (block, KV head) region in an
ISA-dependent order (K as ``[D, block_size]`` then V as ``[block_size, D]`` for
its AVX kernels, VNNI groups for AMX), the plugin's Helix caches hold one
``K | V`` row per token, MLA caches one 576-wide latent row per token; and under
Helix a rank holds only its stripes of the sequence, at local slots. Moving
bytes between two of them directly is silently wrong. So every move goes
through one form:

    canonical: ``[tokens, kv_heads, row]``, token ``t`` is sequence position ``t``,
    row = ``K | V`` (GQA, ``Dk + Dv``) or the latent (MLA: one head, 576).

Two pieces describe a cache:

* :class:`BlockLayout`, where a token's row sits inside one (block, head) region:
  token-major (Helix, MLA) or any fixed permutation of the region (vLLM's CPU
  packing, learned from vLLM's own kernel by ``patches_free_hooks``, so no ISA's
  packing is transcribed here);
* :class:`~vllm_helix.striping.KVStriping` plus one block-table row: which tokens
  a rank holds and at which slots. A plain (non-Helix) engine is ``kvp = 1`` with
  the stripe equal to the block size.

Pure torch: nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_helix.striping import KVStriping


@dataclass(frozen=True)
class BlockLayout:
    """Where each token's row lives inside one (block, KV head) region of ``block_size * row`` elements.

    ``order`` is ``None`` for token-major regions (row ``n`` at ``[n * row, (n + 1) * row)``).
    Otherwise ``order[n * row + e]`` is the region offset of element ``e`` of token ``n``'s
    row: a permutation of ``range(block_size * row)``.
    """

    block_size: int
    row: int
    order: torch.Tensor | None = None

    def __post_init__(self) -> None:
        size = self.block_size * self.row
        if self.order is not None and not torch.equal(torch.sort(self.order.flatten()).values,
                                                      torch.arange(size, dtype=self.order.dtype)):
            raise ValueError(f"order must be a permutation of the {size} offsets of a "
                             f"{self.block_size} x {self.row} block region")

    def check(self, cache: torch.Tensor) -> None:
        """``cache`` must be a contiguous ``[blocks, kv_heads, block_size, row]`` tensor."""
        if cache.dim() != 4 or cache.shape[2] != self.block_size or cache.shape[3] != self.row:
            raise ValueError(f"expected a [blocks, kv_heads, {self.block_size}, {self.row}] cache, "
                             f"got {list(cache.shape)}")
        if not cache.is_contiguous():
            raise ValueError("the cache must be contiguous (vLLM's per-layer caches are)")

    def _flat_index(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``[n, heads, row]`` offsets into ``cache.view(-1)`` of the rows of the tokens at ``slots``."""
        self.check(cache)
        slots = slots.to(torch.int64)
        within = (slots % self.block_size)[:, None] * self.row + torch.arange(self.row)
        if self.order is not None:
            within = self.order.to(torch.int64).flatten()[within]
        region = self.block_size * self.row
        heads = torch.arange(cache.shape[1])
        starts = ((slots // self.block_size)[:, None] * cache.shape[1] + heads) * region  # [n, heads]
        return starts[:, :, None] + within[:, None, :]

    def read(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows of the tokens at ``slots`` (block ``s // block_size``, offset ``s % block_size``): ``[n, heads, row]``."""
        index = self._flat_index(cache, slots)  # checks the cache first
        return cache.view(-1)[index]

    def write(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store ``rows [n, heads, row]`` at ``slots`` (the inverse of :meth:`read`)."""
        index = self._flat_index(cache, slots)
        cache.view(-1)[index] = rows.to(cache.dtype)


def rank_tokens(striping: KVStriping, block_row: torch.Tensor, length: int,
                rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions among ``[0, length)`` that ``rank`` holds, and their slots in its cache.

    Slots are :meth:`KVStriping.slot_mapping`'s, i.e. exactly where the engine's
    own KV writes put those tokens.
    """
    positions = torch.arange(length, dtype=torch.int64)
    slots = striping.slot_mapping(positions, block_row[None, :], torch.zeros_like(positions), rank)
    mine = slots >= 0
    return positions[mine], slots[mine]


def gather_sequence(caches: Sequence[torch.Tensor], layout: BlockLayout, striping: KVStriping,
                    block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The canonical ``[length, heads, row]`` of a sequence held by the KVP ranks' ``caches`` (rank order)."""
    if len(caches) != striping.kvp:
        raise ValueError(f"{len(caches)} caches for a KVP group of {striping.kvp}")
    out = torch.empty(length, caches[0].shape[1], layout.row, dtype=caches[0].dtype)
    for rank, cache in enumerate(caches):
        positions, slots = rank_tokens(striping, block_row, length, rank)
        out[positions] = layout.read(cache, slots)
    return out


def scatter_sequence(canonical: torch.Tensor, caches: Sequence[torch.Tensor], layout: BlockLayout,
                     striping: KVStriping, block_row: torch.Tensor) -> None:
    """Write the canonical ``[length, heads, row]`` into the KVP ranks' ``caches``, each rank its stripes."""
    if len(caches) != striping.kvp:
        raise ValueError(f"{len(caches)} caches for a KVP group of {striping.kvp}")
    for rank, cache in enumerate(caches):
        positions, slots = rank_tokens(striping, block_row, canonical.shape[0], rank)
        layout.write(cache, slots, canonical[positions])


def tp_kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The KV heads vLLM gives TP rank ``tp_rank``: a slice when ``tp_size <= num_kv_heads``, else one
    head held by ``tp_size / num_kv_heads`` consecutive ranks (vLLM runs Helix as TP = N, so this is
    a Helix rank's heads too: its TPA slice's)."""
    if tp_size <= num_kv_heads:
        per_rank = num_kv_heads // tp_size
        return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    head = tp_rank // (tp_size // num_kv_heads)
    return range(head, head + 1)
