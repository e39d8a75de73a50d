"""The latency section of a plan: ratios by hand, and what it says when one side meets no budget."""

from __future__ import annotations

import pytest

from vllm_helix.planner.strategies import Layout
from vllm_helix.planner.recommend import PlanPoint
from vllm_helix.planner.sensitivity import LatencyPoint, sensitivity_text


def _point(strategy: str, ttl: float, tokens_per_s_per_gpu: float) -> PlanPoint:
    layout = Layout(strategy, tpa=2, kvp=2, tpf=4) if strategy == "helix" else Layout(strategy, tpa=4, tpf=4)
    return PlanPoint(layout, batch=8, ttl=ttl, tokens_per_s_per_gpu=tokens_per_s_per_gpu, memory_per_gpu=1e9,
                     micro_batches=1, terms={})


def test_ratio_is_throughput_within_a_budget_and_ttl_without() -> None:
    helix, tp = _point("helix", 0.004, 300.0), _point("tp", 0.006, 200.0)
    assert LatencyPoint(1e-6, helix, tp, ttl_budget=0.01).ratio == pytest.approx(1.5)
    assert LatencyPoint(1e-6, helix, tp, ttl_budget=None).ratio == pytest.approx(1.5)  # 6 ms / 4 ms
    assert LatencyPoint(1e-6, None, tp, ttl_budget=0.01).ratio is None


def test_text_names_the_side_that_meets_no_budget() -> None:
    helix, tp = _point("helix", 0.004, 300.0), _point("tp", 0.006, 200.0)
    lines = sensitivity_text([LatencyPoint(0.5e-6, helix, tp, 0.01), LatencyPoint(5e-6, helix, None, 0.01)], 1e-6)
    assert lines[0].endswith("(the profile assumes 1 us):")
    assert lines[1] == ("  0.5 us: Helix kvp=2,tpa=2; tpf=4,ep=1 300.00 tok/s/GPU vs TP tp=4; tpf=4,ep=1 200.00: "
                        "1.50x")
    assert lines[2] == "  5 us: no servable baseline meets the budget"
