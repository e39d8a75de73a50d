"""The served prefill/decode split: plain prefill server, Helix decode server, vllm-router in front.

Fast: the three commands (what the README tells a user to run) and the log parsing.
Slow (real servers, both twins): through the router, greedy tokens and logprobs equal
one engine's for prompts that are and are not multiples of ``block_size * kvp``; the
decode server's log shows the load of all but the last token of every prompt (a
decode that silently recomputed the prompt would also match); ``vllm bench serve``
through the router completes with zero failures and every one of its prompts is
loaded, not recomputed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from vllm_helix.commands.serve import vllm_serve_argv
from vllm_helix.config import HelixConfig
from vllm_helix.harness.server import EXACT_ROPE_FLAGS
from vllm_helix.harness.split import (check_split, connector_loads, router_command, router_errors, router_installed,
                                      split_commands)


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_split_commands_are_plain_producer_and_helix_consumer_on_one_store(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # GQA: vLLM's own backend
    prefill, decode = split_commands(tmp_path / "model", tmp_path / "kv", HelixConfig.parse("kvp=2,tpa=1"),
                                     engine_args=["--max-model-len", "2048"])
    assert prefill[prefill.index("serve") + 2:][:2] == ["--helix", "off"]
    prefill_vllm = vllm_serve_argv(str(tmp_path / "model"), prefill[prefill.index("serve") + 2:])
    decode_vllm = vllm_serve_argv(str(tmp_path / "model"), decode[decode.index("serve") + 2:])
    assert "--additional-config" not in prefill_vllm
    assert json.loads(_after(decode_vllm, "--additional-config"))["helix"]["kvp"] == 2
    producer, consumer = (json.loads(_after(argv, "--kv-transfer-config")) for argv in (prefill_vllm, decode_vllm))
    assert (producer["kv_role"], consumer["kv_role"]) == ("kv_producer", "kv_consumer")
    assert producer["kv_connector"] == consumer["kv_connector"] == "HelixConnector"
    assert producer["kv_connector_extra_config"] == consumer["kv_connector_extra_config"] == {"path": str(tmp_path / "kv")}
    assert _after(prefill_vllm, "--max-model-len") == _after(decode_vllm, "--max-model-len") == "2048"


def test_router_command_is_pd_mode_with_one_prefill_and_one_decode() -> None:
    argv = router_command("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert "--vllm-pd-disaggregation" in argv
    assert (_after(argv, "--prefill"), _after(argv, "--decode")) == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert int(_after(argv, "--prometheus-port")) > 0


def test_connector_loads_reads_the_decode_log() -> None:
    log = ("INFO 12-01 [kv_connector.py:120] HelixConnector: loading 511 tokens of a 512-token prompt (request a)\n"
           "INFO something else\nHelixConnector: loading 599 tokens of a 600-token prompt (request b)\n")
    assert connector_loads(log) == [(511, 512), (599, 600)]
    assert connector_loads("no loads") == []


def test_router_errors_are_found_in_its_coloured_log() -> None:
    log = ("\x1b[2m2026-12-01 14:47:55\x1b[0m \x1b[33m WARN\x1b[0m no kv_transfer_params\n"
           "\x1b[2m2026-12-01 14:47:56\x1b[0m \x1b[31mERROR\x1b[0m decode failed\n")
    assert router_errors(log) == ["2026-12-01 14:47:56 ERROR decode failed"]
    assert router_errors("2026-12-01 WARN fine\n") == []


# ---------------------------------------------------------------------------- served, slow
LENGTHS = (512, 600, 777, 1024)  # 512, 1024: multiples of block_size * kvp for both twins (256, 32); 600, 777: not
BENCH_PROMPTS = 6


@pytest.fixture(scope="module", params=["llama", "deepseek_v3"])
def split_record(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 module_seed: int) -> dict[str, Any]:
    if not router_installed():
        pytest.skip("vllm-router is not installed: pip install 'vllm-helix[disagg]' (scripts/setup.sh does)")
    pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")
    from vllm_helix.twins import make_tiny_model

    root = tmp_path_factory.mktemp(f"split-{request.param}")
    model = make_tiny_model(root / "model", request.param, **({"kv_heads": 1} if request.param == "llama" else {}))
    rng = random.Random(module_seed)
    prompts = [[rng.randrange(5, 2000) for _ in range(n)] for n in LENGTHS]
    return check_split(model, prompts, 12, HelixConfig.parse("kvp=2,tpa=1"), root / "logs", root / "kv",
                       ["--enforce-eager", "--max-model-len", "2048", *EXACT_ROPE_FLAGS],
                       bench_prompts=BENCH_PROMPTS, bench_input_len=600)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_routed_split_equals_one_engine_and_loads_every_prompt(split_record: dict[str, Any]) -> None:
    record = split_record
    for single, routed in zip(record["single"], record["routed"]):
        assert routed["ids"] == single["ids"]
        assert len(routed["ids"]) == record["max_tokens"]
    assert record["max_logprob_diff"] <= record["logprob_tolerance"]
    assert record["loads_for_checked_prompts"] == [(n - 1, n) for n in LENGTHS]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_vllm_bench_serve_through_the_router_has_no_failures(split_record: dict[str, Any]) -> None:
    bench = split_record["bench"]
    assert (bench["completed"], bench["failed"]) == (BENCH_PROMPTS, 0)
    assert split_record["loads_during_bench"] >= BENCH_PROMPTS
    assert split_record["router_errors"] == []
