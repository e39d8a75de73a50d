"""``vllm-helix serve ... --check [PLATFORM]``: vLLM's own serve parser and the plugin's start-up checks,
for this machine or a named platform, with no engine started."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm_helix.config import HelixConfigError  # noqa: E402
from vllm_helix.serving_rules import Platform  # noqa: E402
from patches_free_hooks.serve_check import check  # noqa: E402
from vllm_helix.commands.serve import _take_check, vllm_serve_argv  # noqa: E402


def _argv(model: Path, *args: str) -> list[str]:
    return vllm_serve_argv(str(model), list(args))


def test_a_servable_layout_passes_for_this_machine_and_for_a_gpu(twins: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    verdict = check(_argv(twins["llama1"], "--helix", "kvp=2,tpa=1"), None)
    assert verdict.startswith("ok: Helix kvp=2,tpa=1") and "this machine" in verdict
    assert "decode_context_parallel_size=2" in verdict
    verdict = check(_argv(twins["llama1"], "--helix", "kvp=2,tpa=1"), Platform.parse("cuda:9.0"))
    assert "CUDA compute capability 9.0" in verdict and "stripe=16" in verdict  # the CUDA backend's block size
    assert check(_argv(twins["llama1"], "--helix", "off"), None).startswith("ok: plain vLLM")
    for rank, headless in (("0", ()), ("1", ("--headless",))):  # one worker on each of two one-core nodes
        assert check(_argv(twins["llama1"], "--helix", "kvp=2,tpa=1", "--nnodes", "2", "--node-rank", rank,
                           "--master-addr", "10.0.0.1", *headless), Platform.parse("cpu:1")).startswith("ok: Helix")


@pytest.mark.parametrize(("args", "platform", "message"), [
    (("--helix", "kvp=2,tpa=1"), "cpu:1", "2 CPU workers need at least 2 cores but only 1"),
    (("--helix", "kvp=2,tpa=1,hopb=2"), "cuda:9.0", "hopb=2: HOP-B runs in the plugin's CPU backends"),
    (("--helix", "kvp=2,tpa=2"), "cpu:8", "tpa=2 exceeds the model's 1 KV heads"),
    (("--helix", "off", "--kv-transfer-config", '{"kv_connector": "HelixConnector", "kv_role": "kv_producer", '
      '"kv_connector_extra_config": {"pth": "/x"}}'), None, "unknown HelixConnector option 'pth'"),
    (("--helix", "kvp=2,tpa=1", "--nnodes", "2", "--node-rank", "1"), "cpu:1",
     "--node-rank 1 runs workers only: add --headless"),
    (("--helix", "kvp=2,tpa=1", "--nnodes", "2", "--node-rank", "0", "--headless"), "cpu:1",
     "--node-rank 0 serves the API: drop --headless"),
    (("--helix", "kvp=2,tpa=1", "--nnodes", "4"), "cpu:1", "2 workers cannot be split evenly over 4 nodes"),
])
def test_a_command_that_would_not_start_is_refused_with_the_rule(twins: dict[str, Path], args: tuple[str, ...],
                                                                 platform: str | None, message: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    target = Platform.parse(platform) if platform else None
    with pytest.raises(HelixConfigError, match=message):
        check(_argv(twins["llama1"], *args), target)


@pytest.mark.parametrize(("text", "expected"), [
    ("cpu", Platform("cpu")), ("CPU:64", Platform("cpu", cores=64)),
    ("cuda:9.0", Platform("cuda", capability=(9, 0))), ("cuda:10.3", Platform("cuda", capability=(10, 3))),
])
def test_platforms_are_named_as_cpu_or_a_cuda_capability(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected
    for bad in ("gpu", "cuda", "cuda:9", "cpu:0", "h100"):
        with pytest.raises(HelixConfigError, match="name it as cpu, cpu:CORES or cuda:MAJOR.MINOR"):
            Platform.parse(bad)


def test_serve_takes_the_check_flag_out_of_the_vllm_arguments() -> None:
    assert _take_check(["--helix", "kvp=2", "--check"]) == ([], ["--helix", "kvp=2"])
    assert _take_check(["--check", "cuda:9.0", "--port", "1"]) == (["cuda:9.0"], ["--port", "1"])
    assert _take_check(["--check=cpu:8", "--helix", "off"]) == (["cpu:8"], ["--helix", "off"])
    assert _take_check(["--check", "--port", "1"]) == ([], ["--port", "1"])
    assert _take_check(["--port", "1"]) == (None, ["--port", "1"])


def test_the_cli_answers_in_one_line_with_exit_0_or_2(twins: dict[str, Path]) -> None:
    cli = [sys.executable, "-m", "vllm_helix.commands.cli", "serve", str(twins["llama1"])]
    preset = Path(__file__).resolve().parents[2] / "configs" / "tiny-llama.yaml"  # checked where it says it runs
    commands = {"good": [*cli, "--helix", "kvp=1,tpa=1", "--check"],
                "bad": [*cli, "--helix", "kvp=2,tpa=1,hopb=2", "--check", "cuda:9.0"],
                "own": [*cli, "--helix-config", str(preset), "--check"]}
    with ThreadPoolExecutor(len(commands)) as pool:  # three vLLM imports at once
        good, bad, own = pool.map(lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=300),
                                  commands.values())
    assert good.returncode == 0 and good.stdout.count("\n") == 1 and good.stdout.startswith("ok: Helix"), good
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.strip().splitlines()[-1].startswith(
        "error: hopb=2"), bad
    assert own.returncode == 0 and "on CPU with 2 cores" in own.stdout, own
