"""CPU benchmark: one MoE layer step per rank on each TPF x EP layout of N ranks.

For every layout (tpf, ep) with tpf * ep = N (N = 1, 2, 4) and decode batch B,
every rank's shard of one routed-expert layer is run through the plugin's CPU
expert path (``patches_free_hooks.moe_grid_hook``: vLLM's ``cpu_fused_moe`` on the
(token, slot) pairs routed to local experts) on one torch thread, rank after
rank in this process. A rank owns one core in a real run, so the step's
critical path is the slowest rank (``max``); the all-reduce that completes the
layer moves ``B x hidden`` elements per rank on every layout and is not timed.
Also reported: bytes of expert weights each rank reads for the batch (its local
experts that received a token, times its intermediate slice), the figure that
bounds a memory-bound decode step. Writes ``benchmarks/results/moe_grid_cpu.{json,md}``.

    python -m benchmarks.moe_grid_cpu [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from vllm_helix.harness.machine import describe_machine, machine_line, median_seconds
from vllm_helix.harness.results_page import write_page
from vllm_helix.moe_shards import GridShard

RESULTS = Path(__file__).parent / "results"
LAYOUTS = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4)]  # (tpf, ep)


def _experts(intermediate: int, num_experts: int, top_k: int, hidden: int):
    """The plugin's expert-map-aware subclass of vLLM's portable CPU experts."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG,
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        CPUUnquantizedExperts,
    )

    from patches_free_hooks.moe_grid_hook import _local_experts_class

    config = FusedMoEConfig(
        num_experts=num_experts, experts_per_token=top_k, hidden_dim=hidden, intermediate_size=intermediate,
        num_local_experts=num_experts, num_logical_experts=num_experts, activation=MoEActivation.SILU,
        device="cpu", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.float32,
    )
    return _local_experts_class(CPUUnquantizedExperts)(config, FUSED_MOE_UNQUANTIZED_CONFIG)


def time_rank(shard: GridShard, w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of one layer step on ``shard`` (after one warm-up)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        cpu_prepack_moe_weight,
    )

    a, b = shard.take(w13, w2)
    experts = _experts(shard.intermediate_size // shard.tpf, shard.num_experts, ids.shape[1], x.shape[1])
    a, b = cpu_prepack_moe_weight(a, experts.isa), cpu_prepack_moe_weight(b, experts.isa)
    out, expert_map, empty = torch.empty_like(x), shard.expert_map(), torch.empty(0)

    def step() -> None:
        experts.apply(out, x, a, b, weights, ids, MoEActivation.SILU, shard.num_experts, expert_map,
                      None, None, empty, empty, None, False)

    return median_seconds(step, repeats)


def bytes_read(shard: GridShard, ids: torch.Tensor, hidden: int, element_size: int) -> int:
    """Expert-weight bytes ``shard`` reads for a batch routed to ``ids``: touched local experts only."""
    touched = {int(e) for e in ids.unique()} & set(shard.experts)
    return len(touched) * shard.weight_bytes(hidden, element_size) // len(shard.experts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats (CI smoke run)")
    args = parser.parse_args()
    experts, top_k, hidden, inter = 32, 4, 1024, 512
    batches, repeats = ((1, 8), 5) if args.quick else ((1, 16, 64), 20)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, generator=gen)
        ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(batch)]).int()
        weights = torch.rand(batch, top_k, generator=gen)
        for tpf, ep in LAYOUTS:
            shards = [GridShard(r, tpf, ep, experts, inter) for r in range(tpf * ep)]
            seconds = [time_rank(s, w13, w2, x, weights, ids, repeats) for s in shards]
            read = [bytes_read(s, ids, hidden, w13.element_size()) for s in shards]
            row = {"batch": batch, "n": tpf * ep, "tpf": tpf, "ep": ep, "max_ms": 1e3 * max(seconds),
                   "mean_ms": 1e3 * statistics.mean(seconds), "max_bytes_read": max(read),
                   "min_bytes_read": min(read), "held_bytes": shards[0].weight_bytes(hidden, w13.element_size()),
                   "allreduce_bytes": batch * hidden * x.element_size()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = {**describe_machine(), "torch": torch.__version__,
               "note": "ranks timed one after another on one torch thread each; all-reduce not timed"}
    settings = {"experts": experts, "top_k": top_k, "hidden": hidden, "intermediate": inter, "dtype": "float32",
                "repeats": repeats, "kernel": "vLLM cpu_fused_moe (isa vec) via patches_free_hooks.moe_grid_hook"}
    payload = {"machine": machine, "settings": settings, "rows": rows}
    write_page(RESULTS, "moe_grid_cpu", payload, render_markdown)


def render_markdown(payload: dict) -> str:
    """The results table, with the machine and settings named."""
    m, s = payload["machine"], payload["settings"]
    lines = [
        "# MoE layer step on the TPF x EP grid (CPU)",
        "",
        f"Machine: {machine_line(m)}, torch {m['torch']}; {m['note']}.",
        (f"Layer: {s['experts']} experts, top-{s['top_k']}, hidden {s['hidden']}, intermediate "
         f"{s['intermediate']}, {s['dtype']}; kernel: {s['kernel']}; median of {s['repeats']}."),
        "",
        ("| B | N | tpf | ep | slowest rank ms | mean rank ms | expert bytes read/rank (max..min) "
         "| expert bytes held/rank | all-reduce bytes/rank |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['batch']} | {r['n']} | {r['tpf']} | {r['ep']} | {r['max_ms']:.3f} | {r['mean_ms']:.3f} "
            f"| {r['max_bytes_read'] / 2**20:.2f}..{r['min_bytes_read'] / 2**20:.2f} MiB "
            f"| {r['held_bytes'] / 2**20:.2f} MiB | {r['allreduce_bytes']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
