"""A prefill/decode split on one machine, served: plain prefill, Helix decode, vLLM's router in front.

The three processes of the README's served split, started as children with the
:class:`~vllm_helix.harness.server.Server` lifecycle (free ports, health waits,
process-group teardown):

* a **prefill** server, plain vLLM (``vllm-helix serve MODEL --helix off``), with the
  plugin's ``HelixConnector`` as ``kv_producer``: every prompt it computes is written
  to the store directory in the canonical token-ordered form;
* a **decode** server with Helix (``--helix kvp=..``), ``kv_consumer``: a request whose
  prompt is in the store loads all but its last token, each rank only its stripes;
* **vllm-router** (the vLLM project's router, a Rust binary on PyPI) with
  ``--vllm-pd-disaggregation``: it sends each request to the prefill server with
  ``max_tokens=1`` and, once that answers, the original request to the decode server.
  The answer comes after the producer published the entry (the connector publishes when
  the request finishes, before vLLM returns it), so the decode side always finds it.

:func:`check_split` is what the served-split test and benchmark run: the single
engine's greedy tokens (the prefill server asked directly) against the split's
(through the router), the decode server's log for the loads, and ``vllm bench
serve`` through the router.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from vllm_helix.config import HelixConfig
from vllm_helix.harness.server import (Server, ServerError, baseline_serve_args, bench_serve, cpu_env, free_port,
                                       serving, vllm_helix_command)
from vllm_helix.kv_store import kv_transfer_config

ROUTER_MODULE = "vllm_router.launch_router"  # the `vllm-router` console script's module
BENCH_METRICS = ("completed", "failed", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
                 "output_throughput")
LOGPROB_TOLERANCE = 1e-3  # the engine equality tests' tolerance (tests/patches_free_hooks/test_generation.py)


def router_installed() -> bool:
    """Whether the ``vllm-router`` package is importable (``pip install 'vllm-helix[disagg]'``)."""
    return importlib.util.find_spec("vllm_router") is not None


def router_command(prefill_url: str, decode_url: str) -> list[str]:
    """``vllm-router`` in vLLM's prefill/decode mode for one prefill and one decode server.

    Its Prometheus exporter is put on a free port (its default, 29000, would collide
    between two routers on one machine).
    """
    return [sys.executable, "-m", ROUTER_MODULE, "--vllm-pd-disaggregation", "--prefill", prefill_url,
            "--decode", decode_url, "--prometheus-port", str(free_port())]


def split_commands(model: str | Path, store: str | Path, helix: HelixConfig, dtype: str = "float32",
                   engine_args: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The prefill (plain vLLM, producer) and decode (Helix, consumer) server commands.

    ``engine_args`` go to both (e.g. ``--max-model-len``); the prefill server also gets
    the attention backend vLLM can run for ``dtype`` on this CPU
    (:func:`~vllm_helix.harness.server.baseline_serve_args`).
    """
    prefill = [*vllm_helix_command(), "serve", str(model), "--helix", "off", *baseline_serve_args(model, dtype),
               *engine_args, "--kv-transfer-config", kv_transfer_config("kv_producer", str(store))]
    decode = [*vllm_helix_command(), "serve", str(model), "--helix", helix.to_cli(), "--dtype", dtype,
              *engine_args, "--kv-transfer-config", kv_transfer_config("kv_consumer", str(store))]
    return prefill, decode


@dataclass
class SplitServers:
    """The three running processes: ``router.url`` is where clients go."""

    prefill: Server
    decode: Server
    router: Server


@contextlib.contextmanager
def served_split(model: str | Path, store: str | Path, log_dir: Path, helix: HelixConfig,
                 dtype: str = "float32", engine_args: Sequence[str] = (),
                 start_timeout_s: float = 600.0) -> Iterator[SplitServers]:
    """Start prefill and decode together, then the router; yield them, always stop all three."""
    if not router_installed():
        raise ServerError("vllm-router is not installed: pip install 'vllm-helix[disagg]' (or vllm-router)")
    prefill_cmd, decode_cmd = split_commands(model, store, helix, dtype, engine_args)
    with contextlib.ExitStack() as stack:
        prefill, decode = stack.enter_context(serving(
            Server(prefill_cmd, log_dir / "prefill.log", env=cpu_env(1), start_timeout_s=start_timeout_s),
            Server(decode_cmd, log_dir / "decode.log", env=cpu_env(helix.world_size), start_timeout_s=start_timeout_s)))
        router = stack.enter_context(Server(router_command(prefill.url, decode.url), log_dir / "router.log",
                                            start_timeout_s=120.0))
        yield SplitServers(prefill, decode, router)


def connector_loads(log_text: str) -> list[tuple[int, int]]:
    """``(loaded tokens, prompt tokens)`` of every load the decode server's ``HelixConnector`` logged."""
    return [(int(a), int(b)) for a, b in
            re.findall(r"HelixConnector: loading (\d+) tokens of a (\d+)-token prompt", log_text)]


def router_errors(log_text: str) -> list[str]:
    """The router's ERROR lines (its log is coloured: the ANSI codes are dropped first)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log_text)
    return [line for line in plain.splitlines() if re.search(r"\bERROR\b", line)]


def check_split(model: str | Path, prompts: list[list[int]], max_tokens: int, helix: HelixConfig,
                log_dir: Path, store: Path, engine_args: Sequence[str] = (), bench_prompts: int = 8,
                bench_input_len: int = 600, bench_concurrency: int = 2) -> dict[str, Any]:
    """Serve ``model`` as a split and check it against one engine; returns the record.

    The reference is the prefill server asked directly (one plain engine doing prefill
    and decode); it runs first, with the store empty, and writes the entries. The same
    prompts then go through the router: prefill again (the entry exists, nothing is
    rewritten), decode on the Helix server from the loaded KV. Then ``vllm bench serve``
    sends fresh random prompts through the router, whose prefill requests write the
    entries the decode server loads. The record holds both servers' answers, the loads
    the decode log shows, and the bench result.
    """
    name = str(model)
    with served_split(model, store, log_dir, helix, "float32", engine_args) as split:
        single = [split.prefill.greedy_completion(name, p, max_tokens) for p in prompts]
        routed = [split.router.greedy_completion(name, p, max_tokens) for p in prompts]
        loads_before_bench = len(connector_loads(split.decode.log_text()))
        bench = bench_serve(split.router.url, model, bench_input_len, 16, bench_prompts, bench_concurrency,
                            log_dir)
        loads = connector_loads(split.decode.log_text())
        router_log = split.router.log_text()
    same = [s["ids"] == r["ids"] for s, r in zip(single, routed)]
    worst = max(abs(a - b) for s, r in zip(single, routed) for a, b in zip(s["logprobs"], r["logprobs"]))
    return {
        "model": Path(model).name, "helix": helix.to_cli(), "prompt_lengths": [len(p) for p in prompts],
        "max_tokens": max_tokens, "identical_tokens": sum(same), "prompts": len(prompts),
        "max_logprob_diff": worst, "logprob_tolerance": LOGPROB_TOLERANCE,
        "loads_for_checked_prompts": loads[:loads_before_bench],
        "loads_during_bench": len(loads) - loads_before_bench,
        "router_errors": router_errors(router_log),
        "bench": {k: bench.get(k) for k in BENCH_METRICS} | {"command": bench["command"],
                                                            "input_len": bench_input_len,
                                                            "concurrency": bench_concurrency},
        "single": single, "routed": routed,
    }
