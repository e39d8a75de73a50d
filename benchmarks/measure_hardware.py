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

    .venv/bin/python -m benchmarks.measure_hardware              # ~65 min on 2 cores
    .venv/bin/python -m benchmarks.measure_hardware --fit-only   # refit from calibration.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from vllm_helix.harness import machine_rates
from vllm_helix.harness.calibration_runs import (BATCHES, LONG_CONTEXT, SHORT_CONTEXT, Timing, deeper_rows,
                                                 engine_points, fit, measure_machine, sweep_fit_rows, write_profile)
from vllm_helix.harness.engine_runs import measure_twin, parse_sweep, sweep_arguments
from vllm_helix.planner.fit import predicted_step
from vllm_helix.planner.hardware_spec import HARDWARE_PRESET_DIR, hardware_from_dict

from patches_free_hooks.cpu_collectives import measured_collectives

from benchmarks import long_context  # the sweep's results page

RESULTS = Path(__file__).resolve().parent / "results"
SOURCE = "benchmarks/results/calibration.json (benchmarks/measure_hardware.py)"


def engine_runs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The long-context sweep and the fit's points, in one run: for each twin the sweep's engines (2 layers,
    every context; ``measure_twin``, TP=2's and Helix's instances alternated) and, right after them, each
    configuration's 4-layer engines.

    One run because these shared VMs drift: the same engine point measured 1.0-1.8x apart an hour apart
    (2026-12-01), more than the model's error, so a profile fitted in one hour cannot be judged on a sweep
    timed in another. Returns the sweep's records and the fit's rows."""
    timing = Timing(instances=args.instances, repeats=args.repeats, output_len=args.output_len,
                    timeout=args.timeout, log_dir=args.log_dir)
    records, rows = [], []
    for name in args.models.split(","):
        for record in measure_twin(name, args):
            records.append(record)
            rows += sweep_fit_rows(record) + deeper_rows(name, record["config"], timing)
    return records, rows


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
        "`.venv/bin/python -m benchmarks.measure_hardware` (or `--fit-only` to refit these timings after a "
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
        *(f"- `{op}` between the two worker processes over {shm.get('transport', 'vLLM shm')}: "
          f"{v['latency_s'] * 1e6:.1f} us for 1 KiB, {v['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s at 8 MiB"
          for op, v in shm.items() if op != "transport"),
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
    sweep_arguments(parser)
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/calibration"))
    args = parser.parse_args()
    if args.fit_only:
        payload = json.loads((RESULTS / "calibration.json").read_text())
        path = HARDWARE_PRESET_DIR / f"{payload['profile_name']}.yaml"
        profile = yaml.safe_load(path.read_text())
        profile["calibration"] = fit(profile, payload["engine"], SOURCE)
        write_profile(path, profile, payload["memory"], payload["shm"].get("transport", "vLLM shm"),
                      "benchmarks/measure_hardware.py", payload["date"], payload["machine_line"], torch.__version__)
        write_report({**payload, "calibration": profile["calibration"]})
        print(f"refitted {path}")
        return
    parse_sweep(parser, args)
    unknown = sorted(set(args.models.split(",")) - set(LONG_CONTEXT))
    needed = sorted({SHORT_CONTEXT, *(LONG_CONTEXT[m] for m in args.models.split(",") if m in LONG_CONTEXT)}
                    - set(args.contexts)) + sorted(set(BATCHES) - set(args.batches))
    if unknown or needed:
        parser.error(f"the fit needs twins among {sorted(LONG_CONTEXT)} (got {unknown}) and contexts "
                     f"{SHORT_CONTEXT} and the twin's long point, batches {BATCHES} (missing: {needed})")
    run, started = time.strftime("%Y-%m-%dT%H:%M:%S"), time.monotonic()
    date = run[:10]
    measured = measure_machine(measured_collectives, date)
    machine, name, line, memory, flops, shm, profile = (measured.machine, measured.name, measured.line,
                                                        measured.memory, measured.flops, measured.collectives,
                                                        measured.profile)
    print(json.dumps({"memory": memory, "flops": flops, "shm": shm}), flush=True)
    records, rows = engine_runs(args)
    memory["copy_bytes_per_s_at_end"] = machine_rates.measure_memory(7)["copy_bytes_per_s"]  # the run's drift, reported
    wall_s = time.monotonic() - started
    sweep = long_context.sweep_payload(records, args, run, wall_s)
    long_context.write_results(sweep)
    profile["calibration"] = fit(profile, rows, SOURCE)
    path = HARDWARE_PRESET_DIR / f"{name}.yaml"
    write_profile(path, profile, memory, shm["transport"], "benchmarks/measure_hardware.py", date, line,
                  torch.__version__)
    write_report({"date": date, "run": run, "machine": machine, "machine_line": line,
                  "profile_name": name, "memory": memory, "flops": flops, "shm": shm, "engine": rows,
                  "calibration": profile["calibration"], "wall_s": round(wall_s, 1)})
    print(f"wrote {path}, {RESULTS / 'calibration.md'} and {RESULTS / 'long_context.md'}")


if __name__ == "__main__":
    main()
