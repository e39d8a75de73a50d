"""Measure this machine as a calibrated planner hardware profile: one command, one profile per machine.

Part 1, the machine: memory bandwidth (a 256 MiB tensor copy, counted STREAM-style
as bytes read + written; a streaming read for reference), matmul FLOP rates (fp32,
bf16), and the collectives the served workers actually use between each other:
vLLM's CPU shared-memory ``shm_allreduce`` and ``shm_all_gather`` between two
processes on this socket (a 1 KiB message for the latency, 8 MiB for the
bandwidth), not a network.

Part 2, the engine, in one run with the long-context sweep: for each benchmark twin
(the Llama twin with one KV head, GQA; the DeepSeek-V3 twin, MLA) and each layout
(TP=2, Helix kvp=2) the sweep's engines (``long_context.measure_twin``: 2 layers, 4K
to 2M tokens, batch 1 and 8, every point in three fresh engines, TP=2's and Helix's
alternated so each pair's ratio is timed minutes apart), then right after
them the same twin at 4 layers at 4K (batch 1 and 8, timed the same way). These
shared VMs drift by more than the model's error between hours (the same point
measured 1.0-1.8x apart an hour apart, 2026-12-01), so the points the fit uses and
the points it is judged on are timed in the same run, side by side.

Part 3, the fit: for each (engine: vLLM's own or Helix's, attention: GQA or MLA)
the five constants of :mod:`vllm_helix.planner.calibration` (per-step, per-layer,
per-sequence and per-sequence-per-layer fixed costs, and the KV read rate of one
rank's attention kernel while every rank reads) are the least-squares fit, with
every constant >= 0 (each is a time), to five measured points, after the cost
model's own terms for those points (weights, FFN FLOPs, collectives at the
measured shm latency) are subtracted (exact where the exact solution has no
negative constant): the sweep's 4K batch 1
and 8 and its long point (1M tokens for Llama, 128K for DeepSeek; batch 1), and
the two 4-layer points. Every other sweep point is held out:
``planner_validation.py`` predicts it.

Writes ``configs/hardware/<name>.yaml`` (the profile the planner reads; ``<name>``
from the CPU, e.g. ``cpu-xeon-2core``), ``benchmarks/results/calibration.{json,md}``
(the fit's engine timings and constants, no second copy of the profile) and
``benchmarks/results/long_context.{json,md,png}`` (the sweep; both JSONs carry the
run's start stamp, ``run``).

    .venv/bin/python benchmarks/measure_hardware.py              # ~65 min on 2 cores
    .venv/bin/python benchmarks/measure_hardware.py --fit-only   # refit from calibration.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

import long_context  # benchmarks/ is on the path when this runs as a script
from vllm_helix.harness.machine import describe_machine, machine_line
from vllm_helix.planner.calibration import attention_of, engine_of
from vllm_helix.planner.fit import SERVED_LAYOUTS, EnginePoint, fit_engine_costs, predicted_step
from vllm_helix.planner.hardware_spec import HARDWARE_PRESET_DIR, hardware_from_dict
from vllm_helix.planner.model_spec import ModelSpec, load_model
from vllm_helix.harness.spawn import run_ranks

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_MESSAGE, LARGE_MESSAGE = 1024, 8 * 2**20  # bytes
SHORT_CONTEXT, BATCHES, DEEPER = 4096, (1, 8), 4  # the fit's short points, at the sweep's 2 layers and at 4
LONG_CONTEXT = {"llama_kv1": 1_000_000, "deepseek_v3": 131072}  # the longest both layouts hold


def best_seconds(fn: Callable[[], Any], repeats: int, min_total_s: float = 1.5, max_calls: int = 300) -> float:
    """Shortest wall time of ``fn()`` after one warm-up call, over at least ``repeats`` calls
    and at least ``min_total_s`` seconds of calls (at most ``max_calls``).

    The minimum, not the median: the machine is shared, and the least-disturbed run
    is the best estimate of what the hardware does.
    """
    fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - started < min_total_s and len(samples) < max_calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def memory_total_bytes() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return float(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def profile_for(machine: dict[str, Any]) -> str:
    """``cpu-<family>-<cores>core`` for a :func:`describe_machine` record: one profile per kind of
    machine (Xeon and EPYC serve differently, see NOTES), found again from any results file's record."""
    model = str(machine["cpu"]).lower()
    family = next((name for name in ("xeon", "epyc") if name in model), re.sub(r"[^a-z0-9]+", "-", model)[:20])
    return f"cpu-{family.strip('-')}-{machine['cores']}core"


# ------------------------------------------------------------------ part 1: the machine
def measure_memory(repeats: int) -> dict[str, float]:
    src = torch.rand(64 * 2**20)  # 256 MiB of fp32
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    copy = best_seconds(lambda: dst.copy_(src), repeats)
    read = best_seconds(lambda: src.sum(), repeats)
    return {"copy_bytes_per_s": 2 * nbytes / copy, "read_bytes_per_s": nbytes / read}


def measure_matmul(dtype: torch.dtype, size: int, repeats: int) -> float:
    a, b = torch.rand(size, size, dtype=dtype), torch.rand(size, size, dtype=dtype)
    return 2 * size**3 / best_seconds(lambda: a @ b, repeats)


def _shm_rank(rank: int, world: int, repeats: int) -> dict[str, list[float]]:
    """Rank entry point: best seconds of vLLM's shm all-reduce and all-gather, small and large.

    The same ops and set-up calls as vLLM's ``_CPUSHMDistributed`` (what a served TP or
    Helix group uses between CPU workers); the gloo group only starts them in step.
    """
    import torch.distributed as dist
    import vllm._C  # noqa: F401  (registers torch.ops._C)

    name = f"helix-measure-{os.getppid()}-cpushm"
    handle = torch.ops._C.init_shm_manager(name, world, rank, torch.get_num_threads())
    dist.barrier()
    torch.ops._C.join_shm_manager(handle, name)
    dist.barrier()
    out: dict[str, list[float]] = {"all_reduce": [], "all_gather": []}
    for size in (SMALL_MESSAGE, LARGE_MESSAGE):
        data = torch.ones(size // 4)
        gathered = torch.empty(world * data.numel())
        dist.barrier()
        out["all_reduce"].append(best_seconds(lambda: torch.ops._C.shm_allreduce(handle, data), repeats,
                                              min_total_s=0.0))
        dist.barrier()
        out["all_gather"].append(best_seconds(lambda: torch.ops._C.shm_all_gather(handle, data, gathered),
                                              repeats, min_total_s=0.0))
    dist.barrier()
    return out


def measure_shm(repeats: int) -> dict[str, Any]:
    """Latency (1 KiB message) and bandwidth (8 MiB) of the two shm collectives, slowest rank."""
    per_rank = run_ranks(_shm_rank, 2, (repeats,), timeout_s=300)
    out: dict[str, Any] = {}
    for op in ("all_reduce", "all_gather"):
        small, large = (max(r[op][i] for r in per_rank) for i in (0, 1))
        out[op] = {"latency_s": small, "bandwidth_bytes_per_s": LARGE_MESSAGE / max(large - small, 1e-9)}
    return out


# ------------------------------------------------------------------ part 2: the engine
def fit_pairs(name: str) -> set[tuple[int, int]]:
    """The (context, batch) points of a 2-layer twin the fit uses; every other sweep point is held out."""
    return {(SHORT_CONTEXT, b) for b in BATCHES} | {(LONG_CONTEXT[name], 1)}


def fit_row(name: str, config: str, layers: int, point: dict[str, Any]) -> dict[str, Any]:
    """One row of ``calibration.json``'s ``engine``: a merged point (``long_context.merge_repeats``) and its twin."""
    return {"model": name, "config": config, "layers": layers, "context": point["context"], "batch": point["batch"],
            "tpot_ms": point["tpot_ms"], "samples_ms": point["samples_ms"], "instances": point["instances"]}


def sweep_fit_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The fit's 2-layer points, taken from the sweep's record of one (twin, configuration)."""
    wanted = fit_pairs(record["model"])
    rows = [fit_row(record["model"], record["config"], 2, p)
            for p in record["points"] if (p["context"], p["batch"]) in wanted and "tpot_ms" in p]
    missing = wanted - {(r["context"], r["batch"]) for r in rows}
    if missing:
        raise SystemExit(f"calibration: the sweep of {record['model']} {record['config']} has no TPOT at "
                         f"{sorted(missing)} (see its points: {record['points']})")
    return rows


def deeper_rows(name: str, config: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The fit's 4-layer points (4K, batch 1 and 8), timed like the sweep's: ``args.instances`` fresh engines,
    ``args.repeats`` samples each, KV filled by ``DecodeBenchConnector``. They separate per-step from per-layer
    costs (the sweep's 2-layer points alone cannot), which a deep model's prediction needs."""
    model = long_context.twin(name, DEEPER)
    points = [(SHORT_CONTEXT, b) for b in BATCHES for _ in range(args.repeats)]
    label = f"{name}-{DEEPER}l-{config.split()[0].replace('=', '')}"
    log = args.log_dir / f"{label}.log"
    print(f"[calibration] {label}: {sorted(set(points))}", flush=True)
    result = long_context.run_engine(model, config, points, True, args.output_len, log, args.timeout)
    if "error" in result:
        raise SystemExit(f"calibration engine {label} failed: {result['error']} (log: {log})")
    samples = result["points"] + long_context.more_instances(model, config, points, True, args.output_len, log,
                                                             args.timeout, args.instances)
    return [fit_row(name, config, DEEPER, p)
            for p in sorted(long_context.merge_repeats(samples), key=lambda p: (p["context"], p["batch"]))]


def engine_runs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The long-context sweep and the fit's points, in one run: for each twin the sweep's engines (2 layers,
    every context; ``long_context.measure_twin``, TP=2's and Helix's instances alternated) and, right after
    them, each configuration's 4-layer engines.

    One run because these shared VMs drift: the same engine point measured 1.0-1.8x apart an hour apart
    (2026-12-01), more than the model's error, so a profile fitted in one hour cannot be judged on a sweep
    timed in another. Returns the sweep's records and the fit's rows."""
    records, rows = [], []
    for name in args.models.split(","):
        for record in long_context.measure_twin(name, args):
            records.append(record)
            rows += sweep_fit_rows(record) + deeper_rows(name, record["config"], args)
    return records, rows


# ------------------------------------------------------------------ part 3: the fit
TWIN_PRESETS = {"llama_kv1": "tiny-llama-kv1", "deepseek_v3": "tiny-deepseek-v3"}  # the twins' planner specs


def twin_spec(name: str, layers: int) -> ModelSpec:
    """The planner's spec of a benchmark twin at ``layers`` (its preset equals its config.json; tested)."""
    return replace(load_model(TWIN_PRESETS[name]), num_layers=layers)


def engine_points(rows: list[dict[str, Any]], name: str, config: str) -> list[EnginePoint]:
    return [EnginePoint(twin_spec(name, r["layers"]), SERVED_LAYOUTS[config], r["context"], r["batch"],
                        r["tpot_ms"] / 1e3) for r in rows if r["model"] == name and r["config"] == config]


def fit(profile: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``calibration`` section: five constants per (attention, engine) from its five points."""
    hw = hardware_from_dict({k: v for k, v in profile.items() if k != "calibration"}, profile["name"])
    section: dict[str, Any] = {"source": "benchmarks/results/calibration.json (benchmarks/measure_hardware.py)"}
    for name in TWIN_PRESETS:
        attention = attention_of(twin_spec(name, 2).attention)
        for config, layout in SERVED_LAYOUTS.items():
            points = engine_points(rows, name, config)
            if points:
                section.setdefault(attention, {})[engine_of(layout.strategy)] = fit_engine_costs(hw, points).to_yaml()
    return section


def write_profile(path: Path, profile: dict[str, Any], memory: dict[str, float], date: str, machine: str) -> None:
    header = (
        f"# Measured by benchmarks/measure_hardware.py on {date}: {machine}, torch {torch.__version__}.\n"
        "# One 'GPU' is one of two vLLM CPU workers (gpus_per_domain 2); both share this machine.\n"
        "# memory.bandwidth_gb_s: 256 MiB tensor copy, (read + write bytes) / s, all cores;\n"
        f"#   streaming read for reference: {memory['read_bytes_per_s'] / 1e9:.1f} GB/s.\n"
        "# memory.capacity_gb: MemTotal. compute_tflops: square matmuls (fp32 2048, bf16 1024).\n"
        "# scale_up: vLLM's shm_allreduce between the 2 worker processes (1 KiB and 8 MiB messages).\n"
        "# calibration: fitted on vLLM engine runs of the twins (benchmarks/results/calibration.md);\n"
        "#   the planner charges its fixed costs and KV read rates instead of the roofline's attention.\n"
        "# power.tdp_w: NOT measured; an assumption for the energy model only.\n"
    )
    path.write_text(header + yaml.safe_dump(profile, sort_keys=False))


def report_lines(payload: dict[str, Any]) -> list[str]:
    """calibration.md: what was measured, what the fit made of it, and how well it reproduces its own points."""
    hw = hardware_from_dict(yaml.safe_load((HARDWARE_PRESET_DIR / f"{payload['profile_name']}.yaml").read_text()),
                            payload["profile_name"])
    memory, flops, shm = payload["memory"], payload["flops"], payload["shm"]
    lines = [
        "# Calibration: this machine's planner profile, measured and fitted",
        "",
        f"Machine: {payload['machine_line']}; {payload['date']}. Profile: "
        f"`configs/hardware/{payload['profile_name']}.yaml`. Reproduce: "
        "`.venv/bin/python benchmarks/measure_hardware.py` (or `--fit-only` to refit these timings after a "
        "cost-model change). The fit's points and the long-context sweep ([long_context.md](long_context.md)) "
        f"were timed in one run (started {payload['run']}, {payload['wall_s'] / 60:.0f} min): the fit uses the "
        "sweep's 4K and long points and 4-layer 4K points timed between its engines; "
        "[planner_validation.md](planner_validation.md) predicts every other sweep point.",
        "",
        "## The machine",
        "",
        f"- memory: {memory['copy_bytes_per_s'] / 1e9:.1f} GB/s tensor copy (read + write), "
        f"{memory['read_bytes_per_s'] / 1e9:.1f} GB/s streaming read, all cores; the copy again at the run's "
        f"end: {memory['copy_bytes_per_s_at_end'] / 1e9:.1f} GB/s (the machine's drift over the run)",
        "- matmul: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in flops.items()),
        *(f"- vLLM `shm_{op.replace('_', '')}` between the two worker processes: "
          f"{v['latency_s'] * 1e6:.1f} us for 1 KiB, {v['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s at 8 MiB"
          for op, v in shm.items()),
        "",
        "## Engine timings the fit uses",
        "",
        "TPOT through vLLM's offline engine, as long_context.md times it (2 layers: the sweep's own points; "
        "4 layers: KV filled by `DecodeBenchConnector`), the median of the samples shown (every fresh engine's, "
        "pooled).",
        "",
        "| twin | configuration | layers | context | batch | TPOT ms (median) | samples ms | model ms |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in payload["engine"]:
        point = engine_points([r], r["model"], r["config"])[0]
        model_ms = float(predicted_step(point, hw).ttl[0]) * 1e3
        lines.append(f"| {r['model']} | {r['config']} | {r['layers']} | {r['context']:,} | {r['batch']} | "
                     f"{r['tpot_ms']:.2f} | {', '.join(f'{t:.2f}' for t in r['samples_ms'])} | {model_ms:.2f} |")
    lines += [
        "",
        "'model ms' is the calibrated cost model at the same point: five constants per row group from five "
        "points, each constant held >= 0, so it reproduces them exactly unless the exact solution had a negative "
        "cost (a check of the fit, not of the model).",
        "",
        "## Fitted constants (`calibration:` in the profile)",
        "",
        "Per (attention, engine): fixed costs per step, per layer, per sequence and per sequence-layer, and the "
        "KV bytes per second one rank's decode kernel reads while both ranks read (`vllm`: vLLM's own path, "
        "what TP runs; `helix`: the plugin's).",
        "",
        "| attention | engine | step ms | layer ms | sequence ms | sequence-layer ms | KV read GB/s per rank |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for kind in ("gqa", "mla"):
        for engine, c in payload["calibration"].get(kind, {}).items():
            lines.append(f"| {kind} | {engine} | {c['step_ms']:.3f} | {c['layer_ms']:.3f} | {c['sequence_ms']:.3f} "
                         f"| {c['sequence_layer_ms']:.3f} | {c['kv_read_gb_s']:.2f} |")
    return lines


def write_report(payload: dict[str, Any]) -> None:
    (RESULTS / "calibration.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "calibration.md").write_text("\n".join(report_lines(payload)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit-only", action="store_true",
                        help="refit the calibration from calibration.json's engine timings (after a cost-model "
                             "change), keeping the measured machine section")
    long_context.sweep_arguments(parser)
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/calibration"))
    args = parser.parse_args()
    if args.fit_only:
        payload = json.loads((RESULTS / "calibration.json").read_text())
        path = HARDWARE_PRESET_DIR / f"{payload['profile_name']}.yaml"
        profile = yaml.safe_load(path.read_text())
        profile["calibration"] = fit(profile, payload["engine"])
        write_profile(path, profile, payload["memory"], payload["date"], payload["machine_line"])
        write_report({**payload, "calibration": profile["calibration"]})
        print(f"refitted {path}")
        return
    long_context.parse_sweep(parser, args)
    unknown = sorted(set(args.models.split(",")) - set(LONG_CONTEXT))
    needed = sorted({SHORT_CONTEXT, *(LONG_CONTEXT[m] for m in args.models.split(",") if m in LONG_CONTEXT)}
                    - set(args.contexts)) + sorted(set(BATCHES) - set(args.batches))
    if unknown or needed:
        parser.error(f"the fit needs twins among {sorted(LONG_CONTEXT)} (got {unknown}) and contexts "
                     f"{SHORT_CONTEXT} and the twin's long point, batches {BATCHES} (missing: {needed})")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    run, started = time.strftime("%Y-%m-%dT%H:%M:%S"), time.monotonic()
    memory = measure_memory(7)
    flops = {"fp32": measure_matmul(torch.float32, 2048, 7), "bf16": measure_matmul(torch.bfloat16, 1024, 7)}
    shm = measure_shm(200)
    date, machine = run[:10], describe_machine()
    name = profile_for(machine)
    profile: dict[str, Any] = {
        "name": name,
        "description": f"{machine_line(machine)}, two vLLM CPU workers, measured and calibrated {date}",
        "measured": True,
        "memory": {"capacity_gb": round(memory_total_bytes() / 1e9, 2),
                   "bandwidth_gb_s": round(memory["copy_bytes_per_s"] / 1e9, 2)},
        "compute_tflops": {k: round(v / 1e12, 5) for k, v in flops.items()},
        "scale_up": {"bandwidth_gb_s": round(shm["all_reduce"]["bandwidth_bytes_per_s"] / 1e9, 3),
                     "latency_us": round(shm["all_reduce"]["latency_s"] * 1e6, 1), "gpus_per_domain": 2},
        "power": {"tdp_w": 9},
    }
    print(json.dumps({"memory": memory, "flops": flops, "shm": shm}), flush=True)
    records, rows = engine_runs(args)
    memory["copy_bytes_per_s_at_end"] = measure_memory(7)["copy_bytes_per_s"]  # the run's drift, reported
    wall_s = time.monotonic() - started
    sweep = long_context.sweep_payload(records, args, run, wall_s)
    long_context.write_results(sweep)
    profile["calibration"] = fit(profile, rows)
    path = HARDWARE_PRESET_DIR / f"{name}.yaml"
    write_profile(path, profile, memory, date, machine_line(machine))
    write_report({"date": date, "run": run, "machine": machine, "machine_line": machine_line(machine),
                  "profile_name": name, "memory": memory, "flops": flops, "shm": shm, "engine": rows,
                  "calibration": profile["calibration"], "wall_s": round(wall_s, 1)})
    print(f"wrote {path}, {RESULTS / 'calibration.md'} and {RESULTS / 'long_context.md'}")


if __name__ == "__main__":
    main()
