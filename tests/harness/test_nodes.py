"""The loopback nodes' commands are what vLLM's serve parser takes, and each node gets its own cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_helix.commands.serve import vllm_serve_argv
from vllm_helix.config import HelixConfig
from vllm_helix.harness import nodes, server


def test_every_node_runs_the_same_engine_with_its_rank_and_node_0_alone_serves(tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")
    from patches_free_hooks.serve_check import serve_engine_args

    helix = HelixConfig.parse("kvp=4,tpa=1")
    commands = nodes.node_commands(tmp_path / "model", helix, 2, 29501, ["--max-model-len", "1024"])
    assert len(commands) == 2
    for rank, command in enumerate(commands):
        argv = vllm_serve_argv(str(tmp_path / "model"), command[command.index("serve") + 2:])
        args = serve_engine_args(argv)
        assert (args.nnodes, args.node_rank, args.headless) == (2, rank, rank > 0)
        assert (args.master_addr, args.master_port, args.max_model_len) == ("127.0.0.1", 29501, 1024)
        assert json.loads(argv[argv.index("--additional-config") + 1])["helix"]["kvp"] == 4


@pytest.mark.parametrize(("layout", "cores", "bindings"), [
    ("kvp=2,tpa=1", [0, 1], ["0", "1"]),  # one worker per node, one core each
    ("kvp=2,tpa=1", [0, 1, 2, 3], ["0-1", "2-3"]),
    ("kvp=2,tpa=2", [0, 1], ["0|1", "0|1"]),  # four workers on two cores: shared (correct, not timed)
    ("kvp=4,tpa=1", [4, 5, 6, 7, 8, 9, 10, 11], ["4-5|6-7", "8-9|10-11"]),
])
def test_each_node_binds_its_workers_to_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch, layout: str,
                                                               cores: list[int], bindings: list[str]) -> None:
    monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: set(cores))
    helix = HelixConfig.parse(layout)
    assert [nodes.node_env(helix, 2, rank)["VLLM_CPU_OMP_THREADS_BIND"] for rank in range(2)] == bindings
