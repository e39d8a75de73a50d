"""`vllm-helix plan`: pick the decode layout for a model, GPUs, context and TTL budget.

Prices every TP, TP x PP, DP-attention + EP, Medha-style KVP and Helix layout on
1..N GPUs at every batch size with the roofline cost model, prints the best point
of each strategy, a ranked table, the recommendation with its per-term breakdown
and the exact serve command; optionally JSON, a Pareto plot and a
disaggregated-serving sizing. Bad input prints one ``error:`` line and exits 2.

Everything beyond argparse is imported inside :func:`run` so ``vllm-helix --help``
stays instant (numpy is the heaviest import, matplotlib only for ``--plot``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_helix.planner.disagg import DisaggregationPlan
    from vllm_helix.planner.hardware_spec import HardwareSpec
    from vllm_helix.planner.strategies import Layout
    from vllm_helix.planner.model_spec import ModelSpec
    from vllm_helix.planner.recommend import PlanPoint
    from vllm_helix.planner.search import SearchResult
    from vllm_helix.planner.sensitivity import LatencyPoint

HELP = "pick the Helix (or baseline) decode layout for a model, GPUs, context and TTL budget"

_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# The default latency budget: 20 tokens/s per user, faster than people read, the interactive
# end of the paper's Pareto plots; throughput is then maximised within it.
DEFAULT_TTL_MS = 50.0


def parse_tokens(text: str) -> int:
    """Token counts with binary suffixes, as context windows are quoted: 128K = 131072, 1M = 1048576."""
    from vllm_helix.planner.errors import PlannerError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
    if not match:
        raise PlannerError(f"cannot read token count {text!r}; write e.g. 4096, 128K or 1M")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if value < 1 or value != int(value):
        raise PlannerError(f"token count {text!r} must be a whole number >= 1")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="preset (deepseek-r1, llama-3.1-405b, ...), a config.json, a model directory "
                             "or a preset YAML")
    parser.add_argument("--hardware", default="gb200-nvl72",
                        help="preset under configs/hardware (gb200-nvl72, b200, h200, h100-sxm, ...) or a YAML")
    parser.add_argument("--context", default="128K", help="KV history per sequence, e.g. 32768, 128K, 1M")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPU budget N: layouts on 1..N GPUs (default: one scale-up domain)")
    parser.add_argument("--ttl-ms", default=None,
                        help=f"token-to-token latency budget in ms, or 'fastest' for the lowest-latency layout "
                             f"(default {DEFAULT_TTL_MS:g} ms, {1e3 / DEFAULT_TTL_MS:g} tokens/s per user; where no "
                             f"layout meets the default, the fastest is shown and the plan says so)")
    parser.add_argument("--batch", default=None,
                        help="batch sizes to price, e.g. 1,8,64 (default: 1..65536, 4 per octave)")
    parser.add_argument("--strategies", default="tp,tp_pp,dp_ep,kvp,helix",
                        help="comma list among tp, tp_pp, dp_ep, kvp (Medha), helix")
    parser.add_argument("--helix", default=None,
                        help="price only this Helix layout, e.g. kvp=8,tpa=8,tpf=64,ep=1,hopb=4 "
                             "(hopb > 1 turns HOP-B on; the planner picks the micro-batch count)")
    for part in ("weight", "kv", "compute"):
        parser.add_argument(f"--{part}-dtype", default=None,
                            help=f"{part} format: fp4, fp8, bf16, fp32 (default: the checkpoint's format)")
    parser.add_argument("--act-dtype", default="bf16", help="activations on the wire (default bf16)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of each GPU's memory vLLM may use, as vLLM's own flag (default 0.9); "
                             "weights, activation workspace, a runtime reserve and the KV cache must fit in it")
    parser.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw the Pareto frontiers to this file")
    parser.add_argument("--isl", default=None, help="disaggregation: prompt length (e.g. 16K)")
    parser.add_argument("--osl", default=None, help="disaggregation: output length (e.g. 2K)")
    parser.add_argument("--rate", type=float, default=None, help="disaggregation: requests per second")


def run(args: argparse.Namespace) -> int:
    from vllm_helix.config import HelixConfigError
    from vllm_helix.planner.errors import PlannerError

    try:
        plan = make_plan(args)
        if args.plot:
            from vllm_helix.planner.plots import plot_frontiers

            plot_frontiers(plan.result, args.plot, highlight=plan.best, ttl_budget=plan.ttl_budget)
    except (PlannerError, HelixConfigError) as err:
        print(f"vllm-helix plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan_json(plan, args), indent=2) if args.json else "\n".join(plan_text(plan, args)))
    return 0


@dataclass(frozen=True)
class Plan:
    """Everything one `plan` invocation computed."""

    model: "ModelSpec"
    hardware: "HardwareSpec"
    gpus: int
    ttl_budget: float | None
    result: "SearchResult"
    best: "PlanPoint"
    ranked: list["PlanPoint"]
    per_family: dict[str, "PlanPoint"]
    disaggregation: "DisaggregationPlan | None"
    seconds: float  # the search itself
    warnings: tuple[str, ...] = ()
    sensitivity: tuple["LatencyPoint", ...] = ()  # empty for --helix (no baseline priced)
    total_seconds: float = 0.0  # the whole plan, the latency re-pricing included

    @property
    def model_ref(self) -> str:
        """What the commands load: the model, or a placeholder for a checkpoint in the priced weight format."""
        from vllm_helix.planner.formats import checkpoint_placeholder

        placeholder = checkpoint_placeholder(self.model, self.result.workload.precision, self.hardware.platform)
        return placeholder or self.model.source or self.model.name


def calibration_warning(hardware: HardwareSpec, layout: Layout) -> str | None:
    """Say so when a calibrated profile prices a layout unlike the engines it was fitted on.

    ``measure_hardware.py`` fits its constants on TP and Helix engines spanning one
    domain (two CPU workers); other widths, PP, DP attention and Medha reuse the
    ``vllm`` engine's constants measured there, which the validation does not cover.
    """
    if hardware.calibration is None:
        return None
    if (layout.strategy in ("tp", "helix") and layout.gpus == hardware.gpus_per_domain and layout.pp == 1
            and layout.dpa == 1):
        return None
    return (f"{hardware.name} is calibrated on {hardware.gpus_per_domain}-rank TP and Helix engines; the recommended "
            f"{layout.family} {layout.describe()} on {layout.gpus} GPU(s) is priced with their constants, an "
            f"extrapolation its validation does not cover")


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve the inputs, price the layouts, pick the answer (raises PlannerError/HelixConfigError)."""
    import numpy as np

    from vllm_helix.planner.cost import Workload
    from vllm_helix.planner.disagg import TrafficMix, plan_disaggregation
    from vllm_helix.planner.errors import PlannerError
    from vllm_helix.planner.hardware_spec import load_hardware, machine_warning
    from vllm_helix.planner.model_spec import context_warning, load_model
    from vllm_helix.planner.precision import Precision
    from vllm_helix.planner.recommend import best_per_family, best_points, recommend
    from vllm_helix.planner.search import search
    from vllm_helix.planner.sensitivity import SERVABLE_BASELINES, latency_sensitivity

    started = time.perf_counter()
    model = load_model(args.model)
    hardware = load_hardware(args.hardware)
    weights = args.weight_dtype or model.dtype
    # KV: vLLM's default, the model's own dtype, the only one Helix serves (serving_rules.check_kv_cache_dtype)
    precision = Precision(weights, args.kv_dtype or model.kv_cache_dtype, args.compute_dtype or weights,
                          args.act_dtype)
    hardware.flop_rate(precision.compute)  # fail early on e.g. fp4 on H100
    work = Workload(parse_tokens(args.context), precision, memory_utilization=args.gpu_memory_utilization)
    warnings = [w for w in (context_warning(model, work.context), machine_warning(hardware)) if w]
    ttl_budget = _ttl_budget(args.ttl_ms)
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    if precision.kv != model.kv_cache_dtype and "helix" in strategies and not args.helix:
        warnings.append(f"KV cache priced as {precision.kv}: Helix serves only the model's {model.kv_cache_dtype}, "
                        "so only baselines are recommended; drop --kv-dtype to compare Helix")
    batches = None
    if args.batch:
        try:
            batches = np.array([int(b) for b in args.batch.split(",") if b.strip()])
        except ValueError:
            raise PlannerError(f"--batch {args.batch!r} must be comma-separated integers, e.g. 1,8,64") from None
    gpus = hardware.gpus_per_domain if args.gpus is None else args.gpus
    if args.helix:
        layout = _helix_layout(args.helix, model, hardware, precision.kv)
        gpus = layout.gpus if args.gpus is None else gpus
        if gpus < layout.gpus:
            raise PlannerError(f"--helix {args.helix} needs {layout.gpus} GPUs but --gpus is {gpus}")
        result = search(model, hardware, work, layout.gpus, batches, layouts=[layout])
    else:
        result = search(model, hardware, work, gpus, batches, strategies)
    try:
        best, ranked = recommend(result, ttl_budget, gpus)
    except PlannerError:
        if args.ttl_ms is not None:
            raise
        ttl_budget = None
        best, ranked = recommend(result, ttl_budget, gpus)
        warnings.append(f"no layout meets the default {DEFAULT_TTL_MS:g} ms budget; the fastest layout is shown "
                        f"({best.ttl * 1e3:.3g} ms); pass --ttl-ms to set a budget")
    disaggregation = None
    if args.isl or args.osl or args.rate:
        if not (args.isl and args.osl and args.rate and ttl_budget):
            raise PlannerError("disaggregation needs all of --isl, --osl and --rate, and a latency budget "
                               "(--ttl-ms in milliseconds; 'fastest', or a default no layout meets, leaves none)")
        mix = TrafficMix(parse_tokens(args.isl), parse_tokens(args.osl), args.rate)
        disaggregation = plan_disaggregation(model, hardware, precision, mix, ttl_budget, gpus, strategies, batches,
                                             args.gpu_memory_utilization)
    extrapolated = calibration_warning(hardware, best.layout)
    if extrapolated:
        warnings.append(extrapolated)
    seconds = time.perf_counter() - started  # the search itself, before the sensitivity re-pricing
    sensitivity = ()
    if not args.helix and "helix" in strategies and set(SERVABLE_BASELINES) & set(strategies):
        sensitivity = tuple(latency_sensitivity(
            result, lambda hw: search(model, hw, work, gpus, batches, strategies), ttl_budget))
    return Plan(model, hardware, gpus, ttl_budget, result, best, ranked,
                best_per_family(best_points(result, ttl_budget)), disaggregation, seconds, tuple(warnings),
                sensitivity, time.perf_counter() - started)


def _ttl_budget(text: str | None) -> float | None:
    """Seconds from ``--ttl-ms`` (``None``: no budget, i.e. 'fastest'); the default when not given."""
    from vllm_helix.planner.errors import PlannerError

    if text is None:
        return DEFAULT_TTL_MS / 1e3
    if str(text).strip().lower() == "fastest":
        return None
    try:
        value = float(text)
    except ValueError:
        raise PlannerError(f"--ttl-ms {text!r} must be a number of milliseconds or 'fastest'") from None
    if not value > 0:
        raise PlannerError(f"--ttl-ms must be positive, got {text}")
    return value / 1e3


def _helix_layout(spec: str, model: "ModelSpec", hardware: Any, kv_dtype: str) -> Any:
    """The one Layout named by ``--helix``, checked by `vllm-helix serve`'s rules for the hardware's platform."""
    from vllm_helix.config import HelixConfig
    from vllm_helix.planner.strategies import Layout, helix_shape
    from vllm_helix.serving_rules import check_kv_cache_dtype, check_layout

    config = HelixConfig.parse(spec)
    check_kv_cache_dtype(kv_dtype, model.kv_cache_dtype)
    check_layout(config, helix_shape(model), hardware.platform)
    return Layout("helix", tpa=config.tpa, kvp=config.kvp, tpf=config.tpf, ep=config.ep, hopb=config.hopb > 1)


# ------------------------------------------------------------------- output
def _serve_lines(point: "PlanPoint", model_ref: str) -> list[str]:
    """The ``serve:`` line, or one line per node role where the layout spans hosts."""
    commands = point.node_commands(model_ref)
    if len(commands) <= 1:
        return [f"  serve: {point.command(model_ref)}"]
    return [f"  serve on {point.nodes} nodes of {point.layout.gpus // point.nodes} GPUs (MASTER_ADDR: node 0's "
            "address, reachable from every node" + ("; R: the node's rank):" if point.nodes > 2 else "):"),
            *(f"    {which}: {command}" for which, command in commands)]


def plan_json(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    from vllm_helix.planner.disagg import split_commands
    from vllm_helix.planner.energy import energy_of
    from vllm_helix.planner.formats import formats_text

    ref = plan.model_ref
    work = plan.result.workload
    payload: dict[str, Any] = {
        "model": plan.model.name, "hardware": plan.hardware.name, "context": work.context, "gpus": plan.gpus,
        "precision": work.precision.__dict__,
        "formats": formats_text(plan.model, work.precision, plan.hardware.platform).removeprefix("formats: "),
        "ttl_budget_ms": None if plan.ttl_budget is None else plan.ttl_budget * 1e3,
        "points_priced": plan.result.num_points, "seconds": plan.seconds, "total_seconds": plan.total_seconds,
        "warnings": list(plan.warnings),
        "best": {**plan.best.as_dict(ref), "tokens_per_joule": energy_of(plan.best, plan.hardware).tokens_per_joule,
                 "replicas": plan.gpus // plan.best.layout.gpus},
        "best_per_strategy": {family: p.as_dict(ref) for family, p in plan.per_family.items()},
        "ranked": [p.as_dict(ref) for p in plan.ranked[: args.top]],
    }
    d = plan.disaggregation
    if d is not None:
        payload["disaggregation"] = {
            "isl": d.mix.input_len, "osl": d.mix.output_len, "rate": d.mix.rate,
            "prefill_tp": d.prefill.gpus, "prefill_ms": d.prefill.seconds * 1e3, "prefill_gpus": d.prefill_gpus,
            "decode": d.decode.as_dict(ref), "decode_gpus": d.decode_gpus,
            "prefill_to_decode": d.prefill_to_decode, "aggregated_gpus": d.aggregated_gpus,
            "pays": d.pays, "gain": d.gain,
            "commands": split_commands(d, plan.model_ref),
        }
    payload["latency_sensitivity"] = [p.as_dict(ref) for p in plan.sensitivity]
    if args.plot:
        payload["plot"] = args.plot
    return payload


def _table(points: list["PlanPoint"], title: str) -> list[str]:
    lines = [title, f"{'#':>3} {'strategy':18} {'layout':36} {'GPUs':>4} {'batch':>6} {'TTL ms':>8} "
                    f"{'tok/s/user':>10} {'tok/s/GPU':>10} {'GB/GPU':>7}"]
    for i, p in enumerate(points, 1):
        hopb = f",hopb={p.micro_batches}" if p.layout.hopb else ""
        lines.append(f"{i:>3} {p.layout.family:18} {p.layout.describe() + hopb:36} {p.layout.gpus:>4} "
                     f"{p.batch:>6} {p.ttl * 1e3:8.3f} {p.tokens_per_s_per_user:10.1f} "
                     f"{p.tokens_per_s_per_gpu:10.2f} {p.memory_per_gpu / 1e9:7.1f}")
    return lines


def _terms_text(terms: dict[str, float]) -> str:
    return " | ".join(f"{name.replace('_', ' ')} {value * 1e3:.3f}" for name, value in terms.items()
                      if abs(value) >= 5e-7)


def plan_text(plan: Plan, args: argparse.Namespace) -> list[str]:
    from vllm_helix.planner.cost import memory_budget
    from vllm_helix.planner.disagg import split_commands
    from vllm_helix.planner.sensitivity import sensitivity_text
    from vllm_helix.planner.search import MAX_INSTANCE_GPUS
    from vllm_helix.planner.energy import energy_of
    from vllm_helix.planner.formats import formats_text

    best, work = plan.best, plan.result.workload
    budget = plan.ttl_budget
    lines = [
        f"vllm-helix plan: {plan.model.describe()}",
        f"  on {plan.hardware.describe()}",
        f"  context {work.context:,} tokens; {work.precision.describe()}; layouts on "
        f"1..{min(plan.gpus, MAX_INSTANCE_GPUS)} GPUs"
        + (f" (the largest instance priced; replicas fill {plan.gpus})" if plan.gpus > MAX_INSTANCE_GPUS else "")
        + "; "
        f"TTL budget " + (f"{budget * 1e3:g} ms" if budget else "none (fastest layout)"),
        f"  priced {len(plan.result.costs)} layouts x {len(plan.result.batches)} batch sizes = "
        f"{plan.result.num_points:,} points in {plan.seconds:.2f} s"
        + (f" ({plan.total_seconds:.2f} s with the latency re-pricing below)" if plan.sensitivity else ""),
        *(f"  warning: {warning}" for warning in plan.warnings),
        "",
    ]
    order = sorted(plan.per_family.values(),
                   key=lambda p: (-p.tokens_per_s_per_gpu, p.ttl) if budget else (p.ttl, -p.tokens_per_s_per_gpu))
    criterion = "highest tokens/s/GPU within the budget" if budget else "lowest TTL"
    lines += _table(order, f"Best point per strategy ({criterion}; KVP (Medha) is a baseline only):") + [""]
    lines += _table(plan.ranked[: args.top], f"Top {min(args.top, len(plan.ranked))} servable layouts:") + [""]
    hopb = f", hopb={best.micro_batches}" if best.layout.hopb else ""
    lines += [
        f"Recommended: {best.layout.family} {best.layout.describe()}{hopb} on {best.layout.gpus} GPUs "
        f"({plan.gpus // best.layout.gpus} replica(s) in {plan.gpus}"
        + (f", {plan.gpus % best.layout.gpus} idle" if plan.gpus % best.layout.gpus else "") + f"), batch {best.batch}",
        f"  TTL {best.ttl * 1e3:.3f} ms = {best.tokens_per_s_per_user:.1f} tokens/s/user; "
        f"{best.tokens_per_s_per_gpu:.2f} tokens/s/GPU; "
        f"{energy_of(best, plan.hardware).tokens_per_joule:.4f} tokens/J at TDP",
        f"  per token (ms): {_terms_text(best.terms)}",
        f"  memory per GPU: {best.memory_per_gpu / 1e9:.1f} of the {memory_budget(plan.hardware, work) / 1e9:.1f} GB "
        f"vLLM may use ({work.memory_utilization:g} of {plan.hardware.memory_capacity / 1e9:.0f} GB; weights, KV, "
        f"activation workspace and a {plan.hardware.runtime_reserve / 1e9:g} GB runtime reserve)",
        f"  {formats_text(plan.model, work.precision, plan.hardware.platform)}",
        *_serve_lines(best, plan.model_ref),
    ]
    if plan.sensitivity:
        lines += ["", *sensitivity_text(list(plan.sensitivity), plan.hardware.scale_up.latency)]
    d = plan.disaggregation
    if d is not None:
        colocated = (f"{d.aggregated.layout.family} {d.aggregated.layout.describe()} at batch {d.aggregated.batch} "
                     f"-> {d.aggregated_gpus:.1f} GPUs" if d.aggregated else "cannot meet the TTL budget")
        lines += [
            "",
            f"Disaggregated serving of ISL {d.mix.input_len} / OSL {d.mix.output_len} at {d.mix.rate:g} req/s "
            f"(decode context {d.mix.decode_context}):",
            f"  prefill: TP={d.prefill.gpus}, {d.prefill.seconds * 1e3:.1f} ms per prompt -> {d.prefill_gpus:.1f} GPUs",
            f"  decode: {d.decode.layout.family} {d.decode.layout.describe()} at batch {d.decode.batch} -> "
            f"{d.decode_gpus:.1f} GPUs; prefill:decode = {d.prefill_to_decode:.3f}",
            f"  co-located: {colocated}",
            f"  disaggregation {'pays' if d.pays else 'does not pay'}: co-located needs {d.gain:.2f}x the GPUs",
            *(f"  {side}: {command or 'no vLLM mode serves this layout'}"
              for side, command in zip(("prefill server", "decode server", "router"),
                                       split_commands(d, plan.model_ref).values())),
        ]
    if args.plot:
        lines += ["", f"plot: {args.plot}"]
    return lines
