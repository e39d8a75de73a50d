"""Prefill on one engine, decode on another through ``HelixConnector``.

Scheduler half on its own (fast): which tokens are saved when (chunked prefill,
preemption) and how many are loaded. End to end (slow: real
vLLM engines): a prefill engine (``kv_producer``, one greedy token) writes each prompt's KV to a
directory; a decode engine (``kv_consumer``) loads it and decodes. Its tokens and
logprobs must equal one engine that did both, for plain -> Helix (both twins,
stripes 16 and the block size) and Helix -> plain, with prompt lengths that are
and are not multiples of ``block_size * kvp``. The consumer's log must show the
load of all but the last prompt token (a decode that silently recomputed the prompt would
also match).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm.config import KVTransferConfig  # noqa: E402

from patches_free_hooks.kv_connector import HelixConnector, KVConnectorRole, _Placement  # noqa: E402
from vllm_helix.kv_store import entry_key  # noqa: E402
from vllm_helix.striping import KVStriping  # noqa: E402

MAX_TOKENS = 12
LOGPROB_TOL = 1e-3  # the equality tests' tolerance (test_generation.py)
EXACT_ROPE = {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}}
# (twin, block size, prompt lengths): 512 is a multiple of block * kvp for both twins, 600 of neither
TWINS = {"llama1": (128, (512, 600)), "deepseek": (16, (512, 600))}


def _prompts(lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(5, 2000) for _ in range(n)] for n in lengths]


def _transfer(role: str, path: Path) -> dict[str, Any]:
    return {"kv_transfer_config": {"kv_connector": "HelixConnector", "kv_role": role,
                                   "kv_connector_extra_config": {"path": str(path)}}}


def _loaded(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"HelixConnector: loading (\d+) tokens", log)]


@pytest.fixture(scope="module")
def runs(twins: dict[str, Path], generate: Callable[..., dict[str, Any]],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, (block, lengths) in TWINS.items():
        extra = EXACT_ROPE if name == "deepseek" else {}
        prompts = _prompts(lengths)
        out[f"{name}/single"] = generate(twins[name], prompts, MAX_TOKENS, **extra)
        store = tmp_path_factory.mktemp(f"{name}-plain")
        generate(twins[name], prompts, 1, **extra, **_transfer("kv_producer", store))
        for stripe in sorted({16, block}):
            out[f"{name}/plain->helix stripe {stripe}"] = generate(
                twins[name], prompts, MAX_TOKENS, **extra, **_transfer("kv_consumer", store),
                additional_config={"helix": {"kvp": 2, "tpa": 1, "stripe": stripe}})
    store = tmp_path_factory.mktemp("llama1-helix")
    helix = {"additional_config": {"helix": {"kvp": 2, "tpa": 1, "stripe": 16}}}
    generate(twins["llama1"], _prompts(TWINS["llama1"][1]), 1, **helix, **_transfer("kv_producer", store))
    out["llama1/helix->plain"] = generate(twins["llama1"], _prompts(TWINS["llama1"][1]), MAX_TOKENS,
                                          **_transfer("kv_consumer", store))
    return out


CASES = [("llama1", "plain->helix stripe 16"), ("llama1", "plain->helix stripe 128"),
         ("deepseek", "plain->helix stripe 16"), ("llama1", "helix->plain")]


@pytest.mark.slow
@pytest.mark.parametrize(("twin", "case"), CASES)
def test_a_split_decode_equals_one_engine(runs: dict[str, dict[str, Any]], twin: str, case: str) -> None:
    single, split = runs[f"{twin}/single"], runs[f"{twin}/{case}"]
    assert sorted(_loaded(split["log"])) == [n - 1 for n in TWINS[twin][1]], split["log"][-3000:]
    for ours, theirs in zip(split["results"], single["results"]):
        assert ours["ids"] == theirs["ids"]
        assert max(abs(a - b) for a, b in zip(ours["logprobs"], theirs["logprobs"])) < LOGPROB_TOL


# ------------------------------------------------------------------ scheduler half, no engine
def _connector(tmp_path: Path, role: str = "kv_both", helix: dict | None = None, block: int = 16) -> HelixConnector:
    config = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(kv_connector="HelixConnector", kv_role=role,
                                            kv_connector_extra_config={"path": str(tmp_path)}),
        model_config=SimpleNamespace(model="twin", dtype=torch.float32, use_mla=False,
                                     get_total_num_kv_heads=lambda: 1),
        cache_config=SimpleNamespace(block_size=block),
        parallel_config=SimpleNamespace(tensor_parallel_size=2 if helix else 1),
        additional_config={"helix": helix} if helix else {})
    groups = SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=["L1", "L0"])])
    return HelixConnector(config, KVConnectorRole.SCHEDULER, groups)


def _step(new: list = (), cached: list = (), scheduled: dict | None = None) -> SimpleNamespace:
    """A SchedulerOutput with ``new`` (req_id, prompt, block_ids, num_computed) and ``cached``
    (req_id, new_block_ids, num_computed, resumed) requests."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, prompt_token_ids=p, block_ids=(b,), num_computed_tokens=c)
                            for r, p, b, c in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, *_ in cached], new_block_ids=[None if b is None else (b,) for _, b, _, _ in cached],
            num_computed_tokens=[c for _, _, c, _ in cached], resumed_req_ids={r for r, _, _, res in cached if res}),
        num_scheduled_tokens=scheduled or {})


def test_a_chunked_prompt_is_saved_once_its_last_chunk_ran_and_published_after_that_step(tmp_path: Path) -> None:
    connector, prompt = _connector(tmp_path, "kv_producer"), list(range(40))
    key = entry_key("twin", "float32", prompt)
    assert connector.build_connector_meta(_step(new=[("a", prompt, [3, 1], 0)], scheduled={"a": 32})).saves == []
    meta = connector.build_connector_meta(_step(cached=[("a", [7], 32, False)], scheduled={"a": 8}))
    assert [(t.key, t.block_ids, t.tokens) for t in meta.saves] == [(key, [3, 1, 7], 40)]
    assert not (tmp_path / key / "MANIFEST.json").exists()  # the saving step has not run yet
    connector.build_connector_meta(_step(cached=[("a", None, 40, False)], scheduled={"a": 1}))
    assert connector._store.tokens(key) is None  # published; its parts are the workers' to write
    for layer in ("L0", "L1"):
        connector._store.write_part(key, layer, "r0", torch.arange(40), range(0, 1), torch.zeros(40, 1, 4))
    assert connector._store.tokens(key) == 40
    # the same prompt again is not saved twice
    assert connector.build_connector_meta(_step(new=[("b", prompt, [5, 6, 8], 0)], scheduled={"b": 40})).saves == []


def test_a_request_that_finishes_in_its_saving_step_is_published_at_once(tmp_path: Path) -> None:
    connector, prompt = _connector(tmp_path, "kv_producer"), list(range(20))
    connector.build_connector_meta(_step(new=[("a", prompt, [0, 1], 0)], scheduled={"a": 20}))
    connector.request_finished(SimpleNamespace(request_id="a"), ([0, 1],))
    assert (tmp_path / entry_key("twin", "float32", prompt) / "MANIFEST.json").exists()


@pytest.mark.parametrize(("helix", "stored", "prompt", "loaded"), [
    (None, 40, 41, 40), (None, 40, 40, 39), (None, 40, 33, 32), (None, 40, 2, 1), (None, 40, 1, 0),
    ({"kvp": 2, "tpa": 1}, 40, 41, 40), ({"kvp": 2, "tpa": 1}, 40, 17, 16),
])
def test_a_consumer_loads_all_but_the_last_prompt_token(tmp_path: Path, helix: dict | None,
                                                                     stored: int, prompt: int, loaded: int) -> None:
    connector = _connector(tmp_path, "kv_consumer", helix)
    tokens = list(range(prompt))
    request = SimpleNamespace(request_id="r", prompt_token_ids=tokens)
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)  # nothing stored
    key = entry_key("twin", "float32", tokens)
    connector._store.commit(key, stored, ["L0"], {"r0": range(0, 1)})
    assert connector.get_num_new_matched_tokens(request, 0) == (None, False)  # committed, part not visible
    connector._store.write_part(key, "L0", "r0", torch.arange(stored), range(0, 1), torch.zeros(stored, 1, 4))
    assert connector.get_num_new_matched_tokens(request, 0) == (loaded, False)
    assert connector.get_num_new_matched_tokens(request, 16) == (max(0, loaded - 16), False)
    if loaded:
        connector.update_state_after_alloc(request, None, loaded)
        meta = connector.build_connector_meta(_step(new=[("r", tokens, [4, 2], loaded)]))
        assert [(t.key, t.block_ids, t.tokens) for t in meta.loads] == [(key, [4, 2], loaded)]
        # preempted and resumed: loaded again into its new blocks
        connector.update_state_after_alloc(request, None, loaded)
        meta = connector.build_connector_meta(_step(cached=[("r", [9, 8], 0, True)]))
        assert [(t.key, t.block_ids, t.tokens) for t in meta.loads] == [(key, [9, 8], loaded)]


@pytest.mark.parametrize(("kv_heads", "tp", "kvp", "parts"), [
    (2, 4, 1, {"r0": range(0, 1), "r2": range(1, 2)}),  # plain TP=4 over 2 heads: the first replica of each writes
    (8, 2, 1, {"r0": range(0, 4), "r1": range(4, 8)}),
    (1, 2, 2, {"r0": range(0, 1), "r1": range(0, 1)}),  # Helix kvp=2: every rank holds its own stripes
    (2, 4, 2, {f"r{r}": range(r // 2, r // 2 + 1) for r in range(4)}),  # Helix kvp=2 x tpa=2
])
def test_writer_parts_name_each_writers_heads(kv_heads: int, tp: int, kvp: int, parts: dict[str, range]) -> None:
    placement = _Placement(kv_heads, tp, KVStriping(kvp, 16, 16), mla=False)
    assert placement.writer_parts() == parts
