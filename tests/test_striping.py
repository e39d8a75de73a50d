"""KV striping invariants, checked on random shapes (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_helix.striping import KVStriping


@st.composite
def stripings(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    stripe = draw(st.sampled_from([d for d in range(1, block_size + 1) if block_size % d == 0]))
    return KVStriping(kvp=draw(st.integers(1, 8)), stripe=stripe, block_size=block_size)


@settings(max_examples=200, deadline=None)
@given(striping=stripings(), length=st.integers(0, 600))
def test_every_token_lives_on_exactly_one_rank_at_a_dense_local_position(striping, length):
    positions = torch.arange(length)
    owners = striping.owner(positions)
    local = striping.local_position(positions)
    counts = striping.local_lengths(torch.tensor([length]))[:, 0]
    assert int(counts.sum()) == length
    for rank in range(striping.kvp):
        mine = local[owners == rank]
        # a rank's tokens fill local positions 0..n-1 in sequence order
        assert mine.tolist() == list(range(int(counts[rank])))


@settings(max_examples=200, deadline=None)
@given(striping=stripings(), length=st.integers(0, 600))
def test_shards_grow_evenly(striping, length):
    counts = striping.local_lengths(torch.tensor([length]))[:, 0]
    assert int(counts.max() - counts.min()) <= striping.stripe


@settings(max_examples=100, deadline=None)
@given(striping=stripings(), length=st.integers(0, 600))
def test_a_decode_append_touches_one_rank(striping, length):
    before = striping.local_lengths(torch.tensor([length]))[:, 0]
    after = striping.local_lengths(torch.tensor([length + 1]))[:, 0]
    grew = (after - before).tolist()
    assert sorted(grew) == [0] * (striping.kvp - 1) + [1]
    assert grew.index(1) == int(striping.owner(torch.tensor(length)))


@settings(max_examples=100, deadline=None)
@given(striping=stripings(), lengths=st.lists(st.integers(1, 300), min_size=1, max_size=5))
def test_slot_mapping_writes_each_token_once_into_the_shared_block_table(striping, lengths):
    blocks = striping.blocks_needed(torch.tensor(lengths))
    width = int(blocks.max())
    total = int(blocks.sum())
    ids = torch.randperm(total + 3)[:total]
    table = torch.full((len(lengths), width), -1, dtype=torch.int32)
    start = 0
    for row, count in enumerate(blocks.tolist()):
        table[row, :count] = ids[start : start + count].to(torch.int32)
        start += count
    positions = torch.cat([torch.arange(n) for n in lengths])
    rows = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    written = torch.zeros(len(positions), dtype=torch.int64)
    for rank in range(striping.kvp):
        slots = striping.slot_mapping(positions, table, rows, rank)
        mine = slots >= 0
        assert torch.equal(mine, striping.owner(positions) == rank)
        assert len(set(slots[mine].tolist())) == int(mine.sum())  # no slot shared
        # the block a token lands in is its row's entry for global block p // (bs * kvp)
        expected_block = table[rows, positions // striping.tokens_per_global_block]
        assert torch.equal((slots[mine] // striping.block_size), expected_block[mine].long())
        written += mine
    assert torch.all(written == 1)


def test_kvp_times_the_context_per_block_table_entry():
    striping = KVStriping(kvp=4, stripe=16, block_size=16)
    assert striping.tokens_per_global_block == 64
    assert striping.blocks_needed(torch.tensor([1, 64, 65])).tolist() == [1, 1, 2]


def test_round_robin_order():
    striping = KVStriping(kvp=3, stripe=2, block_size=4)
    assert striping.owner(torch.arange(12)).tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert striping.local_lengths(torch.tensor([7, 1, 0])).tolist() == [[3, 1, 0], [2, 0, 0], [2, 0, 0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kvp=2, stripe=3, block_size=16), "stripe=3 must divide block_size=16"),
        (dict(kvp=0, stripe=1, block_size=16), "must be positive"),
    ],
)
def test_bad_striping_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVStriping(**kwargs)


# ----------------------------------------------------------- ragged query batches
def test_query_positions_are_the_last_query_len_positions_of_each_sequence() -> None:
    from vllm_helix.striping import query_positions

    # requests: decode at length 5, prefill of 3 fresh tokens, chunk of 2 after 4 cached
    query_start_loc = torch.tensor([0, 1, 4, 6])
    seq_lens = torch.tensor([5, 3, 6])
    rows, positions = query_positions(query_start_loc, seq_lens)
    assert rows.tolist() == [0, 1, 1, 1, 2, 2]
    assert positions.tolist() == [4, 0, 1, 2, 4, 5]


@settings(max_examples=200, deadline=None)
@given(
    kvp=st.integers(1, 4),
    stripe_pow=st.integers(0, 3),
    block_mult=st.integers(1, 3),
    position=st.integers(0, 500),
)
def test_visible_local_lengths_count_the_owned_keys_at_or_before_the_query(
    kvp: int, stripe_pow: int, block_mult: int, position: int
) -> None:
    from vllm_helix.striping import visible_local_lengths

    stripe = 2**stripe_pow
    striping = KVStriping(kvp, stripe, stripe * block_mult)
    owners = striping.owner(torch.arange(position + 1))
    for rank in range(kvp):
        expected = int((owners == rank).sum())
        assert visible_local_lengths(striping, torch.tensor([position]), rank).tolist() == [expected]
