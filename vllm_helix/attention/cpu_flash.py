"""Per-shard attention on CPU through torch's fused flash-attention kernel, LSE included.

The reference kernels (:mod:`~vllm_helix.attention.paged_decode`,
:mod:`~vllm_helix.attention.paged_extend`) gather a shard's blocks into a copy
and run scores, softmax and the value product as separate passes. On CPU that
is several times slower than the memory read it has to do: MKL's small-M GEMM
with a transposed operand, the gather copy and the softmax temporaries dominate.
``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` is one tiled
pass over K and V that returns the natural-log LSE Helix needs, and it takes
strided K/V, so:

* **no copy for contiguous blocks.** A run of consecutive block ids (a prompt or
  a prefill chunk allocated at once; ascending, or descending as vLLM hands back
  a freed request's blocks) is a strided *view* of the cache; only the blocks
  between such runs are gathered, into reused memory (:class:`GatherArena`).
  The pieces are combined with the exact merge.
* **GQA without expanding K/V.** The ``H / Hkv`` query heads of a KV head are
  laid out as extra query rows of that head (and MLA's heads as rows of its one
  latent head, with the latent itself as the value: the first ``kv_lora_rank``
  output dims are the MLA output).
* **prefixes without a dense mask.** A query token sees a prefix of its shard
  (:func:`vllm_helix.striping.visible_local_lengths`). Of a chunk of query
  tokens, the keys every token sees run unmasked; only the ragged edge between
  the shortest and the longest prefix gets an additive mask.

Partial results (pieces x {shared prefix, ragged edge}) are combined by
:func:`~vllm_helix.attention.merge.merge_attention_states`, exactly. Rows that
see nothing get zeros and ``lse = -inf`` (the kernel itself would report 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vllm_helix.attention.merge import CPU_KERNEL_DTYPES, accumulation_dtype, merge_attention_states
from vllm_helix.attention.paged_cache import row_groups

# Query tokens per kernel call: bounds the ragged-edge mask ([chunk * group, chunk / kvp]).
DEFAULT_QUERY_CHUNK = 256
# Shorter runs of consecutive blocks are gathered rather than attended as views:
# a kernel call per 1-3 blocks costs more than copying them.
MIN_VIEW_BLOCKS = 4


PartialState = tuple[torch.Tensor, torch.Tensor]  # (out [T, H, Dv], lse [T, H])


def flash_supported(query: torch.Tensor, key_dim: int, value_dim: int) -> bool:
    """True when torch's CPU flash kernel can run this query: a CPU float tensor, equal key and value dims.

    (MLA passes its latent as both key and value.)
    """
    return (
        query.device.type == "cpu"
        and query.dtype in CPU_KERNEL_DTYPES
        and key_dim == value_dim
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


class GatherArena:
    """Reused memory for gathered blocks.

    A fresh multi-megabyte CPU allocation is page-faulted on first touch, which
    costs several times the copy itself (75 MB of latent blocks: about 50 ms
    into new memory, 8 ms into memory already touched, on this project's CPU
    machine). Gathers go into one retained buffer per dtype instead, handed out
    front to back and rewound per sequence; buffers above ``max_retained_bytes``
    are not kept.
    """

    def __init__(self, max_retained_bytes: int = 256 << 20) -> None:
        self.max_retained_bytes = max_retained_bytes
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._used: dict[torch.dtype, int] = {}

    def rewind(self) -> None:
        """Make the whole buffer available again (earlier gathers must no longer be in use)."""
        self._used.clear()

    def gather(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``cache[blocks]`` (blocks along dim 0) written into arena memory."""
        shape = (blocks.numel(), *cache.shape[1:])
        count = blocks.numel() * cache[0].numel()
        used = self._used.get(cache.dtype, 0)
        buffer = self._buffers.get(cache.dtype)
        if buffer is None or buffer.numel() < used + count:
            if 2 * count * cache.element_size() > self.max_retained_bytes:
                return torch.index_select(cache, 0, blocks)  # too large to keep around
            # A new buffer; views handed out earlier keep the old one alive until dropped.
            buffer, used = torch.empty(2 * count, dtype=cache.dtype), 0
            self._buffers[cache.dtype] = buffer
        self._used[cache.dtype] = used + count
        return torch.index_select(cache, 0, blocks, out=buffer[used:used + count].view(shape))


_ARENA = GatherArena()


def block_runs(block_row: torch.Tensor, num_blocks: int, step: int = 1) -> list[tuple[int, int]]:
    """``[start, end)`` entry ranges of the row's first ``num_blocks`` ids that go up (or down) by ``step``."""
    if num_blocks == 0:
        return []
    ids = block_row[:num_blocks].to(torch.int64)
    starts = [0, *((ids[1:] - ids[:-1] != step).nonzero().flatten() + 1).tolist()]
    return list(zip(starts, [*starts[1:], num_blocks]))


@dataclass
class Piece:
    """Tokens ``[offset, offset + len)`` of a shard: ``keys``/``values`` ``[len, kv_heads, dim]``.

    ``in_order`` is False for a run of *descending* block ids read in place: its
    blocks then lie in reverse order (tokens inside each block in order). Attention
    over keys a query sees entirely does not depend on their order; where only a
    prefix is visible, :meth:`ordered` makes the in-order copy.
    """

    offset: int
    keys: torch.Tensor
    values: torch.Tensor
    in_order: bool
    block_size: int
    _ordered: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values in position order (copied once, then reused by later query chunks)."""
        if self.in_order:
            return self.keys, self.values
        if self._ordered is None:
            def reverse_blocks(t: torch.Tensor) -> torch.Tensor:
                return t.unflatten(0, (-1, self.block_size)).flip(0).flatten(0, 1)
            keys = reverse_blocks(self.keys)
            self._ordered = keys, keys if self.values is self.keys else reverse_blocks(self.values)
        return self._ordered


def shard_pieces(key_cache: torch.Tensor, value_cache: torch.Tensor, block_row: torch.Tensor,
                 length: int) -> list[Piece]:
    """Tokens ``[0, length)`` of one shard as pieces, in order of position.

    A run of at least ``MIN_VIEW_BLOCKS`` consecutive block ids, ascending or (as
    vLLM hands back a freed request's blocks) descending, is read in place as a
    *view* of the cache; the blocks between such runs are gathered, one copy per
    gap. A descending run never holds the sequence's partial last block (its
    unused slots would sit inside the view). Passing the same tensor as both
    caches (MLA's latent) gathers it once.
    """
    block_size = key_cache.shape[1]
    num_blocks = -(-length // block_size)
    ids = block_row.to(torch.int64)
    full_blocks = length // block_size
    views = [(s, e, True) for s, e in block_runs(block_row, num_blocks, 1) if e - s >= MIN_VIEW_BLOCKS]
    views += [(s, min(e, full_blocks), False) for s, e in block_runs(block_row, num_blocks, -1)
              if min(e, full_blocks) - s >= MIN_VIEW_BLOCKS]
    pieces: list[Piece] = []

    def add(first_entry: int, end_entry: int, kind: bool | None) -> None:
        """``kind``: True/False for an ascending/descending view, None for a gathered gap."""
        lo, hi = first_entry * block_size, min(length, end_entry * block_size)
        if kind is None:
            keys = _ARENA.gather(key_cache, ids[first_entry:end_entry])
            values = keys if value_cache is key_cache else _ARENA.gather(value_cache, ids[first_entry:end_entry])
        else:
            first = int(ids[first_entry if kind else end_entry - 1])
            keys, values = (c[first:first + end_entry - first_entry] for c in (key_cache, value_cache))
        pieces.append(Piece(lo, keys.flatten(0, 1)[: hi - lo], values.flatten(0, 1)[: hi - lo],
                            kind is not False, block_size))

    covered = 0
    for start, end, ascending in sorted(views):
        if start > covered:
            add(covered, start, None)
        add(start, end, ascending)
        covered = end
    if covered < num_blocks:
        add(covered, num_blocks, None)
    return pieces


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
            visible: torch.Tensor | None) -> PartialState:
    """Flash attention of ``query [T, H, D]`` over ``keys``/``values`` ``[n, Hkv, D]``.

    ``visible [T]`` (optional) limits token ``t`` to the first ``visible[t]`` keys.
    """
    tokens, heads, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    rows = query.view(tokens, kv_heads, group, dim).transpose(0, 1).reshape(1, kv_heads, tokens * group, dim)
    mask = None
    if visible is not None:
        hidden = torch.arange(keys.shape[0]) >= visible[:, None]  # [T, n]
        mask = torch.zeros(hidden.shape, dtype=query.dtype).masked_fill_(hidden, float("-inf"))
        mask = mask.repeat_interleave(group, dim=0)[None, None]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        rows, keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=scale,
    )
    out = out.view(kv_heads, tokens, group, -1).transpose(0, 1).reshape(tokens, heads, -1)
    lse = lse.view(kv_heads, tokens, group).transpose(0, 1).reshape(tokens, heads)
    lse = lse.to(accumulation_dtype(query.dtype))
    if visible is not None:  # the kernel reports lse 0 for a row that sees nothing
        blind = (visible <= 0)[:, None]
        lse = lse.masked_fill(blind, float("-inf"))
        out = out.masked_fill(blind[..., None], 0)
    return out, lse


def _chunk_states(query: torch.Tensor, pieces: list[Piece], visible: torch.Tensor,
                  scale: float) -> list[PartialState]:
    """Partial states of a chunk of one sequence's query tokens over its shard pieces."""
    states = []
    for piece in pieces:
        size = piece.keys.shape[0]
        local = (visible - piece.offset).clamp(0, size)
        shared, longest = int(local.min()), int(local.max())
        keys, values = (piece.keys, piece.values) if shared == size else piece.ordered()
        if shared > 0:  # keys every token of the chunk sees: no mask
            states.append(_attend(query, keys[:shared], values[:shared], scale, None))
        if longest > shared:  # the ragged edge
            states.append(_attend(query, keys[shared:longest], values[shared:longest], scale, local - shared))
    return states


def flash_extend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    visible_lens: torch.Tensor,
    scale: float,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    runs: Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`vllm_helix.attention.paged_extend`, on torch's CPU flash kernel.

    ``value_cache`` must have the keys' head dim (MLA passes the latent cache as both
    and keeps the first ``kv_lora_rank`` output dims).
    """
    tokens, heads, _ = query.shape
    if not flash_supported(query, key_cache.shape[-1], value_cache.shape[-1]):
        raise ValueError(f"torch's CPU flash kernel cannot run a {query.device.type} {query.dtype} query "
                         f"with key dim {key_cache.shape[-1]} and value dim {value_cache.shape[-1]}")
    if heads % key_cache.shape[2]:
        raise ValueError(f"{heads} query heads do not group over {key_cache.shape[2]} KV heads")
    acc = accumulation_dtype(query.dtype)
    out = torch.zeros(tokens, heads, value_cache.shape[-1], dtype=query.dtype)
    lse = torch.full((tokens, heads), float("-inf"), dtype=acc)
    visible = visible_lens.to(torch.int64)
    for start, end in row_groups(block_table) if runs is None else runs:
        longest = int(visible[start:end].max())
        if longest == 0:
            continue
        _ARENA.rewind()  # the previous sequence's gathered pieces are done with
        pieces = shard_pieces(key_cache, value_cache, block_table[start], longest)
        for lo in range(start, end, query_chunk):
            hi = min(end, lo + query_chunk)
            states = _chunk_states(query[lo:hi], pieces, visible[lo:hi], scale)
            if len(states) == 1:
                out[lo:hi], lse[lo:hi] = states[0]
            elif states:
                merged_out, merged_lse = merge_attention_states(
                    torch.stack([o for o, _ in states]), torch.stack([s for _, s in states])
                )
                out[lo:hi], lse[lo:hi] = merged_out, merged_lse
    return out, lse
