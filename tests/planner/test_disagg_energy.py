"""Disaggregated serving sizing and the energy model."""

from __future__ import annotations

import pytest

from vllm_helix.planner.cost import Workload
from vllm_helix.planner.disagg import PrefillCost, TrafficMix, plan_disaggregation, prefill_cost
from vllm_helix.planner.energy import energy_of
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.hardware_spec import load_hardware
from vllm_helix.planner.model_spec import load_model
from vllm_helix.planner.precision import Precision
from vllm_helix.planner.recommend import recommend
from vllm_helix.planner.search import search


def test_prefill_cost_by_hand(toy_model, make_toy_gpu) -> None:
    gpu = make_toy_gpu(compute_tflops={"bf16": 1.0})  # 1 TFLOP/s: prefill is compute-bound
    # 1000 prompt tokens: 2 x (17,801,216 - 1,024,000) x 1000 (projections, FFN)
    #   + 2 x 1,024,000 (LM head, last token) + 1000 x 500 x 8 heads x 512 (causal attention)
    #   = 35,604,480,000 FLOPs -> 35.60448 ms on one GPU (weights: 37.65 us); two GPUs take
    #   17.80224 ms + 2 one-shot all-reduces of 2,048,000 B (1 us + 20.48 us each) = 35.69 GPU-ms: one is cheaper
    cost = prefill_cost(toy_model, gpu, Precision.uniform("bf16"), 1000)
    assert cost == PrefillCost(1, pytest.approx(35.60448e-3, rel=1e-12))


def test_traffic_mix_validation() -> None:
    with pytest.raises(PlannerError, match="--osl >= 1"):
        TrafficMix(1024, 0, 1.0)
    assert TrafficMix(1000, 500, 2.0).decode_context == 1250


def test_rate_matching_and_when_disaggregation_pays() -> None:
    h200, fp8 = load_hardware("h200"), Precision.uniform("fp8")
    r1 = load_model("deepseek-r1")
    prefill_heavy = plan_disaggregation(r1, h200, fp8, TrafficMix(4096, 256, 10.0), 0.01, 8)
    decode_heavy = plan_disaggregation(r1, h200, fp8, TrafficMix(1024, 32768, 10.0), 0.01, 8)
    # the pools are sized to the same request rate
    assert prefill_heavy.prefill_gpus == pytest.approx(10.0 * prefill_heavy.prefill.gpu_seconds)
    assert prefill_heavy.decode_gpus * prefill_heavy.decode.tokens_per_s_per_gpu == pytest.approx(10.0 * 256)
    assert prefill_heavy.prefill_to_decode > 10 * decode_heavy.prefill_to_decode
    assert prefill_heavy.pays and prefill_heavy.gain > 2 * decode_heavy.gain
    small = plan_disaggregation(load_model("llama-3.1-8b"), h200, fp8, TrafficMix(4096, 256, 10.0), 0.01, 8)
    assert small.gain < prefill_heavy.gain / 2  # little to gain for a small model


def test_tokens_per_joule_is_throughput_over_tdp() -> None:
    h100 = load_hardware("h100-sxm")
    result = search(load_model("llama-3.1-8b"), h100, Workload(8192, Precision.uniform("fp8")), 8)
    best, _ = recommend(result, 0.02)
    energy = energy_of(best, h100)
    assert energy.tokens_per_joule == pytest.approx(best.tokens_per_s_per_gpu / 700.0)
    assert energy.joules_per_token == pytest.approx(700.0 / best.tokens_per_s_per_gpu)
