"""Offline twins shared by the plugin tests (built once per session, a few seconds each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_helix.harness.server import baseline_attention_backend, baseline_engine_kwargs, cpu_env, kv_cache_tokens
from vllm_helix.commands.twins import make_tiny_model


@pytest.fixture(scope="session")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """float32 twins: ``deepseek`` (MLA), ``llama1`` (GQA, 1 KV head), ``llama2`` (2 KV heads)."""
    root = tmp_path_factory.mktemp("twins")
    return {
        "deepseek": make_tiny_model(root / "deepseek", "deepseek_v3"),
        "llama1": make_tiny_model(root / "llama1", "llama", kv_heads=1),
        "llama2": make_tiny_model(root / "llama2", "llama"),
    }


import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable  # noqa: E402

from vllm_helix.config import from_additional_config  # noqa: E402

DRIVER = Path(__file__).with_name("generate_driver.py")
# vLLM's engine core in the driver's own process (``LLM`` supports both): one spawned
# process and one vLLM import fewer per engine (about 15 s of a 45 s run on these machines).
# The served path, engine core in its own process, is what test_serve_e2e, the split
# harness and the demo run.
IN_PROCESS_ENGINE_CORE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _kv_report(log: str) -> dict[str, float]:
    size = kv_cache_tokens(log)
    conc = re.search(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", log)
    assert size is not None and conc, log[-3000:]
    return {"kv_cache_tokens": size, "max_concurrency": float(conc.group(1))}


def _workers_to_bind(llm_kwargs: dict[str, Any]) -> int:
    """Workers the test binds to cores itself: vLLM's TP workers, and a Helix layout with more workers
    than cores (they share the cores, as a user may bind them; the plugin binds the rest)."""
    helix = from_additional_config(llm_kwargs.get("additional_config") or {})
    if helix is not None:
        return helix.world_size if helix.world_size > len(os.sched_getaffinity(0)) else 1
    return int(llm_kwargs.get("tensor_parallel_size", 1))


@pytest.fixture(scope="session")
def generate(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    """``generate(model, prompts, max_tokens, **llm_kwargs)``: greedy run in a fresh, killable process
    (``rounds``: more prompt lists generated after ``prompts``, in order, by the same engine).

    Returns the driver's JSON plus ``log`` (vLLM's output) and ``kv`` (its KV-capacity report).
    A run without Helix gets the attention backend vLLM can run for its dtype on this CPU
    (:func:`vllm_helix.harness.server.baseline_attention_backend`) unless the test names one.
    """
    root = tmp_path_factory.mktemp("generate")
    counter = iter(range(10**6))

    def run(model: Path, prompts: list[list[int]], max_tokens: int, timeout_s: float = 480,
            repeat: bool = False, rounds: list[list[list[int]]] = (), **llm_kwargs: Any):
        out = root / f"run{next(counter)}.json"
        llm_kwargs.setdefault("dtype", "float32")
        if "helix" not in llm_kwargs.get("additional_config", {}):
            llm_kwargs = {**baseline_engine_kwargs(model, llm_kwargs["dtype"]), **llm_kwargs}
        spec = {"model": str(model), "out": str(out), "prompts": prompts, "max_tokens": max_tokens,
                "llm_kwargs": llm_kwargs, "repeat": repeat, "rounds": list(rounds)}
        env = {**cpu_env(_workers_to_bind(llm_kwargs)), **IN_PROCESS_ENGINE_CORE}
        proc = subprocess.Popen([sys.executable, str(DRIVER), json.dumps(spec)], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            log, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"vLLM run did not finish within {timeout_s}s")
        assert proc.returncode == 0 and out.exists(), log[-6000:]
        result = json.loads(out.read_text())
        result["log"] = log
        result["kv"] = _kv_report(log)
        return result

    return run


@pytest.fixture(scope="session")
def assert_mla_backend() -> Callable[[dict[str, Any], Path, str, bool], None]:
    """``assert_mla_backend(run, model, dtype, helix)``: the MLA backend vLLM logged is the intended one.

    Helix runs on the plugin's ``CPU_MLA``; a run without Helix on the backend that
    :func:`vllm_helix.harness.server.baseline_attention_backend` decides for its dtype and CPU
    (``AMX_MLA`` for bf16 on AMX CPUs). GQA has one CPU backend, selected without a log line.
    """

    def check(run: dict[str, Any], model: Path, dtype: str, helix: bool) -> None:
        expected = "CPU_MLA" if helix else baseline_attention_backend(model, dtype)
        assert f"Using {expected} backend" in run["log"], run["log"][-3000:]
        for other in {"CPU_MLA", "AMX_MLA"} - {expected}:
            assert f"Using {other} backend" not in run["log"], run["log"][-3000:]

    return check
