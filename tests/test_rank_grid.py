"""Rank grid arithmetic: KVP groups are contiguous and heads land where TP=N expects them."""

from __future__ import annotations

import pytest

from vllm_helix.config import HelixConfig
from vllm_helix.rank_grid import HelixLayout


@pytest.mark.parametrize("kvp, tpa", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (1, 8)])
def test_kvp_groups_partition_the_ranks(kvp, tpa):
    layout = HelixLayout(kvp, tpa)
    groups = layout.kvp_groups()
    assert sorted(r for g in groups for r in g) == list(range(kvp * tpa))
    for tpa_index, group in enumerate(groups):
        assert group == list(range(tpa_index * kvp, (tpa_index + 1) * kvp))
        assert all(layout.coords(r).tpa_index == tpa_index for r in group)
        assert [layout.coords(r).kvp_index for r in group] == list(range(kvp))


@pytest.mark.parametrize("kvp, tpa, heads, kv_heads", [(2, 1, 8, 1), (2, 2, 16, 2), (4, 2, 32, 8)])
def test_output_heads_are_the_tp_shard_of_the_query_slice(kvp, tpa, heads, kv_heads):
    layout = HelixLayout.from_config(HelixConfig(kvp=kvp, tpa=tpa))
    owned = []
    for rank in range(layout.world_size):
        out = layout.output_heads(rank, heads)
        # after the all-to-all a rank holds a sub-block of its own TPA slice
        assert set(out) <= set(layout.query_heads(rank, heads))
        # and the query slice's KV heads are this rank's KV heads (GQA grouping)
        group = heads // kv_heads
        assert {h // group for h in layout.query_heads(rank, heads)} == set(layout.kv_heads(rank, kv_heads))
        owned.extend(out)
    assert owned == list(range(heads))  # rank r holds heads [r*H/N, (r+1)*H/N)


def test_rank_outside_world_is_refused():
    with pytest.raises(ValueError, match="rank 4 outside a Helix world of 4 ranks"):
        HelixLayout(2, 2).coords(4)
