"""Where each KV token lives under KV parallelism.

Tokens are dealt to the KVP ranks round-robin in stripes of ``stripe`` tokens:
token ``p`` belongs to stripe ``s = p // stripe``, which lives on rank
``s % kvp`` at local position ``(s // kvp) * stripe + p % stripe``. So the shards
grow evenly (any two ranks' token counts for a sequence differ by at most one
stripe), every decode append goes to exactly one rank, and a shard is a plain
prefix-ordered sequence that an ordinary paged decode kernel can read.

Block tables. When ``stripe`` divides ``block_size``, local block ``j`` of every
rank holds exactly the tokens of global positions
``[j * block_size * kvp, (j + 1) * block_size * kvp)`` that the rank owns. So one
vLLM-style block table, whose blocks each cover ``block_size * kvp`` tokens of a
sequence, serves all ranks unchanged: block id ``b`` names physical block ``b``
in every rank's cache, each holding that rank's share. This is what multiplies
the context a fixed amount of memory holds by ``kvp``, and it is the same
convention as vLLM's decode-context-parallel slot mapping (with
``cp_kv_cache_interleave_size = stripe``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVStriping:
    """Stripe arithmetic for one KVP group."""

    kvp: int
    stripe: int
    block_size: int

    def __post_init__(self) -> None:
        if self.kvp < 1 or self.stripe < 1 or self.block_size < 1:
            raise ValueError(
                f"kvp, stripe and block_size must be positive, got kvp={self.kvp}, "
                f"stripe={self.stripe}, block_size={self.block_size}"
            )
        if self.block_size % self.stripe:
            raise ValueError(
                f"stripe={self.stripe} must divide block_size={self.block_size} so a block "
                f"holds whole stripes of one rank"
            )

    @property
    def tokens_per_global_block(self) -> int:
        """Sequence tokens covered by one block-table entry (``block_size * kvp``)."""
        return self.block_size * self.kvp

    # ---------------------------------------------------------- token placement
    def owner(self, positions: torch.Tensor) -> torch.Tensor:
        """KVP rank that stores each token position."""
        return (positions // self.stripe) % self.kvp

    def local_position(self, positions: torch.Tensor) -> torch.Tensor:
        """Position of each token inside its owner's shard of the sequence."""
        stripe_index = positions // self.stripe
        return (stripe_index // self.kvp) * self.stripe + positions % self.stripe

    def local_lengths(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Tokens of each sequence stored on each rank: ``[kvp, batch]``.

        A rank with no token of a sequence (a sequence shorter than its first
        stripe on that rank) gets 0: an empty shard.
        """
        seq_lens = seq_lens.to(torch.int64)
        full_stripes = seq_lens // self.stripe
        remainder = seq_lens % self.stripe
        ranks = torch.arange(self.kvp, dtype=torch.int64, device=seq_lens.device)[:, None]
        # Stripes k, k+kvp, ... below full_stripes belong to rank k.
        full_on_rank = torch.clamp(full_stripes[None, :] - ranks + self.kvp - 1, min=0) // self.kvp
        partial_on_rank = (full_stripes[None, :] % self.kvp == ranks) * remainder[None, :]
        return full_on_rank * self.stripe + partial_on_rank

    def blocks_needed(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Block-table entries each sequence needs (the same on every rank)."""
        per_block = self.tokens_per_global_block
        return (seq_lens.to(torch.int64) + per_block - 1) // per_block

    # ------------------------------------------------------------ vLLM views
    def slot_mapping(
        self,
        positions: torch.Tensor,
        block_table: torch.Tensor,
        request_index: torch.Tensor,
        rank: int,
    ) -> torch.Tensor:
        """Cache slots on ``rank`` for new tokens; -1 where another rank owns the token.

        Args:
            positions: ``[num_tokens]`` sequence positions of the tokens to write.
            block_table: ``[num_requests, max_blocks]`` global block table.
            request_index: ``[num_tokens]`` row of ``block_table`` for each token.
            rank: this rank's index in the KVP group.

        -1 is the padding slot that vLLM's ``reshape_and_cache`` kernels skip, so
        a rank writes exactly the tokens it owns.
        """
        local = self.local_position(positions)
        block_ids = block_table[request_index, local // self.block_size].to(torch.int64)
        slots = block_ids * self.block_size + local % self.block_size
        return torch.where(self.owner(positions) == rank, slots, torch.full_like(slots, -1))


def query_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Request row and sequence position of every query token of a ragged batch.

    vLLM's metadata gives, per request, where its query tokens start in the
    flattened batch (``query_start_loc``, ``[num_requests + 1]``) and the
    sequence length *after* this step (``seq_lens``): the last
    ``query_len`` positions of each sequence are this step's queries (a decode
    has one, a prefill chunk many). Returns ``(rows, positions)``, both
    ``[num_tokens]`` int64.
    """
    query_start_loc = query_start_loc.to(torch.int64)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    rows = torch.repeat_interleave(torch.arange(query_lens.numel()), query_lens)
    first = seq_lens.to(torch.int64)[: query_lens.numel()] - query_lens
    offsets = torch.arange(int(query_start_loc[-1] - query_start_loc[0])) - (query_start_loc[rows] - query_start_loc[0])
    return rows, first[rows] + offsets


def visible_local_lengths(striping: KVStriping, positions: torch.Tensor, rank: int) -> torch.Tensor:
    """Tokens on ``rank`` that a query at each position may attend (causal: keys <= position).

    A shard stores its tokens in sequence order, so the keys a causal query may
    see on one rank are a *prefix* of that rank's shard: the local length of a
    sequence cut after the query's own position. This turns prefill (many
    queries per sequence) into independent decodes, one per query token, each
    over a prefix of the shard: no mask, and the same exact combine.
    """
    return striping.local_lengths(positions.to(torch.int64) + 1)[rank]
