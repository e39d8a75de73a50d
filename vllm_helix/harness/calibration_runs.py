"""From engine timings to a calibrated planner profile: the points the fit uses, the fit, the profile file.

Shared by ``vllm-helix calibrate`` (the fit's points alone, about 17 minutes on two cores) and
``benchmarks/measure_hardware.py`` (the same fit inside the full long-context sweep, which the
planner's validation then predicts). For each benchmark twin (GQA: the Llama twin; MLA: the
DeepSeek-V3 twin) and each engine (TP=2: vLLM's own decode path; Helix kvp=2: the plugin's) the
fit solves :mod:`vllm_helix.planner.calibration`'s five constants from five points: 4K tokens at
batch 1 and 8 and one long context at batch 1 on the 2-layer twin, and 4K at batch 1 and 8 on the
4-layer twin (which separate per-step from per-layer costs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vllm_helix.harness import machine_rates
from vllm_helix.harness.engine_runs import REPEAT_MAX_CONTEXT, merge_repeats, more_instances, run_engine, twin
from vllm_helix.harness.machine import describe_machine, machine_line
from vllm_helix.harness.machine_rates import Collectives
from vllm_helix.host import profile_name
from vllm_helix.planner.calibration import attention_of, engine_of
from vllm_helix.planner.fit import SERVED_LAYOUTS, EnginePoint, fit_engine_costs
from vllm_helix.planner.hardware_spec import hardware_from_dict
from vllm_helix.planner.model_spec import ModelSpec, load_model

SHORT_CONTEXT, BATCHES, DEEPER = 4096, (1, 8), 4  # the fit's short points, at 2 layers and at 4
LONG_CONTEXT = {"llama_kv1": 1_000_000, "deepseek_v3": 131072}  # the longest both layouts hold in 1 GiB per worker
TWIN_PRESETS = {"llama_kv1": "tiny-llama-kv1", "deepseek_v3": "tiny-deepseek-v3"}  # the twins' planner specs


@dataclass(frozen=True)
class Timing:
    """How engine points are timed: fresh engines per point set, samples per engine, tokens per request."""

    instances: int = 3
    repeats: int = 5
    output_len: int = 64
    timeout: float = 1800.0
    log_dir: Path = Path(".cache/calibration")


def fit_pairs(name: str) -> set[tuple[int, int]]:
    """The (context, batch) points of a 2-layer twin the fit uses; every other sweep point is held out."""
    return {(SHORT_CONTEXT, b) for b in BATCHES} | {(LONG_CONTEXT[name], 1)}


def fit_row(name: str, config: str, layers: int, point: dict[str, Any]) -> dict[str, Any]:
    """One row of the fit's engine timings: a merged point (:func:`merge_repeats`) and its twin."""
    return {"model": name, "config": config, "layers": layers, "context": point["context"], "batch": point["batch"],
            "tpot_ms": point["tpot_ms"], "samples_ms": point["samples_ms"], "instances": point["instances"]}


def sweep_fit_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The fit's 2-layer points, taken from the long-context sweep's record of one (twin, configuration)."""
    wanted = fit_pairs(record["model"])
    rows = [fit_row(record["model"], record["config"], 2, p)
            for p in record["points"] if (p["context"], p["batch"]) in wanted and "tpot_ms" in p]
    missing = wanted - {(r["context"], r["batch"]) for r in rows}
    if missing:
        raise SystemExit(f"calibration: the sweep of {record['model']} {record['config']} has no TPOT at "
                         f"{sorted(missing)} (see its points: {record['points']})")
    return rows


def timed_rows(name: str, config: str, layers: int, pairs: list[tuple[int, int]],
               timing: Timing) -> list[dict[str, Any]]:
    """``pairs`` on the ``layers``-layer twin in ``timing.instances`` fresh engines, ``timing.repeats``
    samples each up to ``REPEAT_MAX_CONTEXT`` tokens (longer points once), KV filled by ``DecodeBenchConnector``."""
    model = twin(name, layers)
    points = [p for p in pairs for _ in range(timing.repeats if p[0] <= REPEAT_MAX_CONTEXT else 1)]
    label = f"{name}-{layers}l-{config.split()[0].replace('=', '')}"
    log = timing.log_dir / f"{label}.log"
    print(f"[calibration] {label}: {sorted(set(points))}", flush=True)
    result = run_engine(model, config, points, True, timing.output_len, log, timing.timeout)
    if "error" in result:
        raise SystemExit(f"calibration engine {label} failed: {result['error']} (log: {log})")
    samples = result["points"] + more_instances(model, config, points, True, timing.output_len, log,
                                                timing.timeout, timing.instances)
    return [fit_row(name, config, layers, p)
            for p in sorted(merge_repeats(samples), key=lambda p: (p["context"], p["batch"]))]


def deeper_rows(name: str, config: str, timing: Timing) -> list[dict[str, Any]]:
    """The fit's 4-layer points (4K, batch 1 and 8)."""
    return timed_rows(name, config, DEEPER, [(SHORT_CONTEXT, b) for b in BATCHES], timing)


def fit_point_rows(timing: Timing) -> list[dict[str, Any]]:
    """Every fit point of both twins and both engines, without the sweep around them (``vllm-helix calibrate``)."""
    rows = []
    for name in TWIN_PRESETS:
        for config in SERVED_LAYOUTS:
            rows += timed_rows(name, config, 2, sorted(fit_pairs(name)), timing) + deeper_rows(name, config, timing)
    return rows


def twin_spec(name: str, layers: int) -> ModelSpec:
    """The planner's spec of a benchmark twin at ``layers`` (its preset equals its config.json; tested)."""
    return replace(load_model(TWIN_PRESETS[name]), num_layers=layers)


def engine_points(rows: list[dict[str, Any]], name: str, config: str) -> list[EnginePoint]:
    return [EnginePoint(twin_spec(name, r["layers"]), SERVED_LAYOUTS[config], r["context"], r["batch"],
                        r["tpot_ms"] / 1e3) for r in rows if r["model"] == name and r["config"] == config]


def fit(profile: dict[str, Any], rows: list[dict[str, Any]], source: str) -> dict[str, Any]:
    """The profile's ``calibration`` section: five constants per (attention, engine) from its five points."""
    hw = hardware_from_dict({k: v for k, v in profile.items() if k != "calibration"}, profile["name"])
    section: dict[str, Any] = {"source": source}
    for name in TWIN_PRESETS:
        attention = attention_of(twin_spec(name, 2).attention)
        for config, layout in SERVED_LAYOUTS.items():
            points = engine_points(rows, name, config)
            if points:
                section.setdefault(attention, {})[engine_of(layout.strategy)] = fit_engine_costs(hw, points).to_yaml()
    return section


@dataclass(frozen=True)
class MachineMeasurement:
    """This machine's part of a CPU profile: the machine record, its profile name, and the rates measured."""

    machine: dict[str, Any]
    name: str
    line: str
    memory: dict[str, float]
    flops: dict[str, float]
    collectives: dict[str, Any]
    profile: dict[str, Any]  # the profile's sections, before the ``calibration`` one


def measure_machine(collectives: Collectives, date: str) -> MachineMeasurement:
    """Time this machine's memory, matmuls and the workers' collective (``collectives``: vLLM's, handed in by
    the caller) and lay them out as a profile: one 'GPU' is one of two vLLM CPU workers. ``vllm-helix
    calibrate`` and ``measure_hardware.py`` measure a machine through this one function."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    machine = describe_machine()
    name = profile_name(str(machine["cpu"]), int(machine["cores"]), machine.get("isa"))  # type: ignore[arg-type]
    line = machine_line(machine)
    print(f"measuring {line} (profile {name})", flush=True)
    memory = machine_rates.measure_memory(7)
    flops = {"fp32": machine_rates.measure_matmul(torch.float32, 2048, 7),
             "bf16": machine_rates.measure_matmul(torch.bfloat16, 1024, 7)}
    shm = machine_rates.measure_collectives(collectives, 200)
    reduce = shm["all_reduce"]
    profile = {
        "name": name,
        "description": f"{line}, two vLLM CPU workers, measured and calibrated {date}",
        "measured": True,
        "platform": f"cpu:{machine['cores']}",
        "machine": {"cpu": machine["cpu"], "amx": machine["amx"], "isa": machine.get("isa"), "cores": machine["cores"]},
        "memory": {"capacity_gb": round(machine_rates.memory_total_bytes() / 1e9, 2),
                   "bandwidth_gb_s": round(memory["copy_bytes_per_s"] / 1e9, 2)},
        "compute_tflops": {k: round(v / 1e12, 5) for k, v in flops.items()},
        "scale_up": {"bandwidth_gb_s": round(reduce["bandwidth_bytes_per_s"] / 1e9, 3),
                     "latency_us": round(reduce["latency_s"] * 1e6, 1), "gpus_per_domain": 2},
        "power": {"tdp_w": 9},
    }
    return MachineMeasurement(machine, name, line, memory, flops, shm, profile)


def write_profile(path: Path, profile: dict[str, Any], memory: dict[str, float], transport: str, tool: str,
                  date: str, line: str, torch_version: str) -> None:
    """The profile file, with a header saying how each number was measured."""
    import yaml

    header = (
        f"# Measured by {tool} on {date}: {line}, torch {torch_version}.\n"
        "# One 'GPU' is one of two vLLM CPU workers (gpus_per_domain 2); both share this machine.\n"
        "# memory.bandwidth_gb_s: 256 MiB tensor copy, (read + write bytes) / s, all cores;\n"
        f"#   streaming read for reference: {memory['read_bytes_per_s'] / 1e9:.1f} GB/s.\n"
        "# memory.capacity_gb: MemTotal. compute_tflops: square matmuls (fp32 2048, bf16 1024).\n"
        f"# scale_up: all-reduce between the 2 worker processes over {transport} (1 KiB and 8 MiB messages).\n"
        "# calibration: fitted on vLLM engine runs of the twins (TP=2 and Helix kvp=2);\n"
        "#   the planner charges its fixed costs and KV read rates instead of the roofline's attention.\n"
        "# power.tdp_w: NOT measured; an assumption for the energy model only.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(header + yaml.safe_dump(profile, sort_keys=False))
    tmp.replace(path)  # a reader never sees half a profile
