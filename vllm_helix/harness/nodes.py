"""One vLLM engine over several nodes, on one machine: the loopback stand-in for a cluster.

vLLM 0.32 runs one engine across hosts with its multiprocessing executor: every node
runs ``vllm serve`` with ``--nnodes N --node-rank R --master-addr A --master-port P``;
node 0 serves the API, the others run their workers only (``--headless``), and
vLLM's ``torch.distributed`` groups (gloo on CPU) span the nodes over TCP. Here
the nodes are processes on one machine talking over the loopback interface, each
with its own share of the cores, which is what a user can try before renting
machines (``vllm-helix plan`` prints the same commands per node for a cluster).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from vllm_helix.config import HelixConfig
from vllm_helix.harness.server import Server, core_binding, cpu_env, free_port, serving, vllm_helix_command


def node_commands(model: str | Path, helix: HelixConfig, nodes: int, master_port: int,
                  engine_args: Sequence[str] = (), master_addr: str = "127.0.0.1") -> list[list[str]]:
    """``vllm-helix serve`` for each node of one Helix engine (node 0 serves; the rest are headless)."""
    common = [*vllm_helix_command(), "serve", str(model), "--helix", helix.to_cli(), *engine_args,
              "--nnodes", str(nodes), "--master-addr", master_addr, "--master-port", str(master_port)]
    return [[*common, "--node-rank", str(rank), *(["--headless"] if rank else [])] for rank in range(nodes)]


def node_env(helix: HelixConfig, nodes: int, rank: int) -> dict[str, str]:
    """Node ``rank``'s share of this machine's cores, one range per local worker
    (``VLLM_CPU_OMP_THREADS_BIND``); where there are fewer cores than workers, workers share them
    (correct, not timed)."""
    local = helix.world_size // nodes
    return {**cpu_env(1), "VLLM_CPU_OMP_THREADS_BIND": core_binding(helix.world_size,
                                                                    range(rank * local, (rank + 1) * local))}


@contextlib.contextmanager
def served_across_nodes(model: str | Path, helix: HelixConfig, nodes: int, log_dir: Path,
                        engine_args: Sequence[str] = (), start_timeout_s: float = 600.0) -> Iterator[tuple[Server, ...]]:
    """Start every node at once; yield them (node 0 serves the API); stop all when the block ends."""
    commands = node_commands(model, helix, nodes, free_port(), engine_args)
    servers = [Server(command, log_dir / f"node{rank}.log", env=node_env(helix, nodes, rank),
                      start_timeout_s=start_timeout_s, serves=rank == 0)
               for rank, command in enumerate(commands)]
    with serving(*servers):
        yield tuple(servers)
