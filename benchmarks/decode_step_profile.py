"""Where one decode step's time goes inside vLLM: Helix kvp=2 against TP=2, per layer and per hop.

For each twin and context it starts vLLM's offline engine (KV filled by vLLM's
``DecodeBenchConnector``, so any context can be decoded without a prefill), times
decode from vLLM's engine timestamps without the profiler, then decodes a few more
steps under PyTorch's profiler in every worker (vLLM's own ``profiler_config``).
The traces are reduced to self time per operation (time inside an operation minus
the time of the operations it calls), per decode step, grouped by what the time is
for: the plugin's Helix hops (``helix/...`` ranges the plugin records: query
all-gather, KV append, metadata, per-shard kernel, exchange launch, exchange
wait + merge), vLLM's own attention kernels, collectives, the model's linear
layers, and everything else. Time the profiler does not see (Python between
operations, the engine core, scheduling, sampling) is TPOT minus the worker's
profiled operations.

Writes ``benchmarks/results/decode_step_profile.{json,md}``.

    .venv/bin/python -m benchmarks.decode_step_profile            # the committed run (~8 min on 2 cores)
    .venv/bin/python -m benchmarks.decode_step_profile --render-only
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from vllm_helix.harness.engine_runs import CONFIGS, run_engine, twin
from vllm_helix.harness.results_page import render_page, stamped, write_page
from vllm_helix.harness.step_groups import STEP, grouped

RESULTS = Path(__file__).parent / "results"
PROFILED_STEPS = 8
POINTS = {"llama_kv1": (4096, 1000000), "deepseek_v3": (4096, 196608)}  # what TP=2 holds: ~1.05M, ~233K
LAYERS = 2  # both twins

def decode_steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's annotations of the worker's pure-decode steps, in order."""
    return sorted((e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith(STEP)),
                  key=lambda e: e["ts"])


def within_steps(events: list[dict[str, Any]], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The complete events that run inside one of ``steps`` (the steps included)."""
    spans = [(step["ts"], step["ts"] + step["dur"]) for step in steps]
    return [e for e in events if e.get("ph") == "X" and e.get("cat") != "Trace" and "dur" in e
            and any(start <= e["ts"] and e["ts"] + e["dur"] <= end for start, end in spans)]


def self_times(events: list[dict[str, Any]]) -> dict[str, float]:
    """Microseconds of self time per operation name (complete events, nested per thread)."""
    totals: dict[str, float] = defaultdict(float)
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        by_thread[(event.get("pid"), event.get("tid"))].append(event)
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [end, name, time in children, duration]
        for event in thread_events:
            start, end = event["ts"], event["ts"] + event["dur"]
            while stack and stack[-1][0] <= start:
                closed = stack.pop()
                totals[closed[1]] += closed[3] - closed[2]
            if stack:
                stack[-1][2] += event["dur"]
            stack.append([end, event["name"], 0.0, event["dur"]])
        while stack:
            closed = stack.pop()
            totals[closed[1]] += closed[3] - closed[2]
    return dict(totals)


def helix_inclusive(events: list[dict[str, Any]]) -> dict[str, float]:
    """Microseconds inside each ``helix/...`` range (inclusive: what the hop costs end to end)."""
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("ph") == "X" and str(event.get("name", "")).startswith("helix/"):
            totals[event["name"]] += event["dur"]
    return dict(totals)


def read_traces(directory: Path) -> list[list[dict[str, Any]]]:
    """One event list per worker trace file vLLM wrote."""
    traces = []
    for path in sorted(directory.rglob("*.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as handle:
            data = json.load(handle)
        events = data.get("traceEvents", []) if isinstance(data, dict) else data
        if any(e.get("ph") == "X" for e in events):
            traces.append(events)
    return traces


def worker_rank_trace(traces: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rank 0's trace (the first file vLLM writes; both ranks run the same steps)."""
    return traces[0]


def profile_point(model_name: str, config: str, context: int, args: argparse.Namespace) -> dict[str, Any]:
    model = twin(model_name)
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = Path(tmp) / "traces"
        profiler = {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
                    "torch_profiler_use_gzip": False, "ignore_frontend": True}
        log = args.log_dir / f"{model_name}-{config.split()[0].replace('=', '')}-{context}.log"
        result = run_engine(model, config, [(context, 1)], True, args.output_len, log, args.timeout,
                            extra_llm_kwargs={"profiler_config": profiler}, profile_steps=PROFILED_STEPS)
        if "error" in result:
            return {"model": model_name, "config": config, "context": context, "error": result["error"]}
        traces = read_traces(trace_dir)
    if not traces:
        return {"model": model_name, "config": config, "context": context, "error": "no trace written"}
    all_events = worker_rank_trace(traces)
    steps = decode_steps(all_events)
    if not steps:
        return {"model": model_name, "config": config, "context": context, "error": "no decode step in the trace"}
    events = within_steps(all_events, steps)
    per_step = {name: us / 1000.0 / len(steps) for name, us in self_times(events).items()}
    return {"model": model_name, "config": config, "context": context,
            "tpot_ms": result["points"][0]["tpot_ms"], "profiled_steps": len(steps),
            "worker_step_ms": sum(step["dur"] for step in steps) / 1000.0 / len(steps),
            "ops_ms": per_step, "helix_ms": {k: v / 1000.0 / len(steps) for k, v in helix_inclusive(events).items()}}


def markdown(payload: dict[str, Any]) -> str:
    from vllm_helix.harness.machine import machine_sentence

    m = payload["machine"]
    lines = [
        "# One decode step inside vLLM: Helix kvp=2 against TP=2",
        "",
        machine_sentence(m, payload["date"]),
        "Batch 1, float32 twins (2 layers), two CPU workers, KV filled by `DecodeBenchConnector`. TPOT is measured "
        "without the profiler. The worker step is the mean of vLLM's own per-step annotation on rank 0 "
        f"(`{STEP}...`) over {PROFILED_STEPS} profiled decode steps (PyTorch profiler through vLLM's "
        "`profiler_config`; the profiler adds time to every operation, so shares matter more than absolute "
        "numbers); 'outside the worker step' is TPOT minus it: the engine core's scheduling and output "
        "processing and the hand-offs between processes. The other columns split the worker step by self time "
        "(time in an operation minus the operations it calls): 'worker Python between ops' is the step "
        "annotation's own self time, 'collectives' includes waiting for the other worker inside them. "
        "Reproduce: `.venv/bin/python -m benchmarks.decode_step_profile`.",
        "",
    ]
    rows = [{**r, "groups_ms": grouped(r["ops_ms"])} for r in payload["rows"] if "error" not in r]
    groups = sorted({g for r in rows for g in r["groups_ms"]})
    lines += ["| twin | context | configuration | TPOT ms | outside the worker step | worker step (profiled) | "
              + " | ".join(groups) + " |",
              "|---|---:|---|---:|---:|---:|" + "---:|" * len(groups)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['context']:,} | {r['config']} | {r['tpot_ms']:.1f} | "
                     f"{r['tpot_ms'] - r['worker_step_ms']:.1f} | {r['worker_step_ms']:.1f} | "
                     + " | ".join(f"{r['groups_ms'].get(g, 0.0):.2f}" for g in groups) + " |")
    lines += ["", "## Helix hops per decode step (inclusive ms; per layer: divide by "
              f"{LAYERS})", ""]
    hops = sorted({h for r in rows for h in r.get("helix_ms", {})})
    if hops:
        lines += ["| twin | context | " + " | ".join(hops) + " |", "|---|---:|" + "---:|" * len(hops)]
        for r in rows:
            if r["config"] != "TP=2":
                lines.append(f"| {r['model']} | {r['context']:,} | "
                             + " | ".join(f"{r['helix_ms'].get(h, 0.0):.2f}" for h in hops) + " |")
    lines += ["", "## Reading", ""] + reading(rows)
    lines += ["", "## Largest operations by self time (ms per step)", ""]
    for r in rows:
        top = sorted(r["ops_ms"].items(), key=lambda item: -item[1])[:10]
        lines.append(f"- {r['model']} {r['context']:,} {r['config']}: "
                     + ", ".join(f"`{name}` {ms:.2f}" for name, ms in top))
    errors = [r for r in payload["rows"] if "error" in r]
    lines += [""] + [f"- {r['model']} {r['context']:,} {r['config']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """What the table says, computed from it (numbers are this run's)."""
    out = []
    by = {(r["model"], r["context"], r["config"]): r for r in rows}
    for model, (short, long) in POINTS.items():
        tp_s, hx_s = by.get((model, short, "TP=2")), by.get((model, short, "Helix kvp=2"))
        if tp_s and hx_s:
            extra = {g: hx_s["groups_ms"].get(g, 0.0) - tp_s["groups_ms"].get(g, 0.0)
                     for g in set(hx_s["groups_ms"]) | set(tp_s["groups_ms"])}
            worst = sorted(extra.items(), key=lambda item: -item[1])[:3]
            out.append(
                f"- **{model}, {short:,} tokens: the fixed cost.** Helix's worker step is "
                f"{hx_s['worker_step_ms']:.1f} ms against TP's {tp_s['worker_step_ms']:.1f} ms; the difference is "
                + ", ".join(f"{g} {ms:+.2f} ms" for g, ms in worst)
                + f" per step. Helix's hops (inclusive, both layers): query all-gather "
                f"{hx_s['helix_ms'].get('helix/query_all_gather', 0.0):.2f} ms (vLLM's own all-gather for MLA, "
                f"under collectives), exchange launch + wait/merge "
                f"{hx_s['helix_ms'].get('helix/exchange_launch', 0.0) + hx_s['helix_ms'].get('helix/exchange_wait_merge', 0.0):.2f}"
                f" ms, metadata {hx_s['helix_ms'].get('helix/metadata', 0.0):.2f} ms, KV append "
                f"{hx_s['helix_ms'].get('helix/kv_append', 0.0):.2f} ms.")
        tp_l, hx_l = by.get((model, long, "TP=2")), by.get((model, long, "Helix kvp=2"))
        if tp_l and hx_l:
            tp_kernel = tp_l["groups_ms"].get("attention kernel", 0.0)
            hx_kernel = hx_l["groups_ms"].get("attention kernel", 0.0)
            wait = hx_l["helix_ms"].get("helix/exchange_wait_merge", 0.0)
            out.append(
                f"- **{model}, {long:,} tokens: the kernel.** TP's worker reads the whole KV cache in vLLM's C++ "
                f"kernel in {tp_kernel:.1f} ms per step; Helix's reads half of it in its C++ kernel in "
                f"{hx_kernel:.1f} ms: per byte vLLM's kernel is {2 * hx_kernel / tp_kernel:.2f}x as fast "
                f"(1.00x would put Helix at half TP's attention time). Helix's exchange wait + merge, "
                f"{wait:.1f} ms, is mostly the rank waiting for its peer's attention inside the exchange "
                "(the two workers share two cores with vLLM's engine core), not the bytes exchanged (a few KB).")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama_kv1,deepseek_v3")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/decode-profile"))
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--short-only", action="store_true", help="only the 4K points (the fixed cost)")
    args = parser.parse_args()
    if args.render_only:
        print(render_page(RESULTS, "decode_step_profile", markdown))
        return
    started = time.monotonic()
    rows = []
    for model in args.models.split(","):
        for context in POINTS[model][:1] if args.short_only else POINTS[model]:
            for config in CONFIGS:
                rows.append(profile_point(model, config, context, args))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "ops_ms"}), flush=True)
    payload = stamped({"rows": rows, "wall_s": round(time.monotonic() - started, 1)})
    print(write_page(RESULTS, "decode_step_profile", payload, markdown))


if __name__ == "__main__":
    sys.exit(main())
