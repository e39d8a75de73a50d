"""A layout on more GPUs than one host holds is printed as one command per node, in the form vLLM's own
`vllm serve` parser accepts (its multi-node multiprocessing flags; node 0 serves the API, the rest headless)."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm_helix.commands.cli import main  # noqa: E402
from vllm_helix.commands.serve import vllm_serve_argv  # noqa: E402
from vllm_helix.config import HelixConfig  # noqa: E402

from patches_free_hooks.serve_check import serve_engine_args  # noqa: E402


def _vllm_args(command: str, rank: int) -> Any:
    """What vLLM makes of one node's printed command (``MASTER_ADDR``/``R`` filled in as a user would)."""
    words = shlex.split(command.replace("MASTER_ADDR", "10.0.0.1").replace("--node-rank R", f"--node-rank {rank}"))
    if words[0].startswith("VLLM_ALLOW_LONG_MAX_MODEL_LEN="):  # the environment the command asks for
        words = words[1:]
    program, verb, model, *rest = words
    return serve_engine_args(vllm_serve_argv(model, rest) if program == "vllm-helix" else [verb, model, *rest])


@pytest.mark.parametrize(("model", "hardware", "gpus", "nodes"), [
    ("deepseek-r1", "h200", "16", 2),  # Helix kvp=16 on two 8-GPU hosts
    ("deepseek-r1", "gb200-nvl72", "64", 16),  # one NVLink domain, 16 four-GPU trays
])
def test_each_node_gets_a_command_vllm_parses(model: str, hardware: str, gpus: str, nodes: int,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model", model, "--hardware", hardware, "--gpus", gpus, "--context", "1M",
                 "--weight-dtype", "fp8", "--strategies", "helix", "--json"])
    best = json.loads(capsys.readouterr().out)["best"]
    assert code == 0 and best["nodes"] == nodes and best["gpus"] == int(gpus)
    (first_label, first), (other_label, other) = best["node_commands"].items()
    assert first_label == "node 0" and other_label == ("node 1" if nodes == 2 else f"node R = 1..{nodes - 1}")
    world = HelixConfig.parse(first.split("--helix ")[1].split()[0]).world_size
    for command, rank, headless in ((first, 0, False), (other, nodes - 1, True)):
        engine = _vllm_args(command, rank)
        assert (engine.nnodes, engine.node_rank, engine.master_addr, engine.master_port) == (nodes, rank, "10.0.0.1",
                                                                                                29501)
        assert engine.headless is headless and world % engine.nnodes == 0  # vLLM's rule for --nnodes


def test_a_layout_one_host_holds_prints_one_command(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--model", "deepseek-r1", "--hardware", "h200", "--context", "128K", "--weight-dtype",
                 "fp8", "--json"])
    best = json.loads(capsys.readouterr().out)["best"]
    assert code == 0 and best["nodes"] == 1 and best["node_commands"] == {}
    assert "--nnodes" not in best["command"]
