"""HOP-B micro-batching: slices cover the batch once, in order, never empty."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vllm_helix.attention.exchange import KVPExchange
from vllm_helix.attention.hopb import helix_decode, micro_batch_bounds


@given(batch=st.integers(0, 300), micro_batches=st.integers(1, 40))
def test_bounds_tile_the_batch(batch, micro_batches):
    bounds = micro_batch_bounds(batch, micro_batches)
    assert len(bounds) == min(batch, micro_batches)
    flat = [i for start, end in bounds for i in range(start, end)]
    assert flat == list(range(batch))
    sizes = [end - start for start, end in bounds]
    assert all(size >= 1 for size in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)


def test_hopb_zero_is_refused():
    with pytest.raises(ValueError, match="hopb=0 must be >= 1"):
        micro_batch_bounds(4, 0)


@pytest.mark.parametrize("hopb", [1, 2, 5])
def test_single_rank_helix_decode_is_the_local_decode_in_micro_batches(hopb):
    """kvp=1: no peers, so the result must be the local attention itself, batch-split."""
    calls = []

    def decode(query, table, lens):
        calls.append(query.shape[0])
        return query * 2, query.sum(-1)

    query = torch.randn(7, 4, 3)
    out, lse = helix_decode(decode, query, torch.zeros(7, 1), torch.ones(7), KVPExchange(None, 1), hopb)
    torch.testing.assert_close(out, query * 2)
    torch.testing.assert_close(lse, query.sum(-1))
    assert calls == [end - start for start, end in micro_batch_bounds(7, hopb)]
