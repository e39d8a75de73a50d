"""Per-shard paged decode against dense attention (single shard: the whole sequence)."""

from __future__ import annotations

import pytest
import torch

from vllm_helix.attention.paged_decode import paged_decode, paged_decode_mla
from vllm_helix.attention.synthetic import (
    MLA_KV_LORA_RANK,
    ProblemSpec,
    make_problem,
    reference_attention,
    shard_decoder,
    shard_for_rank,
)
from vllm_helix.rank_grid import HelixLayout

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("kernel", ["reference", "flash", "native"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mla, kv_heads", [(False, 8), (False, 4), (False, 1), (True, 1)])
def test_single_shard_decode_matches_dense_attention(fresh_seed, dtype, mla, kv_heads, kernel):
    gen = torch.Generator().manual_seed(fresh_seed)
    lengths = tuple(torch.randint(1, 700, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist())
    spec = ProblemSpec(fresh_seed, lengths, num_heads=8, num_kv_heads=kv_heads, head_dim=64, mla=mla, dtype=dtype)
    problem = make_problem(spec)
    shard = shard_for_rank(problem, HelixLayout(1, 1), rank=0, stripe=spec.block_size)
    out, lse = shard_decoder(shard, spec, kernel)(shard.query, shard.block_table, shard.seq_lens)
    ref_out, ref_lse = reference_attention(problem)
    assert out.dtype == dtype
    assert relative_error(out, ref_out) <= TOLERANCE[dtype]
    assert relative_error(lse, ref_lse) <= TOLERANCE[dtype]


@pytest.mark.parametrize("kernel", ["reference", "flash", "native"])
def test_empty_and_padded_rows(kernel):
    key_cache = torch.full((4, 4, 1, 8), float("nan"))  # NaN everywhere unread
    value_cache = torch.full((4, 4, 1, 8), float("nan"))
    key_cache[2, :3] = torch.randn(3, 1, 8)
    value_cache[2, :3] = torch.randn(3, 1, 8)
    query = torch.randn(2, 2, 8)
    table = torch.tensor([[2, -1], [-1, -1]], dtype=torch.int32)
    out, lse = paged_decode(query, key_cache, value_cache, table, torch.tensor([3, 0]), 0.5, kernel)
    assert not torch.isnan(out).any()
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    scores = torch.einsum("hd,ld->hl", query[0], key_cache[2, :3, 0]) * 0.5
    torch.testing.assert_close(lse[0], torch.logsumexp(scores, -1))
    torch.testing.assert_close(out[0], torch.softmax(scores, -1) @ value_cache[2, :3, 0])

    out, lse = paged_decode(query, key_cache, value_cache, table, torch.tensor([0, 0]), 0.5, kernel)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_mla_rejects_a_query_of_the_wrong_width():
    with pytest.raises(ValueError, match="absorbed query dim 512 != latent cache dim 576"):
        paged_decode_mla(
            torch.zeros(1, 2, 512), torch.zeros(2, 16, 576), torch.zeros(1, 1, dtype=torch.int32),
            torch.tensor([1]), 1.0, MLA_KV_LORA_RANK,
        )


def test_heads_must_group_over_kv_heads():
    with pytest.raises(ValueError, match="6 query heads do not group over 4 KV heads"):
        paged_decode(
            torch.zeros(1, 6, 8), torch.zeros(2, 4, 4, 8), torch.zeros(2, 4, 4, 8),
            torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]), 1.0,
        )
