"""`vllm-helix serve` runs vLLM's OpenAI server with Helix; vLLM's own client drives it.

One server (the DeepSeek-V3 twin, Helix kvp=2 from the preset) on a free port,
always stopped: both OpenAI endpoints answer, greedy output over HTTP equals
the offline Helix-off engine's, and ``vllm bench serve`` (random dataset)
completes with zero failed requests.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm_helix.harness.server import EXACT_ROPE_FLAGS, Server, cpu_env, vllm_command, vllm_helix_command  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(twins: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [*vllm_helix_command(), "serve", str(twins["deepseek"]),
               "--helix-config", str(REPO / "configs" / "tiny-deepseek-v3.yaml"),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
               *EXACT_ROPE_FLAGS]
    with Server(command, log, env=cpu_env(1), start_timeout_s=420) as running:
        yield running


def test_server_runs_helix_and_reports_kvp_times_the_capacity(server: Server) -> None:
    log = server.log_text()
    assert "Helix MLA attention active" in log and "KVP rank 1 of 2" in log
    assert "decode_context_parallel_size=2" in log


def test_completions_equal_the_offline_helix_off_engine(
    server: Server, twins: dict[str, Path], plain: Callable[..., dict[str, Any]]
) -> None:
    prompts = [[(7 * i + 3) % 1900 + 5 for i in range(n)] for n in (1, 40, 150)]
    expected_results = plain("deepseek", prompts, 32)["results"]
    for prompt, expected in zip(prompts, expected_results):
        got = server.greedy_completion(str(twins["deepseek"]), prompt, 32)
        assert got["ids"] == expected["ids"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], expected["logprobs"])) <= 1e-3


def test_chat_completions_answer(server: Server, twins: dict[str, Path]) -> None:
    reply = server.post("/v1/chat/completions", {
        "model": str(twins["deepseek"]), "messages": [{"role": "user", "content": "the cache of the shard"}],
        "max_tokens": 12, "temperature": 0.0})
    assert reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == 12


def test_vllm_bench_serve_completes_without_failures(server: Server, twins: dict[str, Path], tmp_path: Path) -> None:
    command = [*vllm_command(), "bench", "serve", "--backend", "vllm", "--base-url", server.url,
               "--model", str(twins["deepseek"]), "--dataset-name", "random", "--random-input-len", "96",
               "--random-output-len", "16", "--num-prompts", "12", "--max-concurrency", "4", "--ignore-eos",
               "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=cpu_env(1))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["total_output_tokens"] == 12 * 16


REFUSALS = (  # (twin, layout, the one line serve prints), refused inside vLLM's server process, before any worker
    ("deepseek", "kvp=1,tpa=2", "error: MLA models have one latent KV head, so tpa must be 1 (got tpa=2); "
                                "use kvp=2,tpa=1"),
    ("llama1", "kvp=2,tpa=1,stripe=48", "error: stripe=48 must divide the KV block size 128"),
)


def test_model_dependent_refusals_are_one_line_and_exit_2(twins: dict[str, Path]) -> None:
    # Started side by side: each start is mostly vLLM's import, and the refusal comes before any worker.
    from concurrent.futures import ThreadPoolExecutor

    def serve(model: str, helix: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*vllm_helix_command(), "serve", str(twins[model]), "--helix", helix,
                               "--dtype", "float32", "--port", "1"],
                              capture_output=True, text=True, timeout=300, env=cpu_env(1))

    with ThreadPoolExecutor(len(REFUSALS)) as pool:
        runs = list(pool.map(lambda case: serve(case[0], case[1]), REFUSALS))
    for (_, _, message), done in zip(REFUSALS, runs):
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
        assert "Traceback" not in done.stdout + done.stderr
