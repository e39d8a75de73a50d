"""End to end in stock vLLM on CPU: greedy generation with Helix equals Helix off.

vLLM alone refuses ``decode_context_parallel_size > 1`` on CPU; with the plugin a
Helix layout runs, and on float32 twins it must reproduce single-rank
generation token for token, logprobs within 1e-3 (the measured noise floor of
the CPU path is ~1e-5, docs/cpu-determinism.md), for prompts from one token to
many KV blocks in one mixed batch, with 32+ generated tokens. The KV-cache
capacity vLLM reports must be kvp times that of the same workers without Helix (the
Llama twin here; the DeepSeek twin's in tests/commands/test_demo.py, whose main job
compares Helix kvp=2 with TP=2). The plain side is the session's shared reference
engine of the twin (``plain`` in tests/conftest.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm_helix.harness.server import EXACT_ROPE_KWARGS  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 32
LOGPROB_TOL = 1e-3
# vLLM's C++ CPU rotary kernel mis-indexes MLA's strided q/k (docs/cpu-determinism.md);
# both sides of every MLA comparison use PyTorch's exact rotary instead (EXACT_ROPE_KWARGS).


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 2000) for _ in range(n)] for n in lengths]


def _assert_same_generation(helix: dict[str, Any], off: dict[str, Any]) -> None:
    assert len(helix["results"]) == len(off["results"])
    for i, (h, o) in enumerate(zip(helix["results"], off["results"])):
        assert len(h["ids"]) == MAX_TOKENS
        assert h["ids"] == o["ids"], f"prompt {i}: greedy tokens differ"
        worst = max(abs(a - b) for a, b in zip(h["logprobs"], o["logprobs"]))
        assert worst <= LOGPROB_TOL, f"prompt {i}: top logprob differs by {worst}"


def _vllm_cpu_build_has_shared_memory_collectives() -> bool:
    """Whether the kernel library vLLM loads on this CPU registers its shared-memory ops: the AVX-512
    builds do; the AVX2 build (AMD EPYC Zen 3 and other CPUs without AVX-512) does not, and there vLLM's
    own TP group and the plugin's KVP exchange both stay on gloo."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "init_shm_manager")


def _assert_helix_ran(run: dict[str, Any], attention: str, kvp: int) -> None:
    # vLLM's CPU shared-memory collectives carry the query all-gather and the exchange where its build has
    # them; gloo's all-to-all otherwise
    route = "shared-memory all-gather" if _vllm_cpu_build_has_shared_memory_collectives() else "all-to-all"
    for rank in range(kvp):
        assert f"Helix {attention} attention active" in run["log"] and f"KVP rank {rank} of {kvp}" in run["log"]
        assert f"exchange: {route}" in run["log"]


@pytest.fixture(scope="module")
def gqa_runs(twins: dict[str, Path], generate: Callable[..., dict[str, Any]], plain: Callable[..., dict[str, Any]],
             module_seed: int) -> dict[str, Any]:
    # 32-token blocks: the 300-token prompt spans 10 blocks (5 per rank).
    prompts = _prompts(module_seed, (1, 3, 31, 33, 130, 300, 64, 2))
    common = dict(block_size=32, max_num_seqs=16)
    return {
        # small stripes (8 tokens of a 64-token Helix block) and HOP-B, then the same prompts again: prefix hits
        "helix": generate(twins["llama1"], prompts, MAX_TOKENS, repeat=True, enable_prefix_caching=True,
                          additional_config={"helix": "kvp=2,tpa=1,stripe=8,hopb=3"}, **common),
        # the default layout (stripe = block, no HOP-B); 6 usable blocks of 2 x 32 tokens for 8 sequences
        # that need ~17: vLLM must preempt.
        "helix_preempted": generate(twins["llama1"], prompts, MAX_TOKENS, num_gpu_blocks_override=7,
                                    max_model_len=384,
                                    additional_config={"helix": {"kvp": 2, "tpa": 1}}, **common),
        "off_tp1": plain("llama1", prompts, MAX_TOKENS),
        "off_tp2": generate(twins["llama1"], prompts[:1], 1, tensor_parallel_size=2, **common),
    }


def test_gqa_helix_with_small_stripes_and_hopb_equals_helix_off(gqa_runs: dict[str, Any]) -> None:
    _assert_helix_ran(gqa_runs["helix"], "GQA", 2)
    _assert_same_generation(gqa_runs["helix"], gqa_runs["off_tp1"])


def test_gqa_helix_prefix_cache_hits_reproduce_the_same_generation(gqa_runs: dict[str, Any]) -> None:
    helix = gqa_runs["helix"]
    assert sum(helix["repeat_cached_tokens"]) > 0, "the second pass should hit the prefix cache"
    _assert_same_generation({"results": helix["repeat"]}, gqa_runs["off_tp1"])


def test_gqa_helix_survives_preemption_with_the_same_generation(gqa_runs: dict[str, Any]) -> None:
    preempted = gqa_runs["helix_preempted"]
    _assert_helix_ran(preempted, "GQA", 2)
    assert preempted["preemptions"] > 0, "the tight KV cache should have forced preemptions"
    _assert_same_generation(preempted, gqa_runs["off_tp1"])


def test_gqa_helix_holds_kvp_times_the_context_of_duplicated_kv(gqa_runs: dict[str, Any]) -> None:
    # Same two workers, same memory each: TP=2 duplicates the single KV head on both.
    helix, tp2 = gqa_runs["helix"]["kv"], gqa_runs["off_tp2"]["kv"]
    assert helix["kv_cache_tokens"] == 2 * tp2["kv_cache_tokens"]
    assert helix["max_concurrency"] == pytest.approx(2 * tp2["max_concurrency"], rel=1e-3)  # printed with 2 decimals


@pytest.fixture(scope="module")
def mla_runs(twins: dict[str, Path], generate: Callable[..., dict[str, Any]], plain: Callable[..., dict[str, Any]],
             module_seed: int) -> dict[str, Any]:
    # 16-token blocks (vLLM's CPU MLA): the 200-token prompt spans 13 blocks.
    prompts = _prompts(module_seed + 1, (1, 2, 15, 17, 48, 200, 5))
    return {
        "helix": generate(twins["deepseek"], prompts, MAX_TOKENS,
                          additional_config={"helix": {"kvp": 2, "tpa": 1, "hopb": 2}}, **EXACT_ROPE_KWARGS),
        "off_tp1": plain("deepseek", prompts, MAX_TOKENS),
    }


def test_mla_helix_with_hopb_equals_helix_off(twins: dict[str, Path], mla_runs: dict[str, Any],
                                              assert_mla_backend: Callable[..., None]) -> None:
    _assert_helix_ran(mla_runs["helix"], "MLA", 2)
    assert_mla_backend(mla_runs["helix"], twins["deepseek"], "float32", helix=True)
    assert_mla_backend(mla_runs["off_tp1"], twins["deepseek"], "float32", helix=False)
    _assert_same_generation(mla_runs["helix"], mla_runs["off_tp1"])
    assert "Helix MoE grid" not in mla_runs["helix"]["log"]  # ep=1: vLLM's own TP experts, untouched
