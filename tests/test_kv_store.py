"""Handed-off KV as local files: parts from any writer layout assemble the canonical form exactly."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from vllm_helix.kv_handoff import BlockLayout, gather_sequence, rank_tokens, scatter_sequence, tp_kv_heads
from vllm_helix.kv_store import KVFileStore, entry_key
from vllm_helix.layout import HelixLayout
from vllm_helix.config import HelixConfig
from vllm_helix.striping import KVStriping


def _canonical(tokens: int, heads: int, row: int, seed: int) -> torch.Tensor:
    return torch.randn(tokens, heads, row, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("kvp", "stripe", "tokens"), [(2, 16, 600), (2, 128, 700), (4, 8, 37), (3, 4, 2)])
def test_helix_ranks_write_their_stripes_and_a_reader_gets_the_whole_sequence(tmp_path: Path, kvp: int, stripe: int,
                                                                             tokens: int, fresh_seed: int) -> None:
    store, key, bs, row = KVFileStore(tmp_path), "k" * 64, 128, 10
    canonical = _canonical(tokens, 1, row, fresh_seed)
    striping = KVStriping(kvp, stripe, bs)
    block_row = torch.randperm(8)[: int(striping.blocks_needed(torch.tensor([tokens]))[0])]
    caches = [torch.zeros(8, 1, bs, row) for _ in range(kvp)]
    scatter_sequence(canonical, caches, BlockLayout(bs, row), striping, block_row)
    for rank, cache in enumerate(caches):  # what each producer rank's save_kv_layer does
        positions, slots = rank_tokens(striping, block_row, tokens, rank)
        store.write_part(key, "layers.0", f"r{rank}", positions, range(0, 1), BlockLayout(bs, row).read(cache, slots))
    assert store.tokens(key) == 0  # not committed yet
    store.commit(key, tokens, ["layers.0"], {f"r{rank}": range(0, 1) for rank in range(kvp)})
    assert store.tokens(key) == tokens
    assert torch.equal(store.read_layer(key, "layers.0", range(0, 1), tokens), canonical)
    assert torch.equal(store.read_layer(key, "layers.0", range(0, 1), tokens - 1), canonical[:-1])


def test_tensor_parallel_writers_split_by_heads_and_readers_take_their_heads(tmp_path: Path, fresh_seed: int) -> None:
    store, key, tokens, heads = KVFileStore(tmp_path), "a" * 64, 50, 4
    canonical = _canonical(tokens, heads, 6, fresh_seed)
    for rank in range(2):  # plain TP=2 producer: two heads each, every position
        mine = tp_kv_heads(heads, 2, rank)
        store.write_part(key, "L", f"r{rank}", torch.arange(tokens), mine, canonical[:, mine.start:mine.stop])
    store.commit(key, tokens, ["L"], {f"r{rank}": tp_kv_heads(heads, 2, rank) for rank in range(2)})
    assert torch.equal(store.read_layer(key, "L", range(0, 4), tokens), canonical)
    assert torch.equal(store.read_layer(key, "L", range(1, 3), tokens), canonical[:, 1:3])  # spans both parts
    # a reader of heads 0-1 (a TPA slice) does not open the part of heads 2-3: spoil it, the read still works
    (tmp_path / key / store.part_name("L", "r1")).write_bytes(b"not a tensor file")
    assert torch.equal(store.read_layer(key, "L", range(0, 2), tokens), canonical[:, 0:2])
    with pytest.raises(pickle.UnpicklingError):  # a reader of heads 1-2 does open it
        store.read_layer(key, "L", range(1, 3), tokens)


def test_missing_parts_and_uncovered_positions_are_not_a_hit(tmp_path: Path) -> None:
    store, key = KVFileStore(tmp_path), "b" * 64
    store.write_part(key, "L", "r0", torch.tensor([0, 2]), range(0, 1), torch.zeros(2, 1, 3))
    store.commit(key, 4, ["L"], {"r0": range(0, 1), "r1": range(0, 1)})
    assert store.tokens(key) is None  # committed, r1 not visible: ask again later
    store.write_part(key, "L", "r1", torch.tensor([1]), range(0, 1), torch.zeros(1, 1, 3))
    assert store.tokens(key) == 4
    with pytest.raises(ValueError, match="does not hold every position < 4 of heads 0..0 for L"):
        store.read_layer(key, "L", range(0, 1), 4)  # position 3 was never written
    with pytest.raises(ValueError, match="rows \\[2, 1, 3\\] do not match 3 positions x 1 heads"):
        store.write_part(key, "L", "r2", torch.arange(3), range(0, 1), torch.zeros(2, 1, 3))


def test_keys_separate_models_dtypes_and_prompts() -> None:
    base = entry_key("m", "float32", [1, 2, 3])
    assert len({base, entry_key("m2", "float32", [1, 2, 3]), entry_key("m", "bfloat16", [1, 2, 3]),
                entry_key("m", "float32", [1, 2]), entry_key("m", "float32", [1, 2, 4])}) == 5
    assert entry_key("m", "float32", (1, 2, 3)) == base


def test_committing_removes_entries_older_than_the_age_limit(tmp_path: Path) -> None:
    store = KVFileStore(tmp_path, max_age_s=60)
    for key in ("old", "new"):
        store.write_part(key, "L", "r0", torch.arange(1), range(0, 1), torch.zeros(1, 1, 2))
    old = time.time() - 120
    for path in (tmp_path / "old").iterdir():
        os.utime(path, (old, old))
    store.commit("fresh", 1, ["L"], {"r0": range(0, 1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "new"]


@pytest.mark.parametrize(("kvp", "tpa", "kv_heads"), [(2, 1, 1), (2, 2, 2), (1, 4, 8), (2, 4, 4), (4, 2, 2)])
def test_tp_heads_are_the_helix_layouts_heads(kvp: int, tpa: int, kv_heads: int) -> None:
    """vLLM runs Helix as TP = kvp x tpa (with kvp > 1, more ranks than KV heads, tpa = KV heads);
    its head rule must give each rank its TPA slice's heads."""
    layout = HelixLayout.from_config(HelixConfig(kvp=kvp, tpa=tpa))
    for rank in range(kvp * tpa):
        assert tp_kv_heads(kv_heads, kvp * tpa, rank) == layout.kv_heads(rank, kv_heads)
    assert [tp_kv_heads(8, 2, r) for r in range(2)] == [range(0, 4), range(4, 8)]
