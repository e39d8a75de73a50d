"""Every Helix grid shape end to end, on four workers: correct where workers share the cores.

These machines have two cores; four workers share them (``VLLM_CPU_OMP_THREADS_BIND=0|1|0|1``,
which the plugin honours as the user's binding): correctness only, never timed. One engine per
shape, short prompts, each against one plain engine (TP=1) of the same twin:

* GQA ``kvp=2 x tpa=2`` (Llama twin, 2 KV heads) as the decode side of a split whose plain
  producer runs TP=2: half the prompts come from the store (each TPA slice loads only its KV
  heads), read through a second mount point of the producer's directory (the split across
  hosts on a shared file system), the rest are computed by Helix itself;
* GQA ``kvp=4 x tpa=1`` (Llama twin, 1 KV head);
* MLA ``kvp=4`` with the MoE grid ``tpf=2 x ep=2`` (DeepSeek-V3 twin).

Prompt lengths cross the ``block_size * kvp`` rows of every layout.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from vllm_helix.moe_shards import grid_position
from vllm_helix.harness.server import EXACT_ROPE_KWARGS

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
LOGPROB_TOL = 1e-3  # as test_generation.py
GQA = {"block_size": 32}  # rows of 64 (kvp=2) and 128 (kvp=4) tokens
E, H, I = 8, 256, 128  # the DeepSeek-V3 twin's routed experts (test_moe_grid_hook.py)


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 2000) for _ in range(n)] for n in lengths]


def _transfer(role: str, path: Path) -> dict[str, Any]:
    return {"kv_transfer_config": {"kv_connector": "HelixConnector", "kv_role": role,
                                   "kv_connector_extra_config": {"path": str(path)}}}


@pytest.fixture(scope="module")
def shapes(twins: dict[str, Path], generate: Callable[..., dict[str, Any]], plain: Callable[..., dict[str, Any]],
           module_seed: int, tmp_path_factory: pytest.TempPathFactory,
           bind_mount: Callable[..., bool]) -> dict[str, Any]:
    loaded, computed = _prompts(module_seed, (70, 200)), _prompts(module_seed + 1, (1, 33, 130))
    root = tmp_path_factory.mktemp("grid-split")
    store = root / "kv"
    generate(twins["llama2"], loaded, 1, tensor_parallel_size=2, **GQA, **_transfer("kv_producer", store))
    # the decode side reads the store through a second mount point of the same directory, as a decode
    # host does on a file system both hosts mount (where this user may mount; else the same path)
    seen = root / "seen-from-the-decode-host"
    mounted = bind_mount(store, seen, required=False)
    gqa4 = _prompts(module_seed + 2, (3, 127, 129, 300))
    mla = _prompts(module_seed + 3, (2, 63, 65, 200))
    split = generate(twins["llama2"], loaded + computed, MAX_TOKENS, **GQA,
                     **_transfer("kv_consumer", seen if mounted else store), additional_config={"helix": "kvp=2,tpa=2"})
    return {
        "mounted": mounted,
        "kvp=2,tpa=2 (split)": (split, plain("llama2", loaded + computed, MAX_TOKENS)),
        "kvp=4,tpa=1": (
            generate(twins["llama1"], gqa4, MAX_TOKENS, **GQA, additional_config={"helix": "kvp=4,tpa=1"}),
            plain("llama1", gqa4, MAX_TOKENS)),
        "mla kvp=4, tpf=2 x ep=2": (
            generate(twins["deepseek"], mla, MAX_TOKENS, **EXACT_ROPE_KWARGS,
                     additional_config={"helix": "kvp=4,tpa=1,tpf=2,ep=2"}),
            plain("deepseek", mla, MAX_TOKENS)),
        "loaded": loaded,
    }


@pytest.mark.parametrize("shape", ["kvp=2,tpa=2 (split)", "kvp=4,tpa=1", "mla kvp=4, tpf=2 x ep=2"])
def test_each_grid_shape_equals_one_plain_engine(shapes: dict[str, Any], shape: str) -> None:
    helix, plain = shapes[shape]
    kvp = 2 if shape.startswith("kvp=2") else 4
    for rank in range(kvp):
        assert f"KVP rank {rank} of {kvp}" in helix["log"], helix["log"][-3000:]
    for i, (ours, theirs) in enumerate(zip(helix["results"], plain["results"], strict=True)):
        assert ours["ids"] == theirs["ids"], f"prompt {i}: greedy tokens differ"
        assert max(abs(a - b) for a, b in zip(ours["logprobs"], theirs["logprobs"])) < LOGPROB_TOL


def test_the_tpa_slices_load_the_plain_producers_kv(shapes: dict[str, Any]) -> None:
    log = shapes["kvp=2,tpa=2 (split)"][0]["log"]
    loads = sorted(int(n) for n in re.findall(r"HelixConnector: loading (\d+) tokens", log))
    assert loads == sorted(len(p) - 1 for p in shapes["loaded"]), log[-3000:]
    if not shapes["mounted"]:
        pytest.skip("loaded through the producer's own path: this user cannot bind-mount a second view")


def test_the_moe_grid_spreads_the_routed_experts_over_four_ranks(shapes: dict[str, Any]) -> None:
    log = shapes["mla kvp=4, tpf=2 x ep=2"][0]["log"]
    for rank in range(4):
        tpf_rank, ep_rank = grid_position(rank, 2, 2)
        assert f"rank {rank} is TPF rank {tpf_rank} of EP group {ep_rank}" in log, log[-3000:]
    assert {grid_position(rank, 2, 2) for rank in range(4)} == {(0, 0), (1, 0), (0, 1), (1, 1)}
    held = [int(n) for n in re.findall(r"Helix MoE grid weights: .*?, (\d+) bytes of routed experts", log)]
    full = 3 * E * I * H * 4  # float32 w13 + w2 of one layer
    assert held == [full // 4] * 4, log[-3000:]
