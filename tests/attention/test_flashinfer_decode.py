"""FlashInfer per-shard decode against the torch path (GPU only; skips cleanly on CPU)."""

from __future__ import annotations

import pytest
import torch

from vllm_helix.attention.synthetic import (
    MLA_KV_LORA_RANK,
    ProblemSpec,
    make_problem,
    shard_decoder,
    shard_for_rank,
)
from vllm_helix.rank_grid import HelixLayout

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("FlashInfer decode needs CUDA; this machine has none", allow_module_level=True)
flashinfer = pytest.importorskip("flashinfer", reason="pip install 'vllm-helix[gpu]' for FlashInfer")

from vllm_helix.attention.flashinfer_decode import FlashInferDecode, FlashInferMLADecode  # noqa: E402


def _to_cuda(shard):
    for name in ("query", "key_cache", "value_cache", "block_table", "seq_lens"):
        value = getattr(shard, name)
        if value is not None:
            setattr(shard, name, value.cuda())
    return shard


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mla, heads, kv_heads", [(False, 8, 8), (False, 8, 4), (False, 16, 2), (True, 16, 1)])
@pytest.mark.parametrize("kvp_rank", [0, 1])
def test_flashinfer_matches_torch_decode(fresh_seed, dtype, mla, heads, kv_heads, kvp_rank):
    lengths = (1, 3, 17, 700, 2049, 1)  # rank 1 holds nothing of the short ones: empty shards
    spec = ProblemSpec(fresh_seed, lengths, heads, kv_heads, 128, mla, dtype)
    shard = _to_cuda(shard_for_rank(make_problem(spec), HelixLayout(2, 1), kvp_rank, spec.block_size))
    # FlashInfer may load whole pages and mask their tails; real caches hold finite stale
    # values there, so replace the synthetic NaN poison with zeros for this comparison.
    shard.key_cache = torch.nan_to_num(shard.key_cache)
    if shard.value_cache is not None:
        shard.value_cache = torch.nan_to_num(shard.value_cache)
    expected_out, expected_lse = shard_decoder(shard, spec)(shard.query, shard.block_table, shard.seq_lens)
    if mla:
        decoder = FlashInferMLADecode(shard.key_cache, spec.scale, MLA_KV_LORA_RANK)
    else:
        decoder = FlashInferDecode(shard.key_cache, shard.value_cache, spec.scale)
    out, lse = decoder(shard.query, shard.block_table, shard.seq_lens)
    assert out.dtype == dtype and lse.dtype == torch.float32
    empty = shard.seq_lens == 0
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))
    torch.testing.assert_close(out.float(), expected_out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse[~empty], expected_lse[~empty].float(), rtol=1e-3, atol=1e-3)
