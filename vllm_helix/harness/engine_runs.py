"""vLLM engine runs that time decode: one fresh, killable process per engine, TP=2 against Helix kvp=2.

The library under ``benchmarks/long_context.py`` (the sweep), ``benchmarks/measure_hardware.py`` and
``vllm-helix calibrate`` (the planner's engine constants) and ``benchmarks/decode_step_profile.py``.
Each engine is vLLM's offline ``LLM`` in a subprocess (``python -m patches_free_hooks.timed_engine
SPEC``) on a benchmark twin (float32), timed per request from vLLM's own engine timestamps:
TPOT = (last token - first token) / (generated - 1), so prefill is excluded. Short contexts are
prefilled for real; longer ones (and batch 8) have their KV filled by vLLM's ``DecodeBenchConnector``
(vLLM's tool for timing decode at lengths a CPU cannot prefill: outputs meaningless, timings real).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
DTYPE = "float32"
FILL = {"kv_connector": "DecodeBenchConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"fill_mean": 0.015, "fill_std": 0.02}}
# vLLM's CPU rotary kernel is wrong for MLA (docs/cpu-determinism.md); every MLA engine uses PyTorch's.
CONFIGS = ("TP=2", "Helix kvp=2")
# vLLM's CPU MLA prefill (no chunking) needs ~9 GB per worker at 16K tokens: two workers on a 24 GiB
# machine are OOM-killed (seen 2026-11-30), so the DeepSeek twin is prefilled for real only at 4K.
REAL_PREFILL_MAX = {"deepseek_v3": 4096}
REPEAT_MAX_CONTEXT = 65536  # points up to this context are timed --repeats times per engine; longer ones once
MAX_POSITIONS = 4 * 1024 * 1024  # twins get this many positions (random weights: positions are only a limit)


# The engine process: vLLM's offline LLM timing each point (a vLLM touch, so in patches_free_hooks; run by
# module name across the process boundary, never imported here).
WORKER_MODULE = "patches_free_hooks.timed_engine"


# ----------------------------------------------------------------------------- driver side
def twin(name: str, layers: int = 2) -> Path:
    """The twin, built once, with ``max_position_embeddings`` raised to MAX_POSITIONS."""
    from vllm_helix.twins import benchmark_twin

    config_path = benchmark_twin(name, layers=layers) / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("max_position_embeddings", 0) < MAX_POSITIONS:
        config["max_position_embeddings"] = MAX_POSITIONS
        config_path.write_text(json.dumps(config, indent=2))
    return config_path.parent


def llm_kwargs(model: Path, config: str, max_model_len: int, fill: bool) -> dict[str, Any]:
    from vllm_helix.harness.server import EXACT_ROPE_KWARGS, baseline_engine_kwargs

    kwargs: dict[str, Any] = {"model": str(model), "enforce_eager": True, "seed": 0, "max_model_len": max_model_len,
                              "max_num_seqs": 8, "disable_log_stats": False, "tensor_parallel_size": 2}
    if config == "TP=2":
        kwargs.update(baseline_engine_kwargs(model, DTYPE))
    else:
        kwargs.update(dtype=DTYPE, additional_config={"helix": {"kvp": 2, "tpa": 1}})
    if "deepseek" in model.name:
        kwargs.update(EXACT_ROPE_KWARGS)
    if fill:
        kwargs["kv_transfer_config"] = FILL
    return kwargs


def run_engine(model: Path, config: str, points: list[tuple[int, int]], fill: bool, output_len: int,
               log: Path, timeout_s: float, extra_llm_kwargs: dict[str, Any] | None = None,
               profile_steps: int = 0) -> dict[str, Any]:
    """One engine for these points; returns its points, KV capacity, or vLLM's refusal.

    ``profile_steps`` > 0 decodes the last point's context once more under vLLM's profiler
    (``extra_llm_kwargs`` then carries the ``profiler_config``).
    """
    from vllm_helix.harness.server import cpu_env, kv_cache_tokens, vllm_failure

    max_len = max(context for context, _ in points) + output_len + 16
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        spec = {"llm_kwargs": {**llm_kwargs(model, config, max_len, fill), **(extra_llm_kwargs or {})},
                "points": points, "output_len": output_len, "profile_steps": profile_steps, "out": str(out)}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, json.dumps(spec)], env=cpu_env(2),
                                    stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return {"error": f"timed out after {timeout_s:.0f}s"}
        text = log.read_text(errors="replace")
        result: dict[str, Any] = {"kv_cache_tokens": kv_cache_tokens(text)}
        done = json.loads(out.read_text())["points"] if out.exists() else []
        if code == 0:
            result["points"] = done
            return result
        result["done"] = done  # the points that finished before the engine died
    too_long = re.search(r"estimated maximum model length is (\d+)", text)
    if too_long:
        result["max_model_len"] = int(too_long.group(1))
    result["error"] = vllm_failure(text)
    return result


def merge_repeats(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (context, batch): the median of its repeated TPOTs, with every sample kept.

    A short context's TPOT is a few ms of Python and process hand-offs on a shared
    two-core VM, so one engine's samples spread by tens of percent; the median of
    several is what a comparison (and the planner's validation) can rely on.
    """
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault((point["context"], point["batch"]), []).append(point)
    merged = []
    for samples in groups.values():
        ordered = sorted(samples, key=lambda p: p["tpot_ms"])
        middle = {k: v for k, v in ordered[(len(ordered) - 1) // 2].items() if k != "instance"}
        merged.append({**middle, "samples_ms": [p["tpot_ms"] for p in samples],
                       "sample_instances": [p.get("instance", 0) for p in samples],
                       "instances": len({p.get("instance", 0) for p in samples}),
                       "wall_s": round(sum(p["wall_s"] for p in samples), 2)})
    return merged


def instance_samples(model: Path, config: str, points: list[tuple[int, int]], fill: bool, output_len: int,
                     log: Path, timeout_s: float, instance: int) -> list[dict[str, Any]]:
    """Samples of ``points`` (as listed: a point listed n times is timed n times) from one further fresh
    engine, tagged ``instance`` (the first engine's samples are instance 0).

    On this project's two-core VM one engine's repeats of a point agree within
    10-20%, but the same point moves by 30-40% between engine instances (where the
    allocator put the blocks, which cores the workers landed on): a median over one
    instance is that instance's number. Pooling the samples of several fresh engines
    makes the median a property of the machine.
    """
    result = run_engine(model, config, points, fill, output_len, log.with_name(f"{log.stem}-instance{instance}.log"),
                        timeout_s)
    if "error" in result:  # the first instance ran these points: a later failure is the machine's
        raise SystemExit(f"instance {instance} of {config} on {model.name} failed: {result['error']}")
    return [{**p, "fill": fill, "instance": instance} for p in result["points"]]


def more_instances(model: Path, config: str, points: list[tuple[int, int]], fill: bool, output_len: int,
                   log: Path, timeout_s: float, instances: int) -> list[dict[str, Any]]:
    """``instance_samples`` of instances 1 .. ``instances`` - 1, one engine after the other."""
    return [sample for instance in range(1, instances if points else 1)
            for sample in instance_samples(model, config, points, fill, output_len, log, timeout_s, instance)]


def measure(model_name: str, config: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first instance of one (twin, configuration): a real-prefill engine, then a KV-filled one.

    Returns the record (points that failed or do not fit, and the timed ones as raw
    samples of instance 0 under ``samples``) and the engines that ran, as
    ``instance_samples`` keyword arguments, for ``measure_twin`` to run again.
    """
    model = twin(model_name)
    real = [(c, 1) for c in args.contexts if c <= REAL_PREFILL_MAX.get(model_name, args.real_prefill_max)]
    filled = [(c, b) for c in args.contexts for b in args.batches if (c, b) not in real]
    record: dict[str, Any] = {"model": model_name, "config": config, "points": [], "samples": []}
    engines: list[dict[str, Any]] = []
    log_dir = args.log_dir / f"{model_name}-{config.split()[0].replace('=', '')}"
    for fill, points in ((False, real), (True, filled)):
        if fill and record.get("kv_cache_tokens"):
            # A batch vLLM would accept but could not hold at once (it would queue or preempt).
            capacity = record["kv_cache_tokens"]
            crowded = [(c, b) for c, b in points if b > 1 and b * (c + args.output_len) > capacity]
            record["points"] += [{"context": c, "batch": b, "fill": fill,
                                  "does_not_fit": f"{b} x {c:,} tokens exceed the KV cache of {capacity:,} tokens"}
                                 for c, b in crowded]
            points = [p for p in points if p not in crowded]
        while points:
            label = "KV filled by DecodeBenchConnector" if fill else "real prefill"
            print(f"[{model_name}] {config}, {label}: {points}", flush=True)
            started = time.monotonic()
            repeated = [p for p in points for _ in range(args.repeats if p[0] <= REPEAT_MAX_CONTEXT else 1)]
            log = log_dir / f"{'filled' if fill else 'real'}-{max(c for c, _ in points)}.log"
            result = run_engine(model, config, repeated, fill, args.output_len, log, args.timeout)
            print(f"  {time.monotonic() - started:.0f}s: {result.get('error') or 'ok'}", flush=True)
            if result.get("kv_cache_tokens"):
                record["kv_cache_tokens"] = result["kv_cache_tokens"]
            fits = result.get("max_model_len")
            if "error" in result and fits:  # vLLM refused the longest context: record it, run the rest
                refused = [p for p in points if p[0] + args.output_len + 16 > fits]
                record["points"] += [{"context": c, "batch": b, "fill": fill, "does_not_fit": result["error"]}
                                     for c, b in refused]
                points = [p for p in points if p not in refused]
            elif "error" in result:
                done = merge_repeats(result.get("done", []))
                record["points"] += [{**p, "fill": fill} for p in done]
                finished = {(p["context"], p["batch"]) for p in done}
                record["points"] += [{"context": c, "batch": b, "fill": fill, "error": result["error"]}
                                     for c, b in points if (c, b) not in finished]
                points = []
            else:
                record["samples"] += [{**p, "fill": fill, "instance": 0} for p in result["points"]]
                engines.append({"model": model, "config": config, "points": repeated, "fill": fill, "log": log})
                points = []
    return record, engines


def measure_twin(model_name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """TP=2's and Helix kvp=2's records of one twin, every timed point in ``args.instances`` fresh engines.

    The first instances establish what fits; the later ones alternate (TP=2's
    instance i, then Helix's instance i, each configuration's engines in the first
    instance's order), so that the two engines of a pair are timed minutes apart.
    These VMs drift by up to 1.8x within hours (2026-12-01): timed one configuration
    after the other, a Helix / TP ratio carried that drift, and the measured crossover
    moved 8x between two runs of the same code. ``ratios`` takes each pair's ratio.
    """
    first = [measure(model_name, config, args) for config in CONFIGS]
    for instance in range(1, args.instances):
        for record, engines in first:
            for engine in engines:
                record["samples"] += instance_samples(output_len=args.output_len, timeout_s=args.timeout,
                                                      instance=instance, **engine)
    records = []
    for record, _ in first:
        record["points"] += merge_repeats(record.pop("samples"))
        record["points"].sort(key=lambda p: (p["batch"], p["context"]))
        records.append(record)
    return records


def _ints(text: str, parser: argparse.ArgumentParser, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} {text!r}: a comma list of positive integers")
    return sorted(set(values))


def sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's flags, shared by ``long_context.py`` and ``measure_hardware.py`` (which runs this sweep with its fit points)."""
    parser.add_argument("--models", default="llama_kv1,deepseek_v3")
    # 1M and 2M are decimal: TP=2's 1 GiB per worker holds 1,047,042 Llama-twin tokens, just under 2**20.
    parser.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072,262144,1000000,2000000")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5,
                        help=f"times each engine times a point up to {REPEAT_MAX_CONTEXT:,} tokens (longer: once)")
    parser.add_argument("--instances", type=int, default=3,
                        help="fresh engines that time every point (their samples are pooled, the median kept)")
    parser.add_argument("--real-prefill-max", type=int, default=16384)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per engine")


def parse_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks the sweep's flags and turns the lists into ints (in place)."""
    if args.repeats < 1 or args.instances < 1:
        parser.error(f"--repeats {args.repeats} --instances {args.instances}: time each point at least once")
    args.contexts = _ints(args.contexts, parser, "--contexts")
    args.batches = _ints(args.batches, parser, "--batches")
