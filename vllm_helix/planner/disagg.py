"""Disaggregated serving: the prefill:decode GPU ratio that matches rates, and whether it pays.

For a traffic mix (input length ISL, output length OSL, request rate R) and a TTL
budget:

* decode pool: the best decode layout under the budget for sequences of average
  context ``ISL + OSL/2`` gives tokens/s/GPU, so it needs ``R * OSL / (tokens/s/GPU)``
  GPUs;
* prefill pool: a tensor-parallel prefill instance of ``n`` GPUs processes one
  prompt in ``t`` seconds (roofline of its FLOPs against reading the weights once,
  plus two all-reduces of ``ISL x hidden`` per layer), so it needs ``R * n * t``
  GPUs; ``n`` is the fitting TP width with the fewest GPU-seconds per prompt;
* co-located (aggregated) serving: the same decode layouts, but each step also
  prefills ``ISL/OSL`` prompt tokens per decoded token (chunked prefill in steady
  state), which lengthens every step; it needs ``R * OSL / (tokens/s/GPU)`` GPUs at
  its own best point under the same budget.

Disaggregation pays when its two pools together need fewer GPUs. In this fluid
model every GPU count scales with R, so the ratio and the verdict do not depend
on the rate; the rate turns them into GPU counts. KV transfer between the pools
and time to first token are not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vllm_helix.kv_store import kv_transfer_config
from vllm_helix.planner import loads
from vllm_helix.planner.collectives import all_reduce_time, place_group
from vllm_helix.planner.cost import DEFAULT_MEMORY_UTILIZATION, Workload, memory_budget, memory_per_gpu
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.hardware_spec import HardwareSpec
from vllm_helix.planner.strategies import STRATEGIES, Layout, attention_tp_valid
from vllm_helix.planner.model_spec import ModelSpec
from vllm_helix.planner.precision import Precision
from vllm_helix.planner.recommend import PlanPoint, recommend
from vllm_helix.planner.search import search


@dataclass(frozen=True)
class TrafficMix:
    """Requests of ``input_len`` prompt tokens and ``output_len`` generated tokens at ``rate`` per second."""

    input_len: int
    output_len: int
    rate: float

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1 or self.rate <= 0:
            raise PlannerError(f"traffic needs --isl >= 1, --osl >= 1 and --rate > 0, got "
                               f"{self.input_len}/{self.output_len} at {self.rate}/s")

    @property
    def decode_context(self) -> int:
        """Average KV length while decoding: the prompt plus half the output."""
        return self.input_len + self.output_len // 2


@dataclass(frozen=True)
class PrefillCost:
    """One prompt on a ``gpus``-wide tensor-parallel prefill instance."""

    gpus: int
    seconds: float

    @property
    def gpu_seconds(self) -> float:
        return self.gpus * self.seconds


def prefill_cost(model: ModelSpec, hardware: HardwareSpec, precision: Precision, prompt_length: int,
                 memory_utilization: float = DEFAULT_MEMORY_UTILIZATION) -> PrefillCost:
    """The cheapest fitting TP width for one prompt (GPU-seconds per prompt); memory is the decode
    check itself (:func:`~vllm_helix.planner.cost.memory_per_gpu` of a TP layout holding the prompt's KV)."""
    flops = (2.0 * (model.active_params_per_token - model.lm_head_params) * prompt_length
             + 2.0 * model.lm_head_params
             + model.num_layers * float(loads.prompt_attention_flops(model, prompt_length, prompt_length)))
    weight_bytes = model.total_params * precision.weight_bytes
    work = Workload(prompt_length, precision, memory_utilization=memory_utilization)
    best: PrefillCost | None = None
    for gpus in range(1, hardware.gpus_per_domain + 1):
        if not attention_tp_valid(model, gpus):
            continue
        needed = memory_per_gpu(model, Layout("tp", tpa=gpus, tpf=gpus), work, np.array([1.0]), hardware)[0]
        if needed > memory_budget(hardware, work):
            continue
        compute = max(flops / (gpus * hardware.flop_rate(precision.compute)),
                      weight_bytes / (gpus * hardware.memory_bandwidth))
        reduce = 2 * model.num_layers * float(all_reduce_time(
            loads.hidden_bytes(model, prompt_length, precision), place_group(gpus, 1, hardware.gpus_per_domain),
            hardware))
        candidate = PrefillCost(gpus, compute + reduce)
        if best is None or candidate.gpu_seconds < best.gpu_seconds:
            best = candidate
    if best is None:
        raise PlannerError(f"{model.name} does not fit on one {hardware.name} domain for prefill of "
                           f"{prompt_length} tokens; use a smaller --weight-dtype or larger GPUs")
    return best


@dataclass(frozen=True)
class DisaggregationPlan:
    """GPU counts of disaggregated and co-located serving of one traffic mix."""

    mix: TrafficMix
    ttl_budget: float
    prefill: PrefillCost
    decode: PlanPoint
    aggregated: PlanPoint | None  # None: co-located serving cannot meet the budget at all

    @property
    def prefill_gpus(self) -> float:
        return self.mix.rate * self.prefill.gpu_seconds

    @property
    def decode_gpus(self) -> float:
        return self.mix.rate * self.mix.output_len / self.decode.tokens_per_s_per_gpu

    @property
    def prefill_to_decode(self) -> float:
        return self.prefill_gpus / self.decode_gpus

    @property
    def aggregated_gpus(self) -> float:
        if self.aggregated is None:
            return float("inf")
        return self.mix.rate * self.mix.output_len / self.aggregated.tokens_per_s_per_gpu

    @property
    def gain(self) -> float:
        """GPUs co-located serving needs over GPUs disaggregated serving needs (> 1: it pays)."""
        return self.aggregated_gpus / (self.prefill_gpus + self.decode_gpus)

    @property
    def pays(self) -> bool:
        return self.gain > 1.0


def plan_disaggregation(model: ModelSpec, hardware: HardwareSpec, precision: Precision, mix: TrafficMix,
                        ttl_budget: float, max_gpus: int, strategies: tuple[str, ...] = STRATEGIES,
                        batches: np.ndarray | None = None,
                        memory_utilization: float = DEFAULT_MEMORY_UTILIZATION) -> DisaggregationPlan:
    """Size both pools for ``mix`` under ``ttl_budget`` and compare with co-located serving."""
    decode_work = Workload(mix.decode_context, precision, memory_utilization=memory_utilization)
    decode, _ = recommend(search(model, hardware, decode_work, max_gpus, batches, strategies), ttl_budget)
    mixed_work = Workload(mix.decode_context, precision, mix.input_len / mix.output_len, mix.input_len,
                          memory_utilization)
    try:
        aggregated: PlanPoint | None = recommend(
            search(model, hardware, mixed_work, max_gpus, batches, strategies), ttl_budget)[0]
    except PlannerError:
        aggregated = None
    return DisaggregationPlan(mix, ttl_budget,
                              prefill_cost(model, hardware, precision, mix.input_len, memory_utilization),
                              decode, aggregated)


def split_commands(plan: DisaggregationPlan, model_ref: str) -> dict[str, str | None]:
    """The prefill, decode and router commands of ``plan``: the two servers joined by the plugin's KV
    connector (decode ``None`` where no vLLM mode serves its layout), and the vLLM project's router
    in front, one ``--prefill``/``--decode`` URL per server instance.

    The connector's transport is local files (one host or a shared file system); across
    GPU nodes vLLM's NIXL connector is the transport where vLLM allows it under Helix
    (MLA, tpa=1, stripe = block size), which this sizing does not choose.
    """
    prefill = Layout("tp", tpa=plan.prefill.gpus, tpf=plan.prefill.gpus).serve_command(model_ref)
    decode = plan.decode.command(model_ref)
    prefills = max(1, math.ceil(plan.prefill_gpus / plan.prefill.gpus - 1e-9))
    decodes = max(1, math.ceil(plan.decode_gpus / plan.decode.layout.gpus - 1e-9))
    router = ("vllm-router --vllm-pd-disaggregation "
              + " ".join(f"--prefill http://PREFILL_{i}:8000" for i in range(1, prefills + 1)) + " "
              + " ".join(f"--decode http://DECODE_{i}:8000" for i in range(1, decodes + 1)))
    return {"prefill": f"{prefill} --kv-transfer-config '{kv_transfer_config('kv_producer')}'",
            "decode": None if decode is None else f"{decode} --kv-transfer-config '{kv_transfer_config('kv_consumer')}'",
            "router": router}
