"""Calibrated profiles: parsing, how the cost model charges them, and fitting them back from measurements."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from vllm_helix.planner.calibration import Calibration, EngineCosts, attention_of, engine_of
from vllm_helix.planner.cost import Workload, step_cost
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.fit import (SERVED_LAYOUTS, EnginePoint, fit_engine_costs, non_negative_least_squares,
                                   predicted_step)
from vllm_helix.planner.hardware_spec import hardware_from_dict, load_hardware
from vllm_helix.planner.strategies import Layout
from vllm_helix.planner.loads import kv_cache_bytes
from vllm_helix.planner.model_spec import load_model
from vllm_helix.planner.precision import Precision

BASE = {"name": "cpu", "memory": {"capacity_gb": 25, "bandwidth_gb_s": 14}, "compute_tflops": {"fp32": 0.08},
        "scale_up": {"bandwidth_gb_s": 5, "latency_us": 4, "gpus_per_domain": 2}, "power": {"tdp_w": 9}}
COSTS = {"step_ms": 2.0, "layer_ms": 0.5, "sequence_ms": 0.1, "sequence_layer_ms": 0.05, "kv_read_gb_s": 4.0}


def _calibrated(**engines: dict) -> dict:
    return {**BASE, "calibration": {"source": "test", "gqa": engines or {"vllm": COSTS, "helix": COSTS}}}


def test_strategies_map_to_the_engine_that_serves_them() -> None:
    assert engine_of("helix") == "helix"
    assert {engine_of(s) for s in ("tp", "tp_pp", "dp_ep", "kvp")} == {"vllm"}
    assert (attention_of("mla"), attention_of("gqa")) == ("mla", "gqa")


def test_a_calibration_section_reads_in_si_units() -> None:
    hw = hardware_from_dict(_calibrated(), "cpu")
    costs = hw.calibration.engine_costs("gqa", "tp", hw.name)
    assert costs == EngineCosts(2e-3, 5e-4, 1e-4, 5e-5, 4e9)
    assert costs.to_yaml() == COSTS
    assert costs.fixed(2, 3) == pytest.approx(2e-3 + 2 * 5e-4 + 3 * (1e-4 + 2 * 5e-5))
    assert "calibrated" in hw.describe() and load_hardware("h100-sxm").calibration is None


@pytest.mark.parametrize("section, message", [
    ({"gqa": {"vllm": {**COSTS, "kv_read_gb_s": 0}}}, "kv_read_gb_s must be a positive number"),
    ({"gqa": {"vllm": {"step_ms": 1}}}, "must hold exactly"),
    ({"gqa": {"vllm": {**COSTS, "layer_ms": "fast"}}}, "layer_ms must be a number"),
    ({"gqa": {"sglang": COSTS}}, "takes engines vllm, helix"),
    ({"mha": {"vllm": COSTS}}, "unknown key(s) ['mha']"),
    ({"source": "x"}, "holds no engine costs"),
])
def test_bad_calibration_sections_are_refused_by_name(section: dict, message: str) -> None:
    with pytest.raises(PlannerError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        hardware_from_dict({**BASE, "calibration": section}, "cpu")


def test_an_unmeasured_attention_kind_is_refused_not_guessed() -> None:
    hw = hardware_from_dict(_calibrated(), "cpu")
    with pytest.raises(PlannerError, match="calibrated for gqa/vllm, gqa/helix but not mla/vllm"):
        step_cost(load_model("tiny-deepseek-v3"), hw, Layout("tp", tpa=2, tpf=2), Workload(4096, Precision.uniform("fp32")), [1])


def test_calibrated_attention_reads_kv_at_the_measured_rate_and_pays_the_fixed_costs() -> None:
    model, layout = load_model("tiny-llama-kv1"), SERVED_LAYOUTS["Helix kvp=2"]
    plain = hardware_from_dict(BASE, "cpu")
    hw = hardware_from_dict(_calibrated(), "cpu")
    work, batch = Workload(65536, Precision.uniform("fp32")), np.array([1.0, 8.0])
    calibrated, roofline = step_cost(model, hw, layout, work, batch), step_cost(model, plain, layout, work, batch)
    kv = model.num_layers * kv_cache_bytes(model, layout.tpa, layout.kvp, batch, 65536, work.precision)
    assert np.allclose(calibrated.terms["kv_cache"], kv / 4e9)
    assert np.allclose(calibrated.terms["fixed"], [hw.calibration.costs["gqa"]["helix"].fixed(2, b) for b in batch])
    assert np.all(roofline.terms["fixed"] == 0)
    for term in ("weights", "all_reduce", "attention_exchange"):  # everything else keeps its roofline
        assert np.array_equal(calibrated.terms[term], roofline.terms[term]), term


@pytest.mark.parametrize("model_name, config", [("tiny-llama-kv1", "TP=2"), ("tiny-llama-kv1", "Helix kvp=2"),
                                                ("tiny-deepseek-v3", "TP=2"), ("tiny-deepseek-v3", "Helix kvp=2")])
def test_the_fit_recovers_the_constants_that_made_the_points(model_name: str, config: str) -> None:
    truth = EngineCosts(3e-3, 7e-4, 2e-4, 4e-5, 5.5e9)
    kind = "mla" if "deepseek" in model_name else "gqa"
    engine = engine_of(SERVED_LAYOUTS[config].strategy)
    hw = hardware_from_dict(BASE, "cpu")
    true_hw = replace(hw, calibration=Calibration({kind: {engine: truth}}))
    shapes = [(2, 4096, 1), (2, 4096, 8), (4, 4096, 1), (4, 4096, 8), (2, 131072, 1)]
    points = []
    for layers, context, batch in shapes:
        point = EnginePoint(replace(load_model(model_name), num_layers=layers), SERVED_LAYOUTS[config], context, batch, 0.0)
        points.append(replace(point, tpot=float(predicted_step(point, true_hw).ttl[0])))
    fitted = fit_engine_costs(hw, points)
    for got, want in zip((fitted.step, fitted.layer, fitted.sequence, fitted.sequence_layer, fitted.kv_read_rate),
                         (truth.step, truth.layer, truth.sequence, truth.sequence_layer, truth.kv_read_rate)):
        assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_non_negative_least_squares_meets_the_optimality_conditions(seed: int) -> None:
    """KKT on random problems (fresh seeds, some with a non-negative exact solution, some without): every free
    unknown has zero gradient, every unknown held at zero a non-negative one, and no random feasible point
    does better."""
    rng = np.random.default_rng(seed)
    matrix = rng.uniform(0.1, 2.0, (rng.integers(5, 9), 5))
    targets = matrix @ rng.normal(0.5, 1.0, 5) + rng.normal(0, 0.1, matrix.shape[0])
    x = non_negative_least_squares(matrix, targets)
    gradient = matrix.T @ (matrix @ x - targets)
    scale = np.abs(matrix.T @ targets).max()
    assert np.all(x >= 0)
    assert np.all(np.abs(gradient[x > 0]) <= 1e-9 * scale) and np.all(gradient[x == 0] >= -1e-9 * scale)
    residual = np.sum((matrix @ x - targets) ** 2)
    for _ in range(200):
        other = np.clip(x + rng.normal(0, 0.05, 5), 0, None)
        assert residual <= np.sum((matrix @ other - targets) ** 2) + 1e-12
    unconstrained, *_ = np.linalg.lstsq(matrix, targets, rcond=None)
    if np.all(unconstrained >= 0):
        assert np.allclose(x, unconstrained)


def test_noisy_points_never_fit_a_negative_cost() -> None:
    """Five points whose exact solution has a negative per-sequence-per-layer cost (the 4-layer batch-8 point
    measured 10% fast; an unconstrained fit gives -0.14 ms): the fit keeps every constant >= 0, holds exactly
    that one at zero, and still reads the KV at a finite rate."""
    truth = EngineCosts(3e-3, 7e-4, 2e-4, 1e-5, 5.5e9)
    hw = hardware_from_dict(BASE, "cpu")
    true_hw = replace(hw, calibration=Calibration({"gqa": {"vllm": truth}}))
    points = []
    for layers, context, batch in [(2, 4096, 1), (2, 4096, 8), (4, 4096, 1), (4, 4096, 8), (2, 131072, 1)]:
        point = EnginePoint(replace(load_model("tiny-llama-kv1"), num_layers=layers), SERVED_LAYOUTS["TP=2"],
                            context, batch, 0.0)
        tpot = float(predicted_step(point, true_hw).ttl[0]) * (0.9 if (layers, batch) == (4, 8) else 1.0)
        points.append(replace(point, tpot=tpot))
    fitted = fit_engine_costs(hw, points)
    assert min(fitted.step, fitted.layer, fitted.sequence, fitted.sequence_layer) >= 0
    assert fitted.sequence_layer == 0.0
    assert 0 < fitted.kv_read_rate < float("inf")


def test_the_fit_refuses_points_that_cannot_separate_its_constants() -> None:
    hw = hardware_from_dict(BASE, "cpu")
    model = load_model("tiny-llama-kv1")
    points = [EnginePoint(model, SERVED_LAYOUTS["TP=2"], 4096, b, 0.01) for b in (1, 8)]
    with pytest.raises(PlannerError, match="two contexts, two batch sizes and two depths"):
        fit_engine_costs(hw, points)
    mixed = [EnginePoint(model, layout, 4096, 1, 0.01) for layout in SERVED_LAYOUTS.values()]
    with pytest.raises(PlannerError, match="one attention kind and one engine"):
        fit_engine_costs(hw, mixed)
