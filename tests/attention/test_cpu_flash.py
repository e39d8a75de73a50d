"""torch's CPU flash kernel over views of the paged cache, against float64 dense attention."""

from __future__ import annotations

import pytest
import torch

from vllm_helix.attention.cpu_flash import (
    MIN_VIEW_BLOCKS,
    GatherArena,
    block_runs,
    flash_extend,
    shard_pieces,
)
from vllm_helix.attention.paged_cache import read_sequence
from vllm_helix.attention.paged_decode import paged_decode_mla

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
BLOCK_SIZE = 4


def _row(gen: torch.Generator, num_blocks: int, style: str) -> torch.Tensor:
    """A block-table row of 16 entries: contiguous, shuffled, descending or long runs with gaps."""
    if style == "contiguous":
        first = int(torch.randint(0, num_blocks - 16, (1,), generator=gen))
        return torch.arange(first, first + 16)
    if style == "shuffled":
        return torch.randperm(num_blocks, generator=gen)[:16]
    if style == "descending":  # how vLLM hands back a freed request's blocks
        first = int(torch.randint(16, num_blocks, (1,), generator=gen))
        return torch.arange(first, first - 16, -1)
    # "runs": a long run, two stray blocks, another long run, one stray block
    base = torch.randperm(num_blocks // 8, generator=gen)[:4] * 8
    return torch.cat([torch.arange(base[0], base[0] + 6), base[1:3] + 7, torch.arange(base[3], base[3] + 7),
                      base[:1] + 7])


def _problem(seed: int, dtype: torch.dtype, kv_heads: int, style: str):
    """Three sequences in a flattened batch: ragged query counts, growing visible prefixes, an empty start."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks, heads, dim = 96, 8, 16
    key_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, dim, generator=gen, dtype=torch.float64)
    value_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, dim, generator=gen, dtype=torch.float64)
    rows, visible = [], []
    for seq in range(3):
        row = _row(gen, num_blocks, style).to(torch.int32)
        queries = int(torch.randint(1, 40, (1,), generator=gen))
        first = int(torch.randint(0, 50, (1,), generator=gen))
        for t in range(queries):
            rows.append(row)
            visible.append(min(first + t // 2, 16 * BLOCK_SIZE) if seq != 1 else t // 3)  # seq 1 starts empty
    query = torch.randn(len(rows), heads, dim, generator=gen, dtype=torch.float64)
    return query, key_cache, value_cache, torch.stack(rows), torch.tensor(visible)


def _dense(query, key_cache, value_cache, table, visible, scale):
    """float64 attention of every query token over the first ``visible`` tokens of its row."""
    out = torch.zeros(query.shape[0], query.shape[1], value_cache.shape[-1], dtype=torch.float64)
    lse = torch.full(query.shape[:2], float("-inf"), dtype=torch.float64)
    for t, length in enumerate(visible.tolist()):
        if length == 0:
            continue
        keys = read_sequence(key_cache, table[t], length).double()  # [L, kvh, D]
        values = read_sequence(value_cache, table[t], length).double()
        group = query.shape[1] // keys.shape[1]
        scores = torch.einsum("hd,lhd->hl", query[t].double(), keys.repeat_interleave(group, 1)) * scale
        lse[t] = torch.logsumexp(scores, -1)
        out[t] = torch.einsum("hl,lhd->hd", torch.softmax(scores, -1), values.repeat_interleave(group, 1))
    return out, lse


@pytest.mark.parametrize("style", ["contiguous", "shuffled", "descending", "runs"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("query_chunk", [1, 7, 256])
def test_flash_extend_matches_dense_float64(fresh_seed, style, dtype, kv_heads, query_chunk):
    query, key_cache, value_cache, table, visible = _problem(fresh_seed, dtype, kv_heads, style)
    ref_out, ref_lse = _dense(query, key_cache, value_cache, table, visible, 0.4)
    out, lse = flash_extend(query.to(dtype), key_cache.to(dtype), value_cache.to(dtype), table, visible, 0.4,
                            query_chunk=query_chunk)
    assert out.dtype == dtype and lse.dtype == torch.promote_types(dtype, torch.float32)
    seen = visible > 0
    assert torch.all(out[~seen] == 0) and torch.all(lse[~seen] == float("-inf"))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    error = float((out[seen].double() - ref_out[seen]).norm() / ref_out[seen].norm())
    assert error <= TOLERANCE[dtype]
    assert float((lse[seen].double() - ref_lse[seen]).abs().max()) <= TOLERANCE[dtype] * 10


def test_mla_decode_with_the_latent_as_value(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    latent = torch.randn(64, 16, 576, generator=gen, dtype=torch.float64)
    table = torch.stack([torch.arange(3, 13), torch.randperm(64, generator=gen)[:10], torch.arange(40, 30, -1)])
    lens = torch.tensor([150, 0, int(torch.randint(1, 160, (1,), generator=gen))])
    query = torch.randn(3, 8, 576, generator=gen, dtype=torch.float64)
    out, lse = paged_decode_mla(query, latent, table.int(), lens, 0.07, 512, kernel="flash")
    ref_out, ref_lse = paged_decode_mla(query, latent, table.int(), lens, 0.07, 512, kernel="reference")
    assert out.shape == (3, 8, 512) and out.is_contiguous()
    assert float((out - ref_out).abs().max()) <= 1e-12
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf"))
    assert float((lse - ref_lse)[lens > 0].abs().max()) <= 1e-12


@pytest.mark.parametrize("style", ["contiguous", "shuffled", "descending", "runs"])
def test_pieces_cover_the_shard_and_long_runs_are_views(fresh_seed, style):
    gen = torch.Generator().manual_seed(fresh_seed)
    cache = torch.randn(96, BLOCK_SIZE, 1, 8, generator=gen)
    row = _row(gen, 96, style).to(torch.int32)
    length = int(torch.randint(1, 16 * BLOCK_SIZE + 1, (1,), generator=gen))
    pieces = shard_pieces(cache, cache, row, length)
    assert [p.offset for p in pieces] == sorted(p.offset for p in pieces) and pieces[0].offset == 0
    in_order = torch.cat([piece.ordered()[0] for piece in pieces])
    assert torch.equal(in_order, read_sequence(cache, row, length))
    storage = cache.untyped_storage().data_ptr()
    num_blocks, full = -(-length // BLOCK_SIZE), length // BLOCK_SIZE
    ascending = sum(e - s >= MIN_VIEW_BLOCKS for s, e in block_runs(row, num_blocks))
    descending = sum(min(e, full) - s >= MIN_VIEW_BLOCKS for s, e in block_runs(row, num_blocks, -1))
    views = [p for p in pieces if p.keys.untyped_storage().data_ptr() == storage]
    assert len(views) == ascending + descending  # every long run read in place, nothing else aliases the cache
    assert sum(not p.in_order for p in pieces) == descending


def test_gather_arena_hands_out_disjoint_memory_until_rewound(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    cache = torch.randn(32, 4, 2, 8, generator=gen)
    arena = GatherArena(max_retained_bytes=4 * cache.numel() * cache.element_size())
    first_ids, second_ids = torch.randperm(32, generator=gen)[:9], torch.randperm(32, generator=gen)[:5]
    first = arena.gather(cache, first_ids)
    second = arena.gather(cache, second_ids)  # same buffer, must not overwrite `first`
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert torch.equal(first, cache[first_ids]) and torch.equal(second, cache[second_ids])
    arena.rewind()
    again = arena.gather(cache, second_ids)
    assert again.data_ptr() == first.data_ptr()  # memory reused after the rewind
    huge = GatherArena(max_retained_bytes=64).gather(cache, first_ids)  # too large to retain: a plain copy
    assert torch.equal(huge, cache[first_ids])


def test_block_runs():
    row = torch.tensor([5, 6, 7, 2, 9, 10, 4, 3, -1], dtype=torch.int32)
    assert block_runs(row, 8) == [(0, 3), (3, 4), (4, 6), (6, 7), (7, 8)]
    assert block_runs(row, 8, -1) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 8)]
    assert block_runs(row, 0) == []


def test_unused_blocks_and_slots_past_the_end_are_never_read(fresh_seed):
    query, key_cache, value_cache, table, visible = _problem(fresh_seed, torch.float64, 2, "runs")
    baseline, _ = flash_extend(query, key_cache, value_cache, table, visible, 0.4)
    poisoned_k, poisoned_v = key_cache.clone(), value_cache.clone()
    seen = set()  # slots some token may see; NaN everywhere else, the tails of last blocks included
    for row, longest in zip(table, visible):
        seen |= {int(row[p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(int(longest))}
    unseen = torch.tensor(sorted(set(range(poisoned_k.shape[0] * BLOCK_SIZE)) - seen))
    poisoned_k.view(-1, 2, 16)[unseen] = float("nan")
    poisoned_v.view(-1, 2, 16)[unseen] = float("nan")
    out, _ = flash_extend(query, poisoned_k, poisoned_v, table, visible, 0.4)
    assert torch.equal(out, baseline)
