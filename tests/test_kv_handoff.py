"""The canonical KV form and the moves into and out of striped, packed paged caches (no vLLM)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_helix.attention.paged_cache import append_kv
from vllm_helix.kv_handoff import BlockLayout, gather_sequence, rank_tokens, scatter_sequence
from vllm_helix.striping import KVStriping


@st.composite
def sequences(draw: st.DrawFn) -> dict:
    """A KVP group, a stripe dividing the block size, a length (often not a multiple of
    ``block_size * kvp``, sometimes shorter than one stripe: empty shards) and a shuffled block row."""
    kvp = draw(st.integers(1, 4))
    block_size = draw(st.sampled_from([4, 8, 16]))
    stripe = draw(st.sampled_from([d for d in range(1, block_size + 1) if block_size % d == 0]))
    length = draw(st.integers(0, 5 * block_size * kvp + 3))
    striping = KVStriping(kvp, stripe, block_size)
    needed = int(striping.blocks_needed(torch.tensor([length]))[0])
    pool = needed + draw(st.integers(0, 4))  # spare blocks that must stay untouched
    block_row = torch.randperm(pool, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    return {"striping": striping, "length": length, "block_row": block_row[:max(needed, 1)], "pool": pool,
            "heads": draw(st.integers(1, 2)), "row": draw(st.sampled_from([3, 8]))}


def _random_order(layout_size: int, seed: int) -> torch.Tensor:
    return torch.randperm(layout_size, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=150, deadline=None)
@given(case=sequences(), seed=st.integers(0, 2**31), packed=st.booleans())
def test_scatter_then_gather_is_the_identity_and_writes_each_token_once(case: dict, seed: int,
                                                                         packed: bool) -> None:
    striping, length, heads, row = case["striping"], case["length"], case["heads"], case["row"]
    bs = striping.block_size
    layout = BlockLayout(bs, row, _random_order(bs * row, seed) if packed else None)
    canonical = torch.randn(length, heads, row, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    caches = [torch.full((case["pool"], heads, bs, row), float("nan"), dtype=torch.float64)
              for _ in range(striping.kvp)]
    scatter_sequence(canonical, caches, layout, striping, case["block_row"])
    assert torch.equal(gather_sequence(caches, layout, striping, case["block_row"], length), canonical)
    # every token landed on exactly one rank, nothing else was touched
    assert sum(int((~c.isnan()).sum()) for c in caches) == length * heads * row


@settings(max_examples=150, deadline=None)
@given(case=sequences())
def test_each_rank_holds_its_stripes_at_the_engines_slots(case: dict) -> None:
    """Against the stripe rule written out by hand (docs/design.md), not through KVStriping."""
    striping, length, block_row = case["striping"], case["length"], case["block_row"]
    kvp, stripe, bs = striping.kvp, striping.stripe, striping.block_size
    expected: dict[int, list[tuple[int, int]]] = {rank: [] for rank in range(kvp)}
    for p in range(length):
        s = p // stripe
        local = (s // kvp) * stripe + p % stripe
        expected[s % kvp].append((p, int(block_row[local // bs]) * bs + local % bs))
    for rank in range(kvp):
        positions, slots = rank_tokens(striping, block_row, length, rank)
        assert list(zip(positions.tolist(), slots.tolist())) == expected[rank]


@settings(max_examples=60, deadline=None)
@given(case=sequences(), seed=st.integers(0, 2**31))
def test_a_helix_group_restripes_into_a_plain_packed_cache_and_back(case: dict, seed: int) -> None:
    """Helix kvp ranks (token-major rows) -> canonical -> one plain engine (packed, stripe = block) -> canonical."""
    helix, length, heads, row = case["striping"], case["length"], case["heads"], case["row"]
    bs = helix.block_size
    canonical = torch.randn(length, heads, row, generator=torch.Generator().manual_seed(seed))
    helix_caches = [torch.zeros(case["pool"], heads, bs, row) for _ in range(helix.kvp)]
    scatter_sequence(canonical, helix_caches, BlockLayout(bs, row), helix, case["block_row"])
    handed = gather_sequence(helix_caches, BlockLayout(bs, row), helix, case["block_row"], length)

    plain = KVStriping(1, bs, bs)
    plain_row = torch.arange(int(plain.blocks_needed(torch.tensor([length]))[0]) or 1).flip(0)
    plain_cache = torch.zeros(len(plain_row), heads, bs, row)
    packed = BlockLayout(bs, row, _random_order(bs * row, seed))
    scatter_sequence(handed, [plain_cache], packed, plain, plain_row)
    assert torch.equal(gather_sequence([plain_cache], packed, plain, plain_row, length), canonical)


def test_token_major_layout_reads_the_rows_the_helix_cache_writes(fresh_seed: int) -> None:
    """BlockLayout(order=None) is the plugin's Helix cache: K | V per token, as append_kv writes it."""
    gen = torch.Generator().manual_seed(fresh_seed)
    blocks, heads, bs, dk, dv = 5, 2, 8, 6, 4
    cache = torch.zeros(blocks, heads, bs, dk + dv)
    slots = torch.randperm(blocks * bs, generator=gen)[:17]
    key, value = torch.randn(17, heads, dk, generator=gen), torch.randn(17, heads, dv, generator=gen)
    append_kv(cache, key, value, slots)
    assert torch.equal(BlockLayout(bs, dk + dv).read(cache, slots), torch.cat([key, value], dim=-1))


def test_a_packed_layout_puts_rows_where_its_order_says(fresh_seed: int) -> None:
    bs, row = 4, 3
    order = _random_order(bs * row, fresh_seed)
    cache = torch.zeros(2, 1, bs, row)
    BlockLayout(bs, row, order).write(cache, torch.tensor([bs + 2]), torch.tensor([[[7.0, 8.0, 9.0]]]))
    region = cache[1, 0].flatten()
    assert region[order[2 * row:3 * row]].tolist() == [7.0, 8.0, 9.0] and int((region != 0).sum()) == 3
    assert int((cache[0] != 0).sum()) == 0


def test_bad_layouts_and_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="must be a permutation of the 12 offsets of a 4 x 3 block region"):
        BlockLayout(4, 3, torch.zeros(12, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected a \[blocks, kv_heads, 4, 3\] cache, got \[2, 1, 4, 5\]"):
        BlockLayout(4, 3).read(torch.zeros(2, 1, 4, 5), torch.tensor([0]))
    with pytest.raises(ValueError, match="must be contiguous"):
        BlockLayout(4, 3).read(torch.zeros(1, 4, 2, 3).transpose(1, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="1 caches for a KVP group of 2"):
        gather_sequence([torch.zeros(1, 1, 4, 3)], BlockLayout(4, 3), KVStriping(2, 4, 4), torch.tensor([0]), 3)
