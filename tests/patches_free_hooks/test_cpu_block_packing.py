"""vLLM's CPU attention cache packing, learned from its kernel, round-trips blocks that kernel wrote."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm import _custom_ops as ops  # noqa: E402

from patches_free_hooks.cpu_block_packing import cpu_attn_isa, cpu_attn_layout  # noqa: E402
from vllm_helix.kv_handoff import BlockLayout, gather_sequence, scatter_sequence  # noqa: E402
from vllm_helix.striping import KVStriping  # noqa: E402

# (dtype, block size, head size): the twins' float32 at vLLM's CPU default block 128, block sizes
# and head sizes that pick the other AVX packing (vec16), and the half types.
CASES = [(torch.float32, 128, 128), (torch.float32, 32, 64), (torch.float32, 16, 64),
         (torch.float32, 32, 48), (torch.bfloat16, 32, 64), (torch.float16, 16, 128)]


def _vllm_cache(blocks: int, heads: int, bs: int, d: int, dtype: torch.dtype, key: torch.Tensor,
                value: torch.Tensor, slots: torch.Tensor, isa: str) -> torch.Tensor:
    """A ``[blocks, heads, bs, 2d]`` CPU_ATTN cache written by vLLM's own kernel, as its backend calls it."""
    cache = torch.zeros(blocks, heads, bs, 2 * d, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, heads, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    return cache


@pytest.mark.parametrize(("dtype", "bs", "d"), CASES)
def test_the_learned_layout_reads_and_writes_blocks_as_vllms_kernel_does(dtype: torch.dtype, bs: int, d: int,
                                                                          fresh_seed: int) -> None:
    gen = torch.Generator().manual_seed(fresh_seed)
    blocks, heads, tokens = 4, 2, 3 * bs - 5
    isa = cpu_attn_isa(dtype, bs, d)
    layout = cpu_attn_layout(dtype, bs, d, isa)
    slots = torch.randperm(blocks * bs, generator=gen)[:tokens]
    key = torch.randn(tokens, heads, d, generator=gen).to(dtype)
    value = torch.randn(tokens, heads, d, generator=gen).to(dtype)
    written_by_vllm = _vllm_cache(blocks, heads, bs, d, dtype, key, value, slots, isa)
    # read: vLLM's block back to K | V rows
    assert torch.equal(layout.read(written_by_vllm, slots), torch.cat([key, value], dim=-1))
    # write: the layout packs exactly the bytes vLLM's kernel packs
    ours = torch.zeros_like(written_by_vllm)
    layout.write(ours, slots, torch.cat([key, value], dim=-1))
    assert torch.equal(ours, written_by_vllm)


@pytest.mark.parametrize(("bs", "d"), [(128, 128), (32, 64)])
def test_the_avx_packing_is_k_transposed_then_v(bs: int, d: int) -> None:
    """What the learned order says for this project's x86 machines without AMX (float32: never AMX)."""
    isa = cpu_attn_isa(torch.float32, bs, d)
    if isa not in ("vec", "vec16"):
        pytest.skip(f"vLLM picks {isa!r} here; the K-transposed packing is its AVX one")
    order = cpu_attn_layout(torch.float32, bs, d, isa).order.view(bs, 2 * d)
    n, e = torch.meshgrid(torch.arange(bs), torch.arange(d), indexing="ij")
    assert torch.equal(order[:, :d], e * bs + n)  # K[d, n] at d * bs + n
    assert torch.equal(order[:, d:], bs * d + n * d + e)  # V[n, d] after the K region


def test_a_plain_engines_blocks_restripe_into_helix_ranks_exactly(fresh_seed: int) -> None:
    """Plain TP=1 cache (vLLM's packing) -> canonical -> Helix kvp=2 stripes (token-major) -> back."""
    gen = torch.Generator().manual_seed(fresh_seed)
    bs, d, heads, length = 32, 64, 1, 5 * 32 + 7
    isa = cpu_attn_isa(torch.float32, bs, d)
    plain, helix = KVStriping(1, bs, bs), KVStriping(2, 16, bs)
    plain_row = torch.tensor([5, 2, 7, 0, 3, 6])
    key, value = torch.randn(length, heads, d, generator=gen), torch.randn(length, heads, d, generator=gen)
    slots = (plain_row[torch.arange(length) // bs] * bs + torch.arange(length) % bs)
    prefill_cache = _vllm_cache(8, heads, bs, d, torch.float32, key, value, slots, isa)
    canonical = gather_sequence([prefill_cache], cpu_attn_layout(torch.float32, bs, d, isa), plain, plain_row, length)
    assert torch.equal(canonical, torch.cat([key, value], dim=-1))
    helix_row = torch.tensor([1, 3, 0])
    decode_caches = [torch.zeros(4, heads, bs, 2 * d) for _ in range(2)]
    scatter_sequence(canonical, decode_caches, BlockLayout(bs, 2 * d), helix, helix_row)
    assert torch.equal(gather_sequence(decode_caches, BlockLayout(bs, 2 * d), helix, helix_row, length), canonical)
