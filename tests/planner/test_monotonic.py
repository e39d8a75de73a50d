"""Monotonicity: more context never lowers TTL; more GPUs never lower KV capacity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_helix.planner.cost import Workload, max_sequences, step_cost
from vllm_helix.planner.hardware_spec import load_hardware
from vllm_helix.planner.strategies import Layout, layouts_for
from vllm_helix.planner.model_spec import load_model
from vllm_helix.planner.precision import Precision

MODELS = ["tiny-llama", "tiny-deepseek-v3", "deepseek-v3-lite", "llama-3.1-70b", "deepseek-r1"]
BATCHES = np.array([1, 2, 3, 8, 24, 128, 1024])


@pytest.mark.parametrize("name", MODELS)
def test_more_context_never_lowers_ttl(name: str) -> None:
    model, gb200 = load_model(name), load_hardware("gb200-nvl72")
    precision = Precision.uniform("fp8")
    for gpus in (1, 2, 4, 8, 16, 32):
        for layout in layouts_for(model, gpus):
            previous = None
            for context in (1, 1024, 32768, 2**20, 2**22):
                ttl = step_cost(model, gb200, layout, Workload(context, precision), BATCHES).ttl
                if previous is not None:
                    assert np.all(ttl >= previous * (1 - 1e-12)), (layout, context)
                previous = ttl


@pytest.mark.parametrize("name", MODELS)
def test_more_sequences_never_lower_ttl_without_hopb(name: str) -> None:
    model, h200 = load_model(name), load_hardware("h200")
    work = Workload(8192, Precision.uniform("fp8"))
    batches = np.arange(1, 300)
    for gpus in (1, 2, 4, 8):
        for layout in layouts_for(model, gpus):
            if not layout.hopb:
                assert np.all(np.diff(step_cost(model, h200, layout, work, batches).ttl) >= -1e-15), layout


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(MODELS), context=st.integers(1, 2**22), dtype=st.sampled_from(["fp4", "fp8", "bf16"]))
def test_more_gpus_never_lower_kv_capacity(name: str, context: int, dtype: str) -> None:
    model, gb200 = load_model(name), load_hardware("gb200-nvl72")
    work = Workload(context, Precision.uniform(dtype))
    widths = [g for g in (1, 2, 4, 8, 16, 32, 64) if model.num_q_heads % g == 0]
    for family in ("tp", "helix"):
        capacity = []
        for gpus in widths:
            if family == "tp":
                layout = Layout("tp", tpa=gpus, tpf=gpus)
            elif gpus >= 2:
                tpa = 1 if model.is_mla else min(model.num_kv_heads, gpus // 2)
                layout = Layout("helix", tpa=tpa, kvp=gpus // tpa, tpf=gpus)
            else:
                continue
            capacity.append(max_sequences(model, gb200, layout, work))
        assert capacity == sorted(capacity), (family, capacity)
