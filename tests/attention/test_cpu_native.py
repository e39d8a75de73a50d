"""The C++ per-shard decode kernel against the float64 reference, and the kernel choice around it."""

from __future__ import annotations

import importlib

import pytest
import torch

from vllm_helix.attention import cpu_native
from vllm_helix.attention.cpu_native import native_decode, native_kernel
from vllm_helix.attention.kernel_choice import choose_kernel
from vllm_helix.attention.paged_extend import NATIVE_MAX_ROW_TOKENS, paged_extend

paged_extend_module = importlib.import_module("vllm_helix.attention.paged_extend")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def test_the_kernel_is_built() -> None:
    """The README's set-up builds it (scripts/setup.sh); CI must run the kernel, not fall back."""
    assert native_kernel() is not None, "run `vllm-helix build-kernel --verbose` to see the build error"


def _problem(seed: int, dtype: torch.dtype, kv_heads: int, group: int, head_dim: int, block_size: int,
             mla: bool):
    """A batch of decode tokens over shuffled blocks; every slot no token may see is NaN."""
    gen = torch.Generator().manual_seed(seed)
    tokens, max_blocks = 6, 12
    num_blocks = tokens * max_blocks + 3
    key_dim = head_dim + (64 if mla else 0)
    cache = torch.randn(num_blocks, block_size, kv_heads, key_dim if mla else 2 * head_dim, generator=gen,
                        dtype=torch.float64)
    table = torch.randperm(num_blocks, generator=gen)[: tokens * max_blocks].view(tokens, max_blocks)
    longest = max_blocks * block_size
    visible = torch.tensor([0, 1, block_size, longest,
                            *torch.randint(1, longest + 1, (tokens - 4,), generator=gen).tolist()])
    seen = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for row, length in zip(table, visible.tolist()):
        seen.view(-1)[(row[:, None] * block_size + torch.arange(block_size)).flatten()[:length]] = True
    cache[~seen] = float("nan")
    cache = cache.to(dtype)
    if mla:
        keys, values = cache, cache[..., :head_dim]
    else:
        keys, values = cache[..., :head_dim], cache[..., head_dim:]
    query = torch.randn(tokens, kv_heads * group, key_dim, generator=gen, dtype=torch.float64).to(dtype)
    return query, keys, values, table.to(torch.int32), visible


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads, group, head_dim, block_size, mla", [
    (1, 8, 64, 128, False),   # the Llama twin's shard (one vector tile)
    (2, 3, 64, 16, False),    # a padded tile
    (1, 12, 32, 4, False),    # two tiles, the second padded
    (2, 4, 20, 8, False),     # head dim off the vector width: the portable loop
    (1, 8, 512, 16, True),    # MLA: the latent as key (576) and its first 512 dims as value
])
@pytest.mark.parametrize("split_tokens", [8, 8192])
def test_matches_the_float64_reference(fresh_seed, dtype, kv_heads, group, head_dim, block_size, mla,
                                       split_tokens) -> None:
    query, keys, values, table, visible = _problem(fresh_seed, dtype, kv_heads, group, head_dim, block_size, mla)
    out, lse = native_decode(query, keys, values, table, visible, 0.2, split_tokens=split_tokens)
    ref_out, ref_lse = paged_extend(query.double(), keys.double(), values.double(), table, visible, 0.2,
                                    kernel="reference")
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(out).any()
    empty = visible == 0
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))
    scale = float(ref_out.abs().max())
    assert float((out.double() - ref_out).abs().max()) <= TOLERANCE[dtype] * scale
    assert float((lse[~empty].double() - ref_lse[~empty]).abs().max()) <= TOLERANCE[dtype] * 10


def test_results_do_not_depend_on_threads_or_batch(fresh_seed) -> None:
    """Bitwise: HOP-B micro-batches and the worker's thread count cannot change a number."""
    query, keys, values, table, visible = _problem(fresh_seed, torch.float32, 1, 8, 64, 16, False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = native_decode(query, keys, values, table, visible, 0.3, split_tokens=32)
        torch.set_num_threads(2)
        double = native_decode(query, keys, values, table, visible, 0.3, split_tokens=32)
    finally:
        torch.set_num_threads(threads)
    alone = [native_decode(query[t:t + 1], keys, values, table[t:t + 1], visible[t:t + 1], 0.3, split_tokens=32)
             for t in range(query.shape[0])]
    assert torch.equal(single[0], double[0]) and torch.equal(single[1], double[1])
    assert torch.equal(single[0], torch.cat([o for o, _ in alone]))
    assert torch.equal(single[1], torch.cat([l for _, l in alone]))


def test_bad_input_is_refused_with_the_constraint() -> None:
    query, keys, values, table, visible = _problem(0, torch.float32, 1, 8, 64, 16, False)
    with pytest.raises(RuntimeError, match="exceeds the block table"):
        native_decode(query, keys, values, table[:, :2], visible, 0.3)
    with pytest.raises(RuntimeError, match="share a dtype"):
        native_decode(query.double(), keys, values, table, visible, 0.3)
    query, keys, values, table, visible = _problem(0, torch.float32, 2, 4, 64, 16, False)
    with pytest.raises(ValueError, match="7 query heads do not group over 2 KV heads"):
        native_decode(query[:, :7], keys, values, table, visible, 0.3)


def test_auto_sends_prefill_chunks_to_flash_and_decode_tokens_to_native(fresh_seed, monkeypatch) -> None:
    """A mixed batch (chunked prefill next to decodes) takes both kernels and stays exact."""
    gen = torch.Generator().manual_seed(fresh_seed)
    block_size, blocks = 8, 40
    kv = torch.randn(blocks, block_size, 1, 32, generator=gen)
    keys, values = kv[..., :16], kv[..., 16:]
    rows, visible = [], []
    for seq, count in enumerate([1, NATIVE_MAX_ROW_TOKENS + 9, 1, 2]):
        row = torch.arange(seq * 10, seq * 10 + 10, dtype=torch.int32)
        first = int(torch.randint(1, 40, (1,), generator=gen))
        rows += [row] * count
        visible += [first + t for t in range(count)]
    table, visible = torch.stack(rows), torch.tensor(visible)
    query = torch.randn(len(rows), 4, 16, generator=gen)
    calls = {"flash": 0, "native": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += args[0].shape[0]
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(paged_extend_module, "flash_extend", counted("flash", paged_extend_module.flash_extend))
    monkeypatch.setattr(paged_extend_module, "native_decode", counted("native", paged_extend_module.native_decode))
    out, lse = paged_extend(query, keys, values, table, visible, 0.25)
    assert calls == {"flash": NATIVE_MAX_ROW_TOKENS + 9, "native": 4}
    ref_out, ref_lse = paged_extend(query.double(), keys.double(), values.double(), table, visible, 0.25,
                                    kernel="reference")
    assert float((out.double() - ref_out).abs().max()) <= 1e-5
    assert float((lse.double() - ref_lse).abs().max()) <= 1e-5


def test_kernel_choice() -> None:
    query = torch.zeros(1, 2, 8)
    assert choose_kernel(query, "auto", 8, 8) == "native"
    assert choose_kernel(query, "auto", 8, 4) == "native"  # unequal dims (MLA-like): native runs them
    assert choose_kernel(query, "flash", 8, 8) == "flash"
    assert choose_kernel(query, "reference", 8, 8) == "reference"
    with pytest.raises(ValueError, match="equal key and value dims"):
        choose_kernel(query, "flash", 8, 4)
    with pytest.raises(ValueError, match="kernel='fast': use one of 'auto', 'native', 'flash', 'reference'"):
        choose_kernel(query, "fast", 8, 8)


def test_switched_off_the_choice_falls_to_flash(monkeypatch) -> None:
    """VLLM_HELIX_CPU_KERNEL=flash (for side-by-side runs) turns the C++ kernel off, visibly."""
    monkeypatch.setenv("VLLM_HELIX_CPU_KERNEL", "flash")
    cpu_native.native_kernel.cache_clear()
    try:
        query = torch.zeros(1, 2, 8)
        assert choose_kernel(query, "auto", 8, 8) == "flash"
        assert choose_kernel(query, "auto", 8, 4) == "reference"
        with pytest.raises(ValueError, match="kernel='native' needs"):
            choose_kernel(query, "native", 8, 8)
    finally:
        monkeypatch.delenv("VLLM_HELIX_CPU_KERNEL")
        cpu_native.native_kernel.cache_clear()
