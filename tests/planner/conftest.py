"""A toy model and toy GPU with round numbers, so expected costs can be worked out by hand."""

from __future__ import annotations

from typing import Callable

import pytest

from vllm_helix.planner.hardware_spec import HardwareSpec, hardware_from_dict
from vllm_helix.planner.model_spec import ModelSpec

# Per layer: q 1,048,576 + k/v 2,097,152 + o 1,048,576 = 4,194,304 attention weights;
# FFN 3 * 1024 * 4096 = 12,582,912; LM head 1000 * 1024 = 1,024,000; KV 2 * 8 * 128 = 2048 elements/token.
TOY_MODEL_FIELDS = dict(name="toy", num_layers=1, hidden_size=1024, vocab_size=1000, num_q_heads=8,
                        num_kv_heads=8, head_dim=128, intermediate_size=4096, dtype="bf16", source="org/toy")


def toy_hardware(**overrides: object) -> HardwareSpec:
    """1 TB/s HBM, 1 EFLOP/s (never the bottleneck), 100 GB/s links with 1 us latency, 8 per domain."""
    data = {
        "memory": {"capacity_gb": 80, "bandwidth_gb_s": 1000},
        "compute_tflops": {"bf16": 1e6},
        "scale_up": {"bandwidth_gb_s": 100, "latency_us": 1.0, "gpus_per_domain": 8},
        "scale_out": {"bandwidth_gb_s": 10, "latency_us": 5.0},
        "power": {"tdp_w": 500},
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value}  # type: ignore[dict-item]
    return hardware_from_dict(data, "toy-gpu")


def toy_model_with(**overrides: object) -> ModelSpec:
    return ModelSpec(**{**TOY_MODEL_FIELDS, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def toy_model() -> ModelSpec:
    return toy_model_with()


@pytest.fixture
def toy_gpu() -> HardwareSpec:
    return toy_hardware()


@pytest.fixture
def make_toy_model() -> Callable[..., ModelSpec]:
    """The toy model with some fields changed."""
    return toy_model_with


@pytest.fixture
def make_toy_gpu() -> Callable[..., HardwareSpec]:
    """The toy GPU with some sections changed, e.g. ``memory={"capacity_gb": 0.04}``."""
    return toy_hardware
