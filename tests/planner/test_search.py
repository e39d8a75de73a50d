"""Layout enumeration, the search, Pareto frontiers and the recommendation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_helix.config import HelixConfig
from vllm_helix.planner.cost import Workload
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.hardware_spec import load_hardware
from vllm_helix.planner.strategies import (BASELINES, STRATEGY_LABELS, Layout, helix_shape, attention_tp_valid,
                                        layouts_for)
from vllm_helix.planner.model_spec import load_model
from vllm_helix.planner.pareto import compare, frontier_indices
from vllm_helix.planner.precision import Precision
from vllm_helix.planner.recommend import best_points, recommend
from vllm_helix.planner.search import default_batches, search

FP4 = Precision.uniform("mxfp4")
BASELINE_FAMILIES = tuple(STRATEGY_LABELS[s] for s in BASELINES)


@pytest.mark.parametrize("name", ["deepseek-r1", "llama-3.1-405b", "tiny-llama", "tiny-deepseek-v3",
                                  "deepseek-v3-lite"])
def test_every_enumerated_layout_is_valid(name: str) -> None:
    model = load_model(name)
    for gpus in range(1, 73):
        for layout in layouts_for(model, gpus):
            assert layout.gpus == gpus
            if layout.strategy == "helix":
                assert layout.kvp * layout.tpa == layout.tpf * layout.ep == gpus
                HelixConfig(kvp=layout.kvp, tpa=layout.tpa, tpf=layout.tpf, ep=layout.ep).validate(
                    gpus, helix_shape(model))
                assert not model.is_mla or layout.tpa == 1
            else:
                assert attention_tp_valid(model, layout.tpa)


def test_expected_layouts_are_enumerated() -> None:
    r1, llama, tiny = load_model("deepseek-r1"), load_model("llama-3.1-405b"), load_model("tiny-llama")
    assert Layout("helix", kvp=64, tpa=1, tpf=64, ep=1, hopb=True) in layouts_for(r1, 64)
    assert Layout("dp_ep", dpa=64, tpf=1, ep=64) in layouts_for(r1, 64)
    assert Layout("dp_ep", dpa=8, tpa=8, tpf=1, ep=64) in layouts_for(r1, 64)  # DP x TP attention, as vLLM serves
    assert not any(l.strategy == "dp_ep" and l.dpa == 1 for l in layouts_for(r1, 64))  # that is TP + EP
    assert Layout("helix", kvp=8, tpa=8, tpf=64, hopb=True) in layouts_for(llama, 64)
    assert not any(l.strategy == "helix" for l in layouts_for(llama, 72))  # 128 heads do not split 72 ways
    tiny4 = layouts_for(tiny, 4)
    assert Layout("helix", kvp=2, tpa=2, tpf=4) in tiny4
    assert not any(l.strategy == "helix" and l.tpa == 4 for l in tiny4)  # only 2 KV heads
    assert Layout("tp", tpa=4, tpf=4) in tiny4  # TP may replicate KV heads
    assert not any(l.strategy == "dp_ep" for l in tiny4)  # dense model


def test_default_batches() -> None:
    grid = default_batches()
    assert grid[0] == 1 and grid[-1] == 65536 and np.all(np.diff(grid) > 0)
    assert {1, 2, 4, 8, 1024} <= set(grid.tolist())


def test_search_prices_thousands_of_points() -> None:
    result = search(load_model("deepseek-r1"), load_hardware("gb200-nvl72"), Workload(2**20, FP4), 64)
    assert result.num_points > 20_000
    assert set(result.families) == {"Helix", "Helix (no HOP-B)", *BASELINE_FAMILIES}


def test_frontier_by_hand() -> None:
    x = np.array([1.0, 2.0, 3.0, 2.0, 0.5])
    y = np.array([5.0, 4.0, 1.0, 3.0, 5.0])
    assert frontier_indices(x, y).tolist() == [0, 1, 2]  # (2,3) is beaten by (2,4); (0.5,5) by (1,5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 100), st.floats(0.1, 100)), min_size=1, max_size=40))
def test_frontier_keeps_exactly_the_undominated(points: list[tuple[float, float]]) -> None:
    x, y = np.array(points).T
    keep = frontier_indices(x, y)
    for k in keep:  # nothing beats a kept point on both axes
        assert not np.any((x >= x[k]) & (y >= y[k]) & ((x > x[k]) | (y > y[k])))
    for i in set(range(len(x))) - set(keep.tolist()):  # every dropped point is matched by a kept one
        assert np.any((x[keep] >= x[i]) & (y[keep] >= y[i]))
    assert np.all(np.diff(x[keep]) > 0) and np.all(np.diff(y[keep]) < 0)


@pytest.mark.parametrize("name", ["deepseek-r1", "llama-3.1-405b"])
def test_helix_beats_the_best_baseline_at_1m_tokens(name: str) -> None:
    result = search(load_model(name), load_hardware("gb200-nvl72"), Workload(2**20, FP4), 64)
    helix = compare(result, ("Helix",), BASELINE_FAMILIES)
    assert helix.ttl_reduction_at_batch_1 > 1.2
    assert helix.max_interactivity_gain > 1.2
    assert helix.batch_gain_at_equal_ttl > 3 and helix.throughput_gain_at_equal_ttl > 3
    hopb = compare(result, ("Helix",), ("Helix (no HOP-B)",))
    assert hopb.ttl_reduction_at_fixed_batch >= 1.0  # HOP-B never hurts


def test_recommendation_respects_the_budget() -> None:
    result = search(load_model("llama-3.1-70b"), load_hardware("h200"), Workload(32768, Precision.uniform("fp8")), 8)
    best, ranked = recommend(result, 0.02)
    assert best.ttl <= 0.02 and best is ranked[0]
    mask = result.feasible & (result.ttl <= 0.02)
    assert best.tokens_per_s_per_gpu == pytest.approx(result.tokens_per_s_per_gpu[mask].max())
    fastest, _ = recommend(result)
    assert fastest.ttl == pytest.approx(result.ttl[result.feasible].min())
    assert all(p.ttl <= 0.02 for p in best_points(result, 0.02))
    with pytest.raises(PlannerError, match=r"no layout reaches TTL <= 0.01 ms; the fastest is"):
        recommend(result, 1e-5)


def test_context_that_fits_nowhere() -> None:
    with pytest.raises(PlannerError, match="fits on no layout of <= 8 h100-sxm GPUs"):
        search(load_model("llama-3.1-405b"), load_hardware("h100-sxm"), Workload(2**24, Precision.uniform("bf16")), 8)


def test_gpu_budget_errors() -> None:
    model, gpu = load_model("tiny-llama"), load_hardware("h100-sxm")
    with pytest.raises(PlannerError, match="GPU range 1..0 is empty"):
        search(model, gpu, Workload(1024, Precision.uniform("bf16")), 0)
    with pytest.raises(PlannerError, match="unknown strategies"):
        search(model, gpu, Workload(1024, Precision.uniform("bf16")), 2, strategies=("zigzag",))


def test_multi_domain_helix_pays_the_scale_out_link() -> None:
    r1, gb200 = load_model("deepseek-r1"), load_hardware("gb200-nvl72")
    work = Workload(2**20, FP4)
    result = search(r1, gb200, work, 128, batches=np.array([1, 64]), strategies=("helix",), min_gpus=64)
    costs = {(c.layout.gpus, c.layout.tpf): c for c in result.costs if not c.layout.hopb}
    one, two = costs[(64, 64)], costs[(128, 128)]
    assert two.terms["kv_cache"][0] == pytest.approx(one.terms["kv_cache"][0] / 2)
    assert two.terms["attention_exchange"][0] > 5 * one.terms["attention_exchange"][0]  # 5 us scale-out latency
