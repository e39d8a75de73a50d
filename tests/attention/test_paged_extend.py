"""Many query tokens per sequence (prefill chunks) against per-token decodes over the visible prefix."""

from __future__ import annotations

import pytest
import torch

from vllm_helix.attention.paged_decode import paged_decode
from vllm_helix.attention.paged_extend import paged_extend

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def _problem(seed: int, dtype: torch.dtype, kv_heads: int):
    gen = torch.Generator().manual_seed(seed)
    blocks, block_size, heads, dim = 40, 8, 8, 16
    key_cache = torch.randn(blocks, block_size, kv_heads, dim, generator=gen, dtype=dtype)
    value_cache = torch.randn(blocks, block_size, kv_heads, dim, generator=gen, dtype=dtype)
    rows, visible, runs = [], [], []
    permutation = torch.randperm(blocks, generator=gen)
    for seq in range(3):  # three sequences, ragged query counts, visible prefixes growing
        table_row = permutation[seq * 12:(seq + 1) * 12].to(torch.int32)
        queries = int(torch.randint(1, 30, (1,), generator=gen))
        first = int(torch.randint(0, 60, (1,), generator=gen))
        runs.append((len(rows), len(rows) + queries))
        for t in range(queries):
            rows.append(table_row)
            visible.append(min(first + t, 12 * block_size) if seq != 1 else t // 3)  # seq 1 starts empty
    table = torch.stack(rows)
    query = torch.randn(len(rows), heads, dim, generator=gen, dtype=dtype)
    return query, key_cache, value_cache, table, torch.tensor(visible), runs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("query_chunk", [1, 5, 256])
@pytest.mark.parametrize("kernel", ["reference", "flash", "native", "auto"])
@pytest.mark.parametrize("runs_given", [False, True], ids=["runs-found", "runs-given"])
def test_extend_equals_one_decode_per_query_token(fresh_seed: int, dtype, kv_heads: int, query_chunk: int,
                                                  kernel: str, runs_given: bool) -> None:
    query, key_cache, value_cache, table, visible, runs = _problem(fresh_seed, dtype, kv_heads)
    out, lse = paged_extend(query, key_cache, value_cache, table, visible, 0.3, query_chunk=query_chunk,
                            kernel=kernel, runs=runs if runs_given else None)
    ref_out, ref_lse = paged_decode(query, key_cache, value_cache, table, visible, 0.3, kernel="reference")
    assert out.dtype == dtype and not torch.isnan(out).any()
    seen = visible > 0
    assert torch.all(out[~seen] == 0) and torch.all(lse[~seen] == float("-inf"))
    assert float((out - ref_out).abs().max()) <= TOLERANCE[dtype]
    assert float((lse[seen] - ref_lse[seen]).abs().max()) <= TOLERANCE[dtype]


@pytest.mark.parametrize("kernel", ["reference", "flash", "native"])
def test_tokens_of_other_sequences_never_leak(fresh_seed: int, kernel: str) -> None:
    query, key_cache, value_cache, table, visible, _ = _problem(fresh_seed, torch.float64, 2)
    baseline, _ = paged_extend(query, key_cache, value_cache, table, visible, 0.3, kernel=kernel)
    poisoned_k, poisoned_v = key_cache.clone(), value_cache.clone()
    unused = sorted(set(range(key_cache.shape[0])) - set(table.flatten().tolist()))
    poisoned_k[unused] = float("nan")
    poisoned_v[unused] = float("nan")
    out, _ = paged_extend(query, poisoned_k, poisoned_v, table, visible, 0.3, kernel=kernel)
    assert torch.equal(out, baseline)
