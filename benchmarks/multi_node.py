"""Helix across two loopback nodes against Helix on one node: what crossing a node costs per decode step.

The same engine (the Llama twin with one KV head, Helix ``kvp=2``, one worker per KVP
rank, each on its own core) served two ways, one after the other, in pairs:
``vllm-helix serve`` on one node, and the same layout over two nodes through vLLM's
multi-node multiprocessing executor (:mod:`vllm_helix.harness.nodes`: node 1
``--headless``, the nodes on the loopback interface). On two nodes the KVP group's
collectives (the query all-gather and the exchange, twice per layer per step) run over
gloo/TCP; on one node over vLLM's shared-memory collectives where its CPU build has
them, otherwise over gloo too (the worker log names the route; the table copies it).
Each deployment decodes with ``vllm bench serve`` (random prompts, one at a time);
the table gives TPOT per deployment and the per-pair ratio, median and range.

Writes ``benchmarks/results/multi_node.{json,md}``.

    .venv/bin/python -m benchmarks.multi_node        # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

from vllm_helix.twins import benchmark_twin
from vllm_helix.config import HelixConfig
from vllm_helix.harness.machine import machine_sentence
from vllm_helix.harness.nodes import node_env, served_across_nodes
from vllm_helix.harness.results_page import render_page, stamped, write_page
from vllm_helix.harness.server import Server, bench_serve, cpu_env, vllm_helix_command

RESULTS = Path(__file__).resolve().parent / "results"
HELIX = HelixConfig.parse("kvp=2,tpa=1")


def _route(log: str) -> str:
    found = re.search(r"exchange: ([^\n]+)", log)
    return found.group(1).strip() if found else "not logged"


def one_run(nodes: int, model: Path, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    engine_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", str(args.input_len + 2 * args.output_len)]
    log_dir.mkdir(parents=True, exist_ok=True)
    if nodes == 1:
        command = [*vllm_helix_command(), "serve", str(model), "--helix", HELIX.to_cli(), *engine_args]
        with Server(command, log_dir / "node0.log", env=cpu_env(HELIX.world_size), start_timeout_s=900) as server:
            bench = bench_serve(server.url, model, args.input_len, args.output_len, args.prompts, 1, log_dir)
            logs = [server.log_text()]
    else:
        with served_across_nodes(model, HELIX, nodes, log_dir, engine_args, start_timeout_s=900) as servers:
            bench = bench_serve(servers[0].url, model, args.input_len, args.output_len, args.prompts, 1, log_dir)
            logs = [server.log_text() for server in servers]
    return {"nodes": nodes, "tpot_ms": bench["mean_tpot_ms"], "failed": bench["failed"],
            "routes": sorted({_route(log) for log in logs})}


def summarise(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [p["two"]["tpot_ms"] / p["one"]["tpot_ms"] for p in pairs]
    diffs = [p["two"]["tpot_ms"] - p["one"]["tpot_ms"] for p in pairs]
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "extra_ms_per_step_median": statistics.median(diffs),
            "tpot_one_node_ms": statistics.median(p["one"]["tpot_ms"] for p in pairs),
            "tpot_two_nodes_ms": statistics.median(p["two"]["tpot_ms"] for p in pairs)}


def markdown(payload: dict[str, Any]) -> str:
    s, first = payload["summary"], payload["pairs"][0]
    lines = [
        "# Helix across two loopback nodes against one node",
        "",
        f"{machine_sentence(payload['machine'], payload['date'])} Twin `{payload['twin']}` ({payload['layers']} layers), Helix "
        f"`{payload['helix']}`, `vllm bench serve` with {payload['prompts']} random prompts of "
        f"{payload['input_len']} tokens, {payload['output_len']} output tokens, one at a time; {len(payload['pairs'])} "
        "pairs, one node then two nodes in each.",
        "",
        "| deployment | exchange route (worker logs) | TPOT median over pairs (ms) |",
        "|---|---|---|",
        f"| one node, 2 workers | {', '.join(first['one']['routes'])} | {s['tpot_one_node_ms']:.2f} |",
        f"| two nodes, 1 worker each | {', '.join(first['two']['routes'])} | {s['tpot_two_nodes_ms']:.2f} |",
        "",
        "| pair | one node TPOT (ms) | two nodes TPOT (ms) | ratio |",
        "|---|---|---|---|",
    ]
    for i, pair in enumerate(payload["pairs"], 1):
        lines.append(f"| {i} | {pair['one']['tpot_ms']:.2f} | {pair['two']['tpot_ms']:.2f} | "
                     f"{pair['two']['tpot_ms'] / pair['one']['tpot_ms']:.3f} |")
    same_route = first["one"]["routes"] == first["two"]["routes"]
    verdict = ("no difference beyond the pairs' spread (their ratios straddle 1)"
               if s["ratio_min"] <= 1.0 <= s["ratio_max"] else
               f"{s['extra_ms_per_step_median']:+.2f} ms per decode step, i.e. "
               f"{s['extra_ms_per_step_median'] / payload['layers'] / 2 * 1000:+.0f} us per KVP collective "
               f"({payload['layers']} layers, two collectives each)")
    lines += [
        "",
        f"Two nodes / one node: median {s['ratio_median']:.3f}x (range {s['ratio_min']:.3f}-{s['ratio_max']:.3f}): "
        f"{verdict}. "
        + ("On this machine both deployments run the exchange over gloo (its vLLM build has no shared-memory "
           "collectives), so crossing a node changes only which processes hold the ranks. " if same_route else "")
        + "Loopback TCP is the best case for a network: between real hosts add the link's latency to every "
        "collective (two per layer per decode step).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--twin", default="llama_kv1")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the page from the committed JSON")
    args = parser.parse_args()
    if args.markdown_only:
        render_page(RESULTS, "multi_node", markdown)
        return
    model = benchmark_twin(args.twin)
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    pairs = []
    with tempfile.TemporaryDirectory(prefix="helix-nodes-") as tmp:
        for i in range(args.pairs):
            pair = {}
            for key, nodes in (("one", 1), ("two", 2)):
                print(f"[pair {i + 1}] Helix {HELIX.to_cli()} on {nodes} node(s) ...", flush=True)
                pair[key] = one_run(nodes, model, args, Path(tmp) / f"{i}-{nodes}")
                print(f"  TPOT {pair[key]['tpot_ms']:.2f} ms, exchange {pair[key]['routes']}", flush=True)
                if pair[key]["failed"]:
                    raise SystemExit(f"{pair[key]['failed']} requests failed on {nodes} node(s)")
            pairs.append(pair)
    payload = {"twin": args.twin, "layers": layers, "helix": HELIX.to_cli(), "prompts": args.prompts,
               "input_len": args.input_len, "output_len": args.output_len, "node_binding": [
                   node_env(HELIX, 2, rank)["VLLM_CPU_OMP_THREADS_BIND"] for rank in range(2)],
               "pairs": pairs, "summary": summarise(pairs)}
    print(write_page(RESULTS, "multi_node", stamped(payload), markdown))


if __name__ == "__main__":
    main()
