"""Helix across nodes: one engine over two loopback nodes through vLLM's multi-node executor.

Node 0 (``vllm-helix serve ... --nnodes 2 --node-rank 0``) serves the API with one worker;
node 1 (``--node-rank 1 --headless``) runs the other; Helix ``kvp=2`` puts one KVP rank on
each, so the query all-gather and the exchange cross the nodes (gloo over TCP: the
plugin gives the KVP group shared memory only where every rank can open the same
segments, ``patches_free_hooks/cpu_collectives.py``). Both twins: greedy tokens and
logprobs through node 0's API equal one plain engine's, for prompts that are and are
not multiples of ``block_size * kvp``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm_helix.config import HelixConfig  # noqa: E402
from vllm_helix.harness.nodes import served_across_nodes  # noqa: E402
from vllm_helix.harness.server import EXACT_ROPE_FLAGS  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
LOGPROB_TOL = 1e-3  # as test_generation.py
# block_size * kvp: 256 (Llama twin, 128-token blocks), 32 (DeepSeek twin, 16-token blocks)
LENGTHS = {"llama1": (256, 300, 515), "deepseek": (32, 45, 200)}


@pytest.fixture(scope="module", params=list(LENGTHS))
def across_nodes(request: pytest.FixtureRequest, twins: dict[str, Path], plain: Callable[..., dict[str, Any]],
                 tmp_path_factory: pytest.TempPathFactory, module_seed: int) -> dict[str, Any]:
    name = request.param
    rng = random.Random(module_seed)
    prompts = [[rng.randrange(5, 2000) for _ in range(n)] for n in LENGTHS[name]]
    expected = plain(name, prompts, MAX_TOKENS)["results"]
    engine_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                   *(EXACT_ROPE_FLAGS if name == "deepseek" else ())]
    log_dir = tmp_path_factory.mktemp(f"nodes-{name}")
    with served_across_nodes(twins[name], HelixConfig.parse("kvp=2,tpa=1"), 2, log_dir, engine_args,
                             start_timeout_s=420) as nodes:
        served = [nodes[0].greedy_completion(str(twins[name]), p, MAX_TOKENS) for p in prompts]
        logs = [node.log_text() for node in nodes]
    return {"name": name, "reference": expected, "served": served, "logs": logs}


def test_helix_across_two_nodes_equals_one_plain_engine(across_nodes: dict[str, Any]) -> None:
    for ours, theirs in zip(across_nodes["served"], across_nodes["reference"]):
        assert ours["ids"] == theirs["ids"]
        assert max(abs(a - b) for a, b in zip(ours["logprobs"], theirs["logprobs"])) < LOGPROB_TOL


def test_each_node_runs_one_kvp_rank_and_the_exchange_crosses_over_gloo(across_nodes: dict[str, Any]) -> None:
    attention = "MLA" if across_nodes["name"] == "deepseek" else "GQA"
    for rank, log in enumerate(across_nodes["logs"]):
        assert f"Helix {attention} attention active" in log and f"KVP rank {rank} of 2" in log, log[-3000:]
        assert f"KVP rank {1 - rank} of 2" not in log
        assert "exchange: all-to-all over gloo" in log  # over TCP, not shared memory
        assert "open shm" not in log
