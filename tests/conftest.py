"""Shared pytest set-up: fresh random seeds that are printed, so a failure can be replayed; second
mount points of a directory (a shared file system seen from two hosts); the offline twins and
the vLLM engines the end-to-end tests run (each in its own killable process; the plain
reference engines shared by the whole session)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_helix.twins import make_tiny_model
from vllm_helix.config import from_additional_config
from vllm_helix.harness.server import (EXACT_ROPE_KWARGS, baseline_attention_backend, baseline_engine_kwargs, cpu_env,
                                       kv_cache_tokens)


@pytest.fixture(autouse=True, scope="session")
def no_user_profiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The planner reads the user's calibrated profiles before the presets (``vllm-helix calibrate``); the
    suite reads an empty profile directory instead, so a developer's own calibration never changes a test."""
    previous = os.environ.get("VLLM_HELIX_PROFILE_DIR")
    os.environ["VLLM_HELIX_PROFILE_DIR"] = str(tmp_path_factory.mktemp("user-profiles"))
    yield
    if previous is None:
        os.environ.pop("VLLM_HELIX_PROFILE_DIR", None)
    else:
        os.environ["VLLM_HELIX_PROFILE_DIR"] = previous


@pytest.fixture
def fake_machine_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's measured rates (memory, matmul, the workers' collective) replaced by fixed ones in
    ``vllm_helix.harness.machine_rates``, for tests of what a calibration writes without timing this VM."""
    from vllm_helix.harness import machine_rates

    monkeypatch.setattr(machine_rates, "measure_memory", lambda repeats: {"copy_bytes_per_s": 20e9,
                                                                          "read_bytes_per_s": 15e9})
    monkeypatch.setattr(machine_rates, "measure_matmul", lambda dtype, size, repeats: 1e11)
    monkeypatch.setattr(machine_rates, "measure_collectives", lambda collectives, repeats: {
        "transport": "gloo", **{op: {"latency_s": 5e-6, "bandwidth_bytes_per_s": 4e9}
                                for op in ("all_reduce", "all_gather")}})


@pytest.fixture
def fresh_seed(request: pytest.FixtureRequest) -> int:
    """A new seed per run (HELIX_TEST_SEED=N replays one), reported on failure."""
    seed = int(os.environ.get("HELIX_TEST_SEED", random.SystemRandom().randrange(2**31)))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed} (replay with HELIX_TEST_SEED={seed})")
    return seed


@pytest.fixture(scope="module")
def module_seed() -> int:
    """Like ``fresh_seed``, for module-scoped fixtures (expensive runs shared by several tests)."""
    seed = int(os.environ.get("HELIX_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"module seed={seed} (replay with HELIX_TEST_SEED={seed})")
    return seed


@pytest.fixture(scope="session")
def bind_mount() -> Iterator[Callable[..., bool]]:
    """``bind_mount(source, target, required=True)``: ``target`` becomes a second mount point of
    ``source``, the way a decode host sees a store another host writes. Where this user cannot mount
    (needs root, as in CI) the test skips, or, with ``required=False``, the call returns False.
    Everything mounted is unmounted when the session ends."""
    mounted: list[Path] = []

    def mount(source: Path, target: Path, required: bool = True) -> bool:
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            if required:
                pytest.skip(f"a second mount point needs mount rights ({done.stderr.strip()})")
            return False
        mounted.append(target)
        return True

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture(scope="session")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """float32 twins: ``deepseek`` (MLA), ``llama1`` (GQA, 1 KV head), ``llama2`` (2 KV heads)."""
    root = tmp_path_factory.mktemp("twins")
    return {
        "deepseek": make_tiny_model(root / "deepseek", "deepseek_v3"),
        "llama1": make_tiny_model(root / "llama1", "llama", kv_heads=1),
        "llama2": make_tiny_model(root / "llama2", "llama"),
    }


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


class _ReferenceEngine:
    """One plain engine in its own process group, kept while the session runs (see ``reference``)."""

    def __init__(self, model: Path, llm_kwargs: dict[str, Any], root: Path) -> None:
        root.mkdir(parents=True)
        self.root, self.log_path, self.requests = root, root / "engine.log", iter(range(10**6))
        spec = {"model": str(model), "llm_kwargs": llm_kwargs}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(DRIVER), "--serve", json.dumps(spec)],
                                         env={**cpu_env(1), **IN_PROCESS_ENGINE_CORE}, start_new_session=True,
                                         stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True)

    def generate(self, prompts: list[list[int]], max_tokens: int, timeout_s: float) -> dict[str, Any]:
        out = self.root / f"answer{next(self.requests)}.json"
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while not out.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"reference engine exited ({self.proc.returncode}):\n{self.log()[-6000:]}")
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"reference engine gave no answer within {timeout_s}s:\n{self.log()[-6000:]}")
            time.sleep(0.1)
        result = json.loads(out.read_text())
        result["log"] = self.log()
        result["kv"] = _kv_report(result["log"])
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., dict[str, Any]]]:
    """``reference(model, prompts, max_tokens, **llm_kwargs)``: greedy results of "one plain engine"
    (TP=1, no Helix), the side every equality test compares against.

    One engine per (model, ``llm_kwargs``) serves the whole session, so the many tests that compare
    with a plain engine of the same twin share it instead of starting one each (an engine start is
    most of such a test's time here). Its results are independent of what it ran before (greedy,
    float32; batch composition moves logprobs by ~1e-6, far inside the tests' 1e-3). Returns
    ``results``, ``log`` (the engine's log so far) and ``kv``, like ``generate``.
    """
    root = tmp_path_factory.mktemp("reference")
    engines: dict[str, _ReferenceEngine] = {}

    def run(model: Path, prompts: list[list[int]], max_tokens: int, timeout_s: float = 480,
            **llm_kwargs: Any) -> dict[str, Any]:
        llm_kwargs.setdefault("dtype", "float32")
        llm_kwargs = {**baseline_engine_kwargs(model, llm_kwargs["dtype"]), **llm_kwargs}
        key = json.dumps([str(model), llm_kwargs], sort_keys=True)
        if key not in engines:
            engines[key] = _ReferenceEngine(model, llm_kwargs, root / f"engine{len(engines)}")
        return engines[key].generate(prompts, max_tokens, timeout_s)

    try:
        yield run
    finally:
        for engine in engines.values():
            engine.close()


# The plain engine each twin's equality tests compare against (one per twin for the session): GQA twins
# with 32-token blocks, the DeepSeek twin with PyTorch's rotary (vLLM's CPU kernel mis-indexes MLA).
REFERENCE_KWARGS: dict[str, dict[str, Any]] = {"llama1": {"block_size": 32}, "llama2": {"block_size": 32},
                                               "deepseek": EXACT_ROPE_KWARGS}


@pytest.fixture(scope="session")
def plain(reference: Callable[..., dict[str, Any]],
          twins: dict[str, Path]) -> Callable[..., dict[str, Any]]:
    """``plain(twin, prompts, max_tokens)``: the results of the twin's one reference engine (``reference``
    with the twin's :data:`REFERENCE_KWARGS`), so every test compares against the same engine."""
    def run(twin: str, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
        return reference(twins[twin], prompts, max_tokens, **REFERENCE_KWARGS[twin])
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
