"""Long-context decode, Helix kvp=2 against TP=2, from 4K to 2M tokens, through vLLM's offline engine.

For each twin (Llama with one KV head, DeepSeek-V3 with MLA; float32) and each
configuration (TP=2, which duplicates the KV heads on both workers, and Helix
kvp=2 on the same two workers) it runs vLLM's ``LLM`` in a fresh, killable process
with 1 GiB of KV cache per worker and times decode per request from vLLM's own
engine timestamps: TPOT = (last token - first token) / (generated - 1), so prefill
is excluded. Contexts up to ``--real-prefill-max`` at batch 1 are prefilled for
real; every other point (all longer contexts, and every batch-8 point) has its KV
filled by vLLM's ``DecodeBenchConnector`` (vLLM's own tool for timing decode at
lengths a CPU cannot prefill: outputs are meaningless, timings are real). A point
that does not fit in the KV cache is recorded as such with vLLM's refusal.

Writes ``benchmarks/results/long_context.{json,md,png}``. The committed sweep comes from
``measure_hardware.py``, which runs this sweep and the planner's calibration in one run.

    .venv/bin/python benchmarks/long_context.py                 # the sweep alone (~50 min on 2 cores)
    .venv/bin/python benchmarks/long_context.py --quick         # smoke run (4K and 64K, llama only)
    .venv/bin/python benchmarks/long_context.py --render-only   # rewrite md/png from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
DTYPE = "float32"
FILL = {"kv_connector": "DecodeBenchConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"fill_mean": 0.015, "fill_std": 0.02}}
# vLLM's CPU rotary kernel is wrong for MLA (docs/cpu-determinism.md); every MLA engine uses PyTorch's.
EXACT_ROPE = {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}}
CONFIGS = ("TP=2", "Helix kvp=2")
# vLLM's CPU MLA prefill (no chunking) needs ~9 GB per worker at 16K tokens: two workers on a 24 GiB
# machine are OOM-killed (seen 2026-11-30), so the DeepSeek twin is prefilled for real only at 4K.
REAL_PREFILL_MAX = {"deepseek_v3": 4096}
REPEAT_MAX_CONTEXT = 65536  # points up to this context are timed --repeats times per engine; longer ones once
MAX_POSITIONS = 4 * 1024 * 1024  # twins get this many positions (random weights: positions are only a limit)


# ----------------------------------------------------------------------------- worker side
def _worker(spec: dict[str, Any]) -> None:
    """Inside the fresh process: start the engine, warm up, time every point, write JSON."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**spec["llm_kwargs"])
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=[rng.randrange(5, 2000) for _ in range(256)])], warm,
                 use_tqdm=False)
    points = []
    for context, batch in spec["points"]:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(5, 2000) for _ in range(context)])
                   for _ in range(batch)]
        started = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        tpots = []
        for output in outputs:
            metrics, generated = output.metrics, len(output.outputs[0].token_ids)
            tpots.append((metrics.last_token_ts - metrics.first_token_ts) / (generated - 1) * 1000.0)
        points.append({"context": context, "batch": batch, "tpot_ms": sum(tpots) / len(tpots),
                       "tpot_ms_per_request": tpots, "wall_s": round(time.monotonic() - started, 2)})
        Path(spec["out"]).write_text(json.dumps({"points": points}))  # kept if a later point kills the engine
        print(f"[long_context] {context} x {batch}: TPOT {points[-1]['tpot_ms']:.1f} ms", file=sys.stderr,
              flush=True)
    if spec.get("profile_steps"):  # decode_step_profile.py: the same request again, under vLLM's profiler
        context = spec["points"][-1][0]
        prompt = TokensPrompt(prompt_token_ids=[rng.randrange(5, 2000) for _ in range(context)])
        llm.start_profile()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=spec["profile_steps"] + 1,
                                              ignore_eos=True), use_tqdm=False)
        llm.stop_profile()
    Path(spec["out"]).write_text(json.dumps({"points": points}))


# ----------------------------------------------------------------------------- driver side
def twin(name: str, layers: int = 2) -> Path:
    """The twin, built once, with ``max_position_embeddings`` raised to MAX_POSITIONS."""
    from vllm_helix.commands.twins import benchmark_twin

    config_path = benchmark_twin(name, layers=layers) / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("max_position_embeddings", 0) < MAX_POSITIONS:
        config["max_position_embeddings"] = MAX_POSITIONS
        config_path.write_text(json.dumps(config, indent=2))
    return config_path.parent


def llm_kwargs(model: Path, config: str, max_model_len: int, fill: bool) -> dict[str, Any]:
    from vllm_helix.harness.server import baseline_engine_kwargs

    kwargs: dict[str, Any] = {"model": str(model), "enforce_eager": True, "seed": 0, "max_model_len": max_model_len,
                              "max_num_seqs": 8, "disable_log_stats": False, "tensor_parallel_size": 2}
    if config == "TP=2":
        kwargs.update(baseline_engine_kwargs(model, DTYPE))
    else:
        kwargs.update(dtype=DTYPE, additional_config={"helix": {"kvp": 2, "tpa": 1}})
    if "deepseek" in model.name:
        kwargs.update(EXACT_ROPE)
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
            proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=cpu_env(2),
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


# ----------------------------------------------------------------------------- results
def _point(record: dict[str, Any] | None, context: int, batch: int) -> dict[str, Any] | None:
    if record is None:
        return None
    return next((p for p in record["points"] if p["context"] == context and p["batch"] == batch), None)


def _records(payload: dict[str, Any], model: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    by_config = {r["config"]: r for r in payload["records"] if r["model"] == model}
    return by_config.get("TP=2"), by_config.get("Helix kvp=2")


def instance_medians(point: dict[str, Any]) -> dict[int, float]:
    """A timed point's median TPOT in each engine instance that timed it.

    Samples are stored instance by instance; a sweep written before their instances
    were recorded (``sample_instances``, 2026-12-02) held ``instances`` equal runs.
    """
    samples = point.get("samples_ms", [point["tpot_ms"]])
    tags = point.get("sample_instances") or [i * point.get("instances", 1) // len(samples)
                                             for i in range(len(samples))]
    groups: dict[int, list[float]] = {}
    for tag, sample in zip(tags, samples):
        groups.setdefault(tag, []).append(sample)
    return {tag: statistics.median(group) for tag, group in sorted(groups.items())}


def pair_ratios(helix: dict[str, Any], tp: dict[str, Any]) -> dict[int, float]:
    """Helix / TP TPOT of each engine pair (instance i of each configuration, timed back to back by
    ``measure_twin``): the ratio of the two engines' medians."""
    h, t = instance_medians(helix), instance_medians(tp)
    return {i: h[i] / t[i] for i in sorted(h.keys() & t.keys())}


def ratio(helix: dict[str, Any], tp: dict[str, Any], instance: int | None = None) -> float:
    """Helix / TP TPOT at one point: the median of the pairs' ratios (or pair ``instance``'s), so that
    drift between pairs cancels instead of entering as the ratio of pooled medians would let it."""
    pairs = pair_ratios(helix, tp)
    return statistics.median(pairs.values()) if instance is None else pairs[instance]


def ratios(payload: dict[str, Any], model: str, batch: int, instance: int | None = None) -> list[tuple[int, float]]:
    """(context, Helix / TP TPOT) where both ran (``ratio``; with ``instance``, where that pair ran)."""
    tp, helix = _records(payload, model)
    out = []
    for context in payload["settings"]["contexts"]:
        a, b = _point(helix, context, batch), _point(tp, context, batch)
        if a and b and "tpot_ms" in a and "tpot_ms" in b and (instance is None or instance in pair_ratios(a, b)):
            out.append((context, ratio(a, b, instance)))
    return out


def crossover(pairs: list[tuple[int, float]]) -> float | None:
    """Context where Helix's TPOT ratio crosses 1 (log-linear between the two measured points around it)."""
    import math

    for (c0, r0), (c1, r1) in zip(pairs, pairs[1:]):
        if r0 >= 1.0 > r1:
            t = (r0 - 1.0) / (r0 - r1)
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    if pairs and pairs[0][1] < 1.0:
        return float(pairs[0][0])  # wins from the shortest measured context on
    return None


def _short(refusal: str) -> str:
    """vLLM's start-up refusal for a context too long for the KV cache, in one sentence."""
    fits = re.search(r"estimated maximum model length is (\d+)", refusal)
    needed = re.search(r"max seq len \((\d+)\), \(([\d.]+) GiB KV cache is needed", refusal)
    if not (fits and needed):
        return refusal
    return (f"a request of {int(needed.group(1)):,} tokens needs {needed.group(2)} GiB of KV cache per worker, "
            f"1 GiB holds at most {int(fits.group(1)):,} tokens")


def _cell(point: dict[str, Any] | None) -> str:
    if point is None:
        return "-"
    if "tpot_ms" in point:
        return f"{point['tpot_ms']:.1f}"
    return "does not fit" if "does_not_fit" in point else f"error: {point['error'][:80]}"


def _tokens(n: float) -> str:
    """4K, 256K (binary below a million), 1M, 2M (decimal from a million on, as the contexts are chosen)."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1024:.0f}K"


TARGETS = {  # (twin, batch, smallest context, largest ratio) from the long-context issue
    "llama_kv1": [(1, 4096, 4096, 1.15), (8, 4096, 4096, 1.15), (1, 262144, None, 0.65)],
    "deepseek_v3": [(1, 4096, 4096, 1.15), (8, 4096, 4096, 1.15), (1, 131072, None, 0.60)],
}


def target_lines(payload: dict[str, Any]) -> list[str]:
    lines = []
    for model, targets in TARGETS.items():
        for batch, low, high, limit in targets:
            measured = [(c, r) for c, r in ratios(payload, model, batch) if c >= low and (high is None or c <= high)]
            span = f"{_tokens(low)}" if high else f">= {_tokens(low)}"
            if not measured:
                lines.append(f"- {model}, batch {batch}, {span}: target <= {limit:.2f}x; no side-by-side point in "
                             "this run (not run, or TP=2 does not fit)")
                continue
            worst = max(r for _, r in measured)
            verdict = "met" if worst <= limit else f"missed by {worst - limit:.2f}x ({worst / limit - 1:+.0%})"
            lines.append(f"- {model}, batch {batch}, {span}: target <= {limit:.2f}x; measured "
                         + ", ".join(f"{r:.2f}x at {_tokens(c)}" for c, r in measured) + f": **{verdict}**")
    return lines


def _profile_rows(model: str, context: int) -> dict[str, dict[str, Any]]:
    """The committed decode-step profile's rows for one twin and context, by configuration."""
    path = RESULTS / "decode_step_profile.json"
    if not path.exists():
        return {}
    return {row["config"]: row for row in json.loads(path.read_text())["rows"]
            if row["model"] == model and row["context"] == context and "ops_ms" in row}


def fixed_cost_lines(payload: dict[str, Any]) -> list[str]:
    """The 4K miss on the Llama twin, from this sweep and the committed decode-step profile."""
    from decode_step_profile import grouped

    rows = _profile_rows("llama_kv1", 4096)
    llama = dict(ratios(payload, "llama_kv1", 1))
    deepseek = dict(ratios(payload, "deepseek_v3", 1))
    if not ({"TP=2", "Helix kvp=2"} <= set(rows) and 4096 in llama):
        return []
    tp, helix = (grouped(rows[c]["ops_ms"]) for c in ("TP=2", "Helix kvp=2"))
    extra = {g: helix.get(g, 0.0) - tp.get(g, 0.0) for g in ("collectives", "helix hops (self)", "other torch ops")}
    profiled = rows["Helix kvp=2"]["tpot_ms"] / rows["TP=2"]["tpot_ms"]
    return [
        f"- **4K on the Llama twin** ({llama[4096]:.2f}x here; the profile's own run measured {profiled:.2f}x at "
        "the same point, which is the run-to-run spread of this shared VM): Helix's worker step does more per "
        f"layer than TP's, a query all-gather and an exchange (collectives {extra['collectives']:+.2f} ms per "
        f"step, including the wait for the peer), the plugin's Python around its hops "
        f"({extra['helix hops (self)']:+.2f} ms) and small torch operations ({extra['other torch ops']:+.2f} ms), "
        f"against a 4K-token read of {tp.get('attention kernel', 0.0):.2f} ms that halving cannot repay."
        + (f" The DeepSeek twin at 4K, batch 1: {deepseek[4096]:.2f}x in this sweep." if 4096 in deepseek else ""),
    ]


def kernel_gap_lines(payload: dict[str, Any]) -> list[str]:
    """The long-context miss on the Llama twin, from this sweep and the committed decode-step profile."""
    from decode_step_profile import grouped

    tp, helix = _records(payload, "llama_kv1")
    tp_short, helix_short = _point(tp, 4096, 1), _point(helix, 4096, 1)
    tp_256, helix_256 = _point(tp, 262144, 1), _point(helix, 262144, 1)
    rows = _profile_rows("llama_kv1", 1000000)
    if not ({"TP=2", "Helix kvp=2"} <= set(rows)
            and all(p and "tpot_ms" in p for p in (tp_short, helix_short, tp_256, helix_256))):
        return []
    kernel = {config: grouped(row["ops_ms"]).get("attention kernel", 0.0) for config, row in rows.items()}
    tp_1m, helix_1m = _point(tp, 1000000, 1), _point(helix, 1000000, 1)
    at_1m = (f", {ratio(helix_1m, tp_1m):.2f}x at 1M"
             if tp_1m and helix_1m and "tpot_ms" in tp_1m and "tpot_ms" in helix_1m else "")
    # Helix at 256K if its kernel read a byte as fast as TP's: its 4K cost plus half of TP's added read time
    at_vllm_rate = (helix_short["tpot_ms"] + (tp_256["tpot_ms"] - tp_short["tpot_ms"]) / 2) / tp_256["tpot_ms"]
    return [
        f"- **256K and beyond on the Llama twin** ({ratio(helix_256, tp_256):.2f}x at 256K{at_1m}): "
        "at 1M the profile shows "
        f"Helix's C++ kernel reading its half of the cache in {kernel['Helix kvp=2']:.0f} ms per step where vLLM's "
        f"C++ kernel reads the whole in {kernel['TP=2']:.0f} ms, i.e. vLLM's kernel moves a byte "
        f"{2 * kernel['Helix kvp=2'] / kernel['TP=2']:.2f}x as fast in the served setting. A TP rank runs 4 of the "
        "twin's 8 query heads against its copy of the KV head, a Helix rank all 8 against its half; the kernel "
        "benchmark ([shard_kernels_cpu.md](shard_kernels_cpu.md)) times vLLM's kernel in both shapes on one "
        "cache (its 'as a TP=2 rank' column) beside Helix's. Helix's 4K cost plus half of TP's added read time "
        f"would give {at_vllm_rate:.2f}x at 256K: the rest of the gap is the kernel's rate.",
    ]


def markdown(payload: dict[str, Any]) -> str:
    from vllm_helix.harness.machine import machine_sentence

    m, s = payload["machine"], payload["settings"]
    lines = [
        "# Long-context decode: Helix kvp=2 against TP=2, 4K to 2M tokens",
        "",
        machine_sentence(m, payload["date"]),
        f"Setup: offline `vllm.LLM`, {DTYPE} twins (Llama with 1 KV head; DeepSeek-V3 with MLA), two CPU workers, "
        "one core each, 1 GiB of KV cache per worker (`VLLM_CPU_KVCACHE_SPACE=1`), `enforce_eager`, greedy, "
        f"{s['output_len']} output tokens per request. TPOT from vLLM's engine timestamps per request, "
        "(last token - first token) / (tokens - 1): prefill excluded; mean over the batch"
        + (f"; every point timed in each of {s.get('instances', 1)} fresh engine(s), {s['repeats']} times per "
           f"engine up to {_tokens(REPEAT_MAX_CONTEXT)} tokens and once beyond, the median of all samples kept (a "
           "TPOT spreads by tens of percent on this shared VM, and by more between engine instances than within one)"
           + ("; TP=2's and Helix's engines alternated (instance i of each back to back) and Helix / TP is the "
              "median over these pairs of each pair's ratio, so the machine's drift between pairs cancels"
              if s.get("pairs_back_to_back") else "; Helix / TP is the median over engine pairs (instance i of each) "
              "of each pair's ratio (this run timed all of a twin's TP=2 engines before its Helix engines)")
           if s.get("repeats", 1) > 1 else "") + ". Batch-1 contexts up to "
        f"{_tokens(s['real_prefill_max'])} are prefilled for real (the DeepSeek twin up to "
        f"{_tokens(REAL_PREFILL_MAX['deepseek_v3'])}: vLLM's unchunked CPU MLA prefill of 16K tokens needs ~9 GB per "
        "worker, and the kernel kills a worker on this 24 GiB machine); all other points have their KV filled by vLLM's "
        "`DecodeBenchConnector` (timings real, outputs meaningless). TP=2 runs vLLM's own CPU kernels "
        "(`CPU_ATTN`; MLA `CPU_MLA` in float32); Helix runs the plugin's per-shard kernels and exchange. "
        "Reproduce: `.venv/bin/python benchmarks/measure_hardware.py` (this sweep and the planner's calibration "
        "in one run, about 65 min), or `.venv/bin/python benchmarks/long_context.py` for the sweep alone "
        "(`--models deepseek_v3 --merge` re-measures one twin and keeps the other's records from the same machine).",
        "",
    ]
    for model in sorted({r["model"] for r in payload["records"]}):
        tp, helix = _records(payload, model)
        cap_tp, cap_helix = (tp or {}).get("kv_cache_tokens"), (helix or {}).get("kv_cache_tokens")
        lines += [f"## {model}", ""]
        if cap_tp and cap_helix:
            lines += [f"KV cache: TP=2 {cap_tp:,} tokens, Helix {cap_helix:,} tokens ({cap_helix / cap_tp:.2f}x).", ""]
        lines += ["| context | batch | KV | TP=2 TPOT ms | Helix TPOT ms | Helix / TP (median over engine pairs) |",
                  "|---:|---:|---|---:|---:|---:|"]
        for batch in s["batches"]:
            for context in s["contexts"]:
                a, b = _point(tp, context, batch), _point(helix, context, batch)
                if all(p is None or "does_not_fit" in p for p in (a, b)):
                    continue  # neither configuration holds it: the capacities above say so
                source = "filled" if (a or b or {}).get("fill") else "real prefill"
                helix_over_tp = (f"{ratio(b, a):.2f}" if a and b and "tpot_ms" in a and "tpot_ms" in b
                                 else ("Helix only" if b and "tpot_ms" in b else ""))
                lines.append(f"| {_tokens(context)} | {batch} | {source} | {_cell(a)} | {_cell(b)} | {helix_over_tp} |")
        pairs = ratios(payload, model, 1)
        cross = crossover(pairs)
        where = ("not reached in the measured range" if cross is None else
                 f"at or below {_tokens(cross)} tokens (the shortest side-by-side point)" if cross == pairs[0][0] else
                 f"~{_tokens(cross)} tokens (log-linear between the measured points around it)"
                 + (f"; Helix is also faster at {_tokens(pairs[0][0])}, but not at every context in between"
                    if pairs[0][1] < 1.0 else ""))
        lines += ["", f"Crossover (batch 1, Helix faster from here on): {where}.", ""]
        refusals = sorted({p["does_not_fit"] for r in (tp, helix) if r for p in r["points"]
                           if p["batch"] == 1 and p.get("does_not_fit")})
        lines += [f"- vLLM's refusal: {_short(text)}" for text in refusals]
        errors = sorted({p["error"] for r in (tp, helix) if r for p in r["points"] if p.get("error")})
        lines += [f"- failed: {text}" for text in errors]
        lines.append("")
    lines += ["## Targets (long-context issue); each twin's TP and Helix measured in one run", ""]
    lines += target_lines(payload)
    lines += ["", "Where Helix still misses, from the committed [decode_step_profile.md](decode_step_profile.md) "
              "(same code, its own run; its TPOTs are quoted beside this sweep's):",
              "",
              *fixed_cost_lines(payload),
              *kernel_gap_lines(payload),
              ]
    lines += ["", "![TPOT against context](long_context.png)", ""]
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = payload["settings"]["contexts"]
    models = sorted({r["model"] for r in payload["records"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        tp, helix = _records(payload, model)
        for record in (tp, helix):
            if record is None:
                continue
            color = "tab:blue" if record is tp else "tab:red"
            for batch, style in zip(payload["settings"]["batches"], ("-", "--", ":")):
                ran = [p for p in record["points"] if p["batch"] == batch and "tpot_ms" in p]
                if ran:
                    ax.plot([p["context"] for p in ran], [p["tpot_ms"] for p in ran], style, marker="o", color=color,
                            label=f"{record['config']}, batch {batch}")
        for context in contexts:  # where only Helix holds a batch-1 request
            a, b = _point(tp, context, 1), _point(helix, context, 1)
            if a and "does_not_fit" in a and b and "tpot_ms" in b:
                ax.annotate(f"TP=2 does not fit;\nHelix {b['tpot_ms']:.0f} ms", (context, b["tpot_ms"]),
                            textcoords="offset points", xytext=(-110, -35), fontsize=8, color="tab:red",
                            arrowprops={"arrowstyle": "->", "color": "tab:red"})
        cross = crossover(ratios(payload, model, 1))
        if cross:
            ax.axvline(cross, color="black", alpha=0.4, linestyle="--")
            ax.text(cross, 0.03, f" crossover ~{_tokens(cross)}", fontsize=8, transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(contexts, [_tokens(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context tokens per request")
        ax.set_ylabel("TPOT ms (decode only, log scale)")
        ax.set_title(f"{model} twin: 2 CPU workers, 1 GiB KV cache each")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(payload: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_context.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "long_context.md").write_text(markdown(payload))
    plot(payload, RESULTS / "long_context.png")


def _ints(text: str, parser: argparse.ArgumentParser, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} {text!r}: a comma list of positive integers")
    return sorted(set(values))


def sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's flags, shared with ``measure_hardware.py`` (which runs this sweep with its fit points)."""
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


def sweep_payload(records: list[dict[str, Any]], args: argparse.Namespace, run: str,
                  wall_s: float) -> dict[str, Any]:
    """``long_context.json``: the records, the machine, the settings, and the run's start stamp (``run``,
    which ``calibration.json`` repeats when the planner's profile was fitted in the same run)."""
    from vllm_helix.harness.machine import describe_machine

    return {"date": run[:10], "run": run, "machine": describe_machine(),
            "settings": {"contexts": args.contexts, "batches": args.batches, "output_len": args.output_len,
                         "repeats": args.repeats, "instances": args.instances, "pairs_back_to_back": True,
                         "real_prefill_max": args.real_prefill_max},
            "records": records, "wall_s": round(wall_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sweep_arguments(parser)
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/long-context"))
    parser.add_argument("--quick", action="store_true", help="llama only, 4K and 64K, batch 1")
    parser.add_argument("--render-only", action="store_true", help="rewrite md/png from the committed JSON")
    parser.add_argument("--merge", action="store_true",
                        help="keep the committed JSON's records of twins not in --models (same machine only)")
    args = parser.parse_args()
    if args.render_only:
        write_results(json.loads((RESULTS / "long_context.json").read_text()))
        return
    if args.quick:
        args.models, args.contexts, args.batches = "llama_kv1", "4096,65536", "1"
    parse_sweep(parser, args)
    from vllm_helix.harness.machine import describe_machine

    run, started = time.strftime("%Y-%m-%dT%H:%M:%S"), time.monotonic()
    records = [record for model in args.models.split(",") for record in measure_twin(model, args)]
    if args.merge:
        kept = json.loads((RESULTS / "long_context.json").read_text())
        if kept["machine"]["cpu"] != describe_machine()["cpu"]:
            parser.error("--merge: the committed results were measured on another CPU; run every twin")
        records = [r for r in kept["records"] if r["model"] not in args.models.split(",")] + records
    payload = sweep_payload(records, args, run, time.monotonic() - started)
    write_results(payload)
    print(markdown(payload))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        main()
