"""Serving comparison through vLLM's own tools: Helix against TP (duplicated KV) and vLLM's DCP.

For each model and configuration it starts an OpenAI server (``vllm-helix serve``
for Helix, ``vllm serve`` otherwise), drives it with ``vllm bench serve``
(random dataset, long inputs, fixed output length, several concurrency levels)
and collects TTFT, TPOT (= TTL), ITL p50/p99, output tokens/s and the KV-cache
capacity and maximum concurrency vLLM reports at start-up. Every server is
stopped at the end, also on failure. Configurations vLLM refuses at start-up
(vLLM's own DCP on CPU) are recorded with vLLM's message. Next to the
measurements it prints what ``vllm-helix plan`` predicts for the same layouts on
this machine kind's profile (``--hardware this``: the user's calibrated profile, else
``configs/hardware/cpu-<family>[-avx2]-<cores>core.yaml``; written by ``vllm-helix calibrate`` or
``measure_hardware.py``).

Writes ``benchmarks/results/serve_compare.{json,csv,md,png}``.

    .venv/bin/python -m benchmarks.serve_compare            # the committed run (~12 min on 2 cores)
    .venv/bin/python -m benchmarks.serve_compare --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_helix.harness.machine import describe_machine, machine_sentence
from vllm_helix.host import this_machine_profile_name
from vllm_helix.harness.server import (EXACT_ROPE_FLAGS, Server, ServerError, baseline_engine_kwargs, bench_serve,
                                       cpu_env, engine_flags, vllm_command, vllm_failure, vllm_helix_command)
from vllm_helix.twins import benchmark_twin as twin

RESULTS = Path(__file__).parent / "results"
METRICS = ("mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
           "p50_itl_ms", "p99_itl_ms", "output_throughput", "completed", "failed")


@dataclass
class Config:
    """One server configuration of one model."""

    model: str  # twin name
    name: str
    workers: int
    serve: list[str]  # arguments after the model
    helix: bool = False
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)


def configs(arch_filter: set[str]) -> list[Config]:
    mla = list(EXACT_ROPE_FLAGS)
    table = [
        Config("deepseek_v3", "Helix kvp=2", 2, ["--helix", "kvp=2,tpa=1", *mla], helix=True),
        Config("deepseek_v3", "TP=2 (latent KV duplicated)", 2, ["--tensor-parallel-size", "2", *mla]),
        Config("deepseek_v3", "vLLM DCP=2", 2,
               ["--tensor-parallel-size", "2", "--decode-context-parallel-size", "2", *mla]),
        # bf16: what a CPU user serves; vLLM's fast AMX_MLA backend on CPUs with AMX (CPU_MLA elsewhere).
        Config("deepseek_v3", "Helix kvp=2, bf16", 2, ["--helix", "kvp=2,tpa=1", *mla], helix=True,
               dtype="bfloat16"),
        Config("deepseek_v3", "TP=2, bf16", 2, ["--tensor-parallel-size", "2", *mla], dtype="bfloat16"),
        Config("llama_kv1", "Helix kvp=2", 2, ["--helix", "kvp=2,tpa=1"], helix=True),
        Config("llama_kv1", "TP=2 (1 KV head duplicated)", 2, ["--tensor-parallel-size", "2"]),
        Config("llama_kv1", "vLLM DCP=2", 2, ["--tensor-parallel-size", "2", "--decode-context-parallel-size", "2"]),
    ]
    return [c for c in table if c.model in arch_filter]


def bench(server: Server, model: Path, input_len: int, output_len: int, concurrency: int, prompts: int,
          out_dir: Path) -> dict[str, Any]:
    """One ``vllm bench serve`` run; returns the metrics kept and the command line."""
    result = bench_serve(server.url, model, input_len, output_len, prompts, concurrency, out_dir)
    return {"command": result["command"], **{k: result.get(k) for k in METRICS}}


def run_config(config: Config, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    model = twin(config.model)
    if config.helix:
        launcher, engine = vllm_helix_command(), {"dtype": config.dtype}
    else:
        launcher, engine = vllm_command(), baseline_engine_kwargs(model, config.dtype)
    command = [*launcher, "serve", str(model), *engine_flags(engine), "--enforce-eager",
               "--max-model-len", str(args.max_model_len), *config.serve]
    record: dict[str, Any] = {"model": config.model, "config": config.name, "workers": config.workers,
                              "dtype": config.dtype, "attention_backend": engine.get("attention_backend"),
                              "server_command": " ".join(command), "runs": []}
    log = log_dir / f"{config.model}-{config.name.split()[0].lower()}-{config.dtype}-{config.workers}.log"
    print(f"[{config.model}] {config.name}: starting server ...", flush=True)
    try:
        with Server(command, log, env=cpu_env(config.workers), start_timeout_s=900) as server:
            record["start_s"] = round(server.start_s, 1)
            record["kv"] = server.kv_capacity()
            print(f"  up in {server.start_s:.0f}s; KV cache {record['kv']['kv_cache_tokens']:,} tokens, "
                  f"max concurrency {record['kv']['max_concurrency']:.1f}x", flush=True)
            bench(server, model, 64, 2, 1, 1, log_dir)  # warm-up: first-request costs out of the numbers
            for input_len, concurrency in args.sweep:
                started = time.monotonic()
                run = bench(server, model, input_len, args.output_len, concurrency,
                            concurrency * args.prompts_per_slot, log_dir)
                run.update(concurrency=concurrency, input_len=input_len)
                record["runs"].append(run)
                print(f"  {input_len} in, concurrency {concurrency}: TPOT {run['mean_tpot_ms']:.1f} ms, TTFT "
                      f"{run['mean_ttft_ms']:.0f} ms, {run['output_throughput']:.1f} tok/s, "
                      f"failed {run['failed']} ({time.monotonic() - started:.0f}s)", flush=True)
    except ServerError as err:
        refusal = vllm_failure(log.read_text(errors="replace") if log.exists() else str(err))
        record["refused"] = refusal
        print(f"  refused at start-up: {refusal}", flush=True)
    return record


def predictions(records: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """``vllm-helix plan`` on the measured CPU profile for the same layouts, contexts and batches."""
    rows, hardware = [], this_machine_profile_name()
    for twin_name in sorted({r["model"] for r in records}):
        model_preset = str(twin(twin_name))  # the planner reads the twin's own config.json
        for strategy, layout in (("helix", "kvp=2,tpa=1"), ("tp", None)):
            for input_len, batch in args.sweep:
                command = [sys.executable, "-m", "vllm_helix.commands.cli", "plan", "--model", model_preset,
                           "--hardware", hardware, "--context", str(input_len), "--gpus", "2", "--json",
                           "--batch", str(batch), "--strategies", strategy, "--top", "50"]
                if layout:
                    command += ["--helix", layout]
                done = subprocess.run(command, capture_output=True, text=True, timeout=300)
                rows.append({"model": twin_name, "strategy": strategy, "batch": batch, "input_len": input_len,
                             "command": " ".join(command[1:]), "ok": done.returncode == 0,
                             "output": _plan_points(done.stdout) if done.returncode == 0
                             else done.stderr.strip()[-400:]})
    return rows


def _plan_points(stdout: str) -> Any:
    """Predicted TTL of each 2-worker layout at each batch: ``[{layout, batch, ttl_ms}]``."""
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        return stdout.strip()[-400:]
    points = []
    for p in data.get("ranked", []):
        if p["gpus"] != 2:
            continue
        layout = ",".join(f"{k}={v}" for k, v in p["layout"].items() if v != 1 or k in ("kvp", "tpa"))
        points.append({"layout": layout, "batch": p["batch"], "ttl_ms": round(p["ttl_ms"], 3)})
    return sorted(points, key=lambda p: (p["layout"], p["batch"]))


def write_results(payload: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_compare.json").write_text(json.dumps(payload, indent=2) + "\n")
    flat = [{"model": r["model"], "config": r["config"], "workers": r["workers"], **r.get("kv", {}),
             **{k: v for k, v in run.items() if k != "command"}}
            for r in payload["records"] for run in r["runs"]]
    if flat:
        with open(RESULTS / "serve_compare.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for row in flat for k in row}))
            writer.writeheader()
            writer.writerows(flat)
    (RESULTS / "serve_compare.md").write_text(markdown(payload))
    plot(payload, RESULTS / "serve_compare.png")


def markdown(payload: dict[str, Any]) -> str:
    m, s = payload["machine"], payload["settings"]
    lines = [
        "# Serving comparison: Helix vs TP (duplicated KV) vs vLLM's DCP, through `vllm bench serve`",
        "",
        machine_sentence(m, payload["date"]),
        f"Workload: random dataset, (input tokens x concurrency) points {', '.join(f'{n}x{c}' for n, c in s['sweep'])}, "
        f"{s['output_len']} output tokens (ignore EOS), {s['prompts_per_slot']} prompts per concurrency slot; "
        f"offline twins in float32 (bf16 where the configuration says so), `--max-model-len {s['max_model_len']}`, 1 GiB of KV cache per worker "
        "(`VLLM_CPU_KVCACHE_SPACE=1`), one core per worker. Reproduce: "
        "`.venv/bin/python -m benchmarks.serve_compare` (command lines of every server and bench run are "
        "in serve_compare.json).",
        "",
        "| model | configuration | KV cache tokens | max concurrency | input | concurrency | TTFT mean ms "
        "| TPOT mean ms | TPOT p99 ms | ITL p50 ms | ITL p99 ms | output tok/s | tok/s/worker | tok/s/user | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["records"]:
        if "refused" in r:
            lines.append(f"| {r['model']} | {_label(r)} | refused by vLLM at start-up: {r['refused']} "
                         "| | | | | | | | | | | | |")
            continue
        for run in r["runs"]:
            per_user = 1000.0 / run["mean_tpot_ms"] if run["mean_tpot_ms"] else 0.0
            lines.append(
                f"| {r['model']} | {_label(r)} | {r['kv']['kv_cache_tokens']:,} | {r['kv']['max_concurrency']:.1f} "
                f"| {run['input_len']} | {run['concurrency']} | {run['mean_ttft_ms']:.0f} | {run['mean_tpot_ms']:.1f} | "
                f"{run['p99_tpot_ms']:.1f} | {run['p50_itl_ms']:.1f} | {run['p99_itl_ms']:.1f} | "
                f"{run['output_throughput']:.1f} | {run['output_throughput'] / r['workers']:.1f} | "
                f"{per_user:.1f} | {run['failed']} |")
    lines += ["", "## Ratios, Helix against TP at equal concurrency", ""]
    lines += ratio_lines(payload["records"])
    lines += ["", "## Reading", ""]
    lines += reading_lines(payload)
    lines += ["", "## What `vllm-helix plan` predicts on the measured CPU profile", ""]
    lines += ["| model | strategy | context | batch | 2-worker layout | predicted TTL ms | measured mean TPOT ms |",
              "|---|---|---:|---:|---|---:|---:|"]
    for p in payload["predictions"]:
        measured = _measured_tpot(payload["records"], p["model"], p["strategy"], p["input_len"], p["batch"])
        points = p["output"] if p["ok"] and isinstance(p["output"], list) else []
        if not points:
            lines.append(f"| {p['model']} | {p['strategy']} | {p['input_len']} | {p['batch']} | planner: {p['output']} | | |")
        for point in points:
            lines.append(f"| {p['model']} | {p['strategy']} | {p['input_len']} | {p['batch']} | {point['layout']} "
                         f"| {point['ttl_ms']:.2f} | {'-' if measured is None else format(measured, '.1f')} |")
    lines += ["", f"Planner commands: `vllm-helix plan --model .cache/twins/<twin> --hardware {payload['hardware']} "
              "--context N --gpus 2 --batch B --strategies helix|tp [--helix kvp=2,tpa=1]`."]
    lines += ["", "![Pareto](serve_compare.png)", ""]
    return "\n".join(lines) + "\n"


def _dtype(record: dict[str, Any]) -> str:
    return record.get("dtype", "float32")  # runs before bf16 rows were added were all float32


def _label(record: dict[str, Any]) -> str:
    """The configuration, with the attention backend a Helix-off server was told to use."""
    backend = record.get("attention_backend")
    return f"{record['config']} (vLLM's {backend})" if backend else record["config"]


def _measured_tpot(records: list[dict[str, Any]], model: str, strategy: str, input_len: int,
                   batch: int) -> float | None:
    """Mean float32 TPOT of the strategy's run at this input length and concurrency (the planner's case)."""
    prefix = "Helix" if strategy == "helix" else "TP"
    for r in records:
        if r["model"] == model and _dtype(r) == "float32" and r["config"].startswith(prefix) and "refused" not in r:
            for run in r["runs"]:
                if run["concurrency"] == batch and run["input_len"] == input_len:
                    return run["mean_tpot_ms"]
    return None


def _groups(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(model, dtype) pairs in the records, float32 first."""
    return sorted({(r["model"], _dtype(r)) for r in records}, key=lambda g: (g[0], g[1] != "float32", g[1]))


def _helix_and_tp(records: list[dict[str, Any]], model: str,
                  dtype: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The model's Helix and TP records in ``dtype`` that started (either may be None)."""
    def started(prefix: str) -> dict[str, Any] | None:
        return next((r for r in records if r["model"] == model and _dtype(r) == dtype
                     and r["config"].startswith(prefix) and "refused" not in r), None)
    return started("Helix"), started("TP")


def ratio_lines(records: list[dict[str, Any]]) -> list[str]:
    out = []
    for model, dtype in _groups(records):
        helix, tp = _helix_and_tp(records, model, dtype)
        if not helix or not tp:
            continue
        out.append(f"- {model}, {dtype} (TP: {_label(tp)}): KV capacity {helix['kv']['kv_cache_tokens'] / tp['kv']['kv_cache_tokens']:.2f}x, "
                   f"maximum concurrency {helix['kv']['max_concurrency'] / tp['kv']['max_concurrency']:.2f}x; "
                   + "; ".join(
                       f"{h['input_len']} in, concurrency {h['concurrency']}: TPOT {h['mean_tpot_ms'] / t['mean_tpot_ms']:.2f}x of TP's "
                       f"({h['mean_tpot_ms']:.1f} vs {t['mean_tpot_ms']:.1f} ms), output tok/s "
                       f"{h['output_throughput'] / t['output_throughput']:.2f}x"
                       for h, t in zip(helix["runs"], tp["runs"])))
    return out


def _pairs(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any], dict, dict]]:
    """(model, Helix record, TP record, Helix run, TP run) at equal input length and concurrency, float32."""
    pairs = []
    for model in sorted({r["model"] for r in records}):
        helix, tp = _helix_and_tp(records, model, "float32")
        if helix and tp:
            pairs += [(model, helix, tp, h, t) for h, t in zip(helix["runs"], tp["runs"])]
    return pairs


def reading_lines(payload: dict[str, Any]) -> list[str]:
    """What the tables say, computed from them (no number typed in by hand)."""
    pairs = _pairs(payload["records"])
    if not pairs:
        return ["- No Helix/TP pair ran: nothing to compare."]
    capacity = {m: h["kv"]["kv_cache_tokens"] / t["kv"]["kv_cache_tokens"] for m, h, t, _, _ in pairs}
    extra = [h["mean_tpot_ms"] - t["mean_tpot_ms"] for _, _, _, h, t in pairs]
    longest = max(h["input_len"] for _, _, _, h, _ in pairs)
    ttft = [(m, h["mean_ttft_ms"] / t["mean_ttft_ms"]) for m, _, _, h, t in pairs
            if h["input_len"] == longest and h["concurrency"] == 1]
    measured_over_predicted = []
    for p in payload["predictions"]:
        points = p["output"] if p["ok"] and isinstance(p["output"], list) else []
        measured = _measured_tpot(payload["records"], p["model"], p["strategy"], p["input_len"], p["batch"])
        if points and measured is not None:
            measured_over_predicted.append(measured / min(q["ttl_ms"] for q in points))
    lines = [
        "- **Capacity is the win here.** At the same 1 GiB of KV cache per worker Helix holds "
        + ", ".join(f"{c:.2f}x ({m})" for m, c in capacity.items())
        + " the tokens of TP, whose workers each keep a full copy of the KV heads they share.",
        f"- **Prefill.** Time to first token at {longest} input tokens, Helix over TP: "
        + ", ".join(f"{r:.2f}x ({m})" for m, r in ttft)
        + ". The GQA twin's prompt runs through the plugin's attention (each rank attends its half of the "
        "cache with torch's flash kernel); the MLA twin's prefill is vLLM's own, the same on both sides.",
        f"- **Decode.** Helix's TPOT against TP: {min(extra):+.1f} to {max(extra):+.1f} ms per token; Helix is "
        f"faster at {sum(e < 0 for e in extra)} of {len(extra)} points. At these 4K-16K-token contexts on "
        "two-layer twins a token's KV read is a few milliseconds per worker, the size of the per-layer query "
        "all-gather and exchange Helix pays between two processes that share two cores with vLLM's API "
        "server and engine core ([decode_step_profile.md](decode_step_profile.md) breaks a step down); "
        "Helix's decode advantage grows with the context ([long_context.md](long_context.md)).",
        _planner_line(payload["hardware"], measured_over_predicted),
    ]
    return lines


def _planner_line(profile: str, measured_over_predicted: list[float]) -> str:
    """How the planner's TPOT compares with the measured one, and why, by the kind of profile it used."""
    from vllm_helix.planner.hardware_spec import load_hardware

    if not measured_over_predicted:
        return "- **The planner**: no point to compare."
    span = f"{min(measured_over_predicted):.2f}-{max(measured_over_predicted):.2f}x"
    if load_hardware(profile).calibration is not None:
        return (f"- **The planner**, with this machine kind's calibrated profile (`{profile}`): measured TPOT over "
                f"predicted {span} (best layout of each strategy). Its constants were fitted on the offline engine "
                "(calibration.md); a server adds its API process and request handling on the same two cores.")
    return (f"- **The planner**, with a roofline profile (`{profile}`, not calibrated): measured TPOT over "
            f"predicted {span}. A roofline charges the model's bytes and FLOPs, a few MB for these twins; the "
            "CPU servers' time per token is dominated by costs outside any roofline (per-step scheduling and "
            "sampling, per-layer operator overheads, cross-process synchronisation): `vllm-helix calibrate` "
            "fits them for this machine.")


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in payload["records"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in payload["records"]:
            if r["model"] != model or "refused" in r or not r["runs"]:
                continue
            for input_len in sorted({run["input_len"] for run in r["runs"]}):
                runs = [run for run in r["runs"] if run["input_len"] == input_len]
                xs = [1000.0 / run["mean_tpot_ms"] for run in runs]
                ys = [run["output_throughput"] / r["workers"] for run in runs]
                ax.plot(xs, ys, marker="o", label=f"{r['config']}, {input_len} in")
                for x, y, run in zip(xs, ys, runs):
                    ax.annotate(f"c={run['concurrency']}", (x, y), fontsize=7, textcoords="offset points",
                                xytext=(3, 3))
        ax.set_title(f"{model} twin, {payload['settings']['output_len']} output tokens")
        ax.set_xlabel("tokens/s/user (1000 / mean TPOT)")
        ax.set_ylabel("output tokens/s per worker")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="deepseek_v3,llama_kv1", help="twins to compare")
    parser.add_argument("--sweep", default="4096x1,4096x4,16384x1",
                        help="comma list of INPUT_LENxCONCURRENCY points (16K prefill takes ~70 s on 1 core)")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--prompts-per-slot", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=16384 + 64)
    parser.add_argument("--quick", action="store_true", help="smoke run: 512-token inputs, concurrency 1,2")
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/serve-compare"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the md/csv/png from the committed JSON")
    args = parser.parse_args()
    if args.render_only:
        write_results(json.loads((RESULTS / "serve_compare.json").read_text()))
        return
    if args.quick:
        args.sweep, args.output_len, args.max_model_len = "512x1,512x2", 16, 2048
    sweep = args.sweep
    try:
        args.sweep = [tuple(int(v) for v in point.split("x", 1)) for point in sweep.split(",")]
    except ValueError:
        args.sweep = []
    if not args.sweep or any(len(point) != 2 or min(point) < 1 for point in args.sweep):
        parser.error(f"--sweep {sweep!r}: each point is INPUT_LENxCONCURRENCY with positive integers, "
                     "e.g. 4096x1,16384x1")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    records = []
    selected = configs(set(args.models.split(",")))
    for i, config in enumerate(selected, 1):
        print(f"({i}/{len(selected)})", end=" ")
        records.append(run_config(config, args, args.log_dir))
    payload = {
        "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
        "hardware": this_machine_profile_name(),
        "settings": {"sweep": args.sweep, "output_len": args.output_len,
                     "prompts_per_slot": args.prompts_per_slot, "max_model_len": args.max_model_len},
        "records": records, "predictions": predictions(records, args),
        "wall_s": round(time.monotonic() - started, 1),
    }
    write_results(payload)
    print(markdown(payload))
    print(f"wrote {RESULTS}/serve_compare.{{json,csv,md,png}} in {payload['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
