"""Fitting a profile's engine costs to measured decode steps, and pricing a measured point.

``benchmarks/measure_hardware.py`` times vLLM engine steps and calls
:func:`fit_engine_costs`; ``benchmarks/planner_validation.py`` calls
:func:`predicted_step` on held-out points. Both price through
:func:`vllm_helix.planner.cost.step_cost`, the code ``vllm-helix plan`` runs, so the
fitted constants are exactly the residual the cost model's own terms leave.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from vllm_helix.planner.calibration import Calibration, EngineCosts, attention_of, engine_of
from vllm_helix.planner.cost import StepCost, Workload, step_cost
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.hardware_spec import HardwareSpec
from vllm_helix.planner.strategies import Layout
from vllm_helix.planner.model_spec import ModelSpec
from vllm_helix.planner.precision import Precision

# The two layouts the CPU benchmarks serve on two workers, as the planner spells them.
SERVED_LAYOUTS: dict[str, Layout] = {
    "TP=2": Layout("tp", tpa=2, tpf=2),
    "Helix kvp=2": Layout("helix", kvp=2, tpa=1, tpf=2),
}
_UNIT_RATE = 1e12  # bytes/s: a placeholder rate under which the KV term is the KV bytes / 1e12


@dataclass(frozen=True)
class EnginePoint:
    """One measured decode step: a model (at its layer count) in a layout, and its TPOT in seconds."""

    model: ModelSpec
    layout: Layout
    context: int
    batch: int
    tpot: float
    dtype: str = "fp32"


def predicted_step(point: EnginePoint, hw: HardwareSpec) -> StepCost:
    """What the cost model charges for ``point``'s step on ``hw`` (one batch size)."""
    return step_cost(point.model, hw, point.layout, Workload(point.context, Precision.uniform(point.dtype)),
                     [point.batch])


def _with_unit_costs(hw: HardwareSpec, point: EnginePoint) -> HardwareSpec:
    kind, engine = attention_of(point.model.attention), engine_of(point.layout.strategy)
    return replace(hw, calibration=Calibration({kind: {engine: EngineCosts(0.0, 0.0, 0.0, 0.0, _UNIT_RATE)}}))


def non_negative_least_squares(matrix: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``argmin |matrix @ x - targets|`` over ``x >= 0``, exactly, by trying every set of free unknowns.

    The fit has five unknowns, so the 32 active sets cost nothing and need no solver
    (the project does not depend on scipy). The optimum is the least-squares solution
    on some set of free unknowns with the others at zero; the best feasible one wins.
    """
    unknowns = matrix.shape[1]
    best, best_residual = np.zeros(unknowns), float(np.sum(targets**2))
    for size in range(1, unknowns + 1):
        for free in itertools.combinations(range(unknowns), size):
            solution, *_ = np.linalg.lstsq(matrix[:, list(free)], targets, rcond=None)
            if np.any(solution < 0):
                continue
            candidate = np.zeros(unknowns)
            candidate[list(free)] = solution
            residual = float(np.sum((matrix @ candidate - targets) ** 2))
            if residual < best_residual * (1 - 1e-12):
                best, best_residual = candidate, residual
    return best


def fit_engine_costs(hw: HardwareSpec, points: list[EnginePoint]) -> EngineCosts:
    """The five constants of one (attention, engine) that make the cost model reproduce ``points``.

    Each point's TPOT is the cost model's own terms (weights, FFN, collectives) plus
    ``KV bytes / rate + step + L * layer + B * (sequence + L * sequence_layer)``, linear
    in ``1/rate`` and the four fixed costs; least squares with every constant >= 0
    (exact with five points on two depths, two batch sizes and two contexts when the
    exact solution is non-negative). Non-negative because each is a time: an exact
    fit to noisy points can come out with, say, a negative cost per sequence and
    layer, which the two-layer twins barely feel but which makes each added sequence
    of a 32-layer model cheaper than none. Raises when the points cannot separate the
    constants or the fit reads the KV at no finite rate.
    """
    if len({(attention_of(p.model.attention), engine_of(p.layout.strategy)) for p in points}) != 1:
        raise PlannerError("fit_engine_costs: all points must share one attention kind and one engine")
    rows, targets = [], []
    for point in points:
        unit = predicted_step(point, _with_unit_costs(hw, point))
        kv_bytes = float(unit.terms["kv_cache"][0]) * _UNIT_RATE
        modelled = float(unit.ttl[0] - unit.terms["kv_cache"][0])
        layers, batch = point.model.num_layers, point.batch
        rows.append([kv_bytes, 1.0, layers, batch, batch * layers])
        targets.append(point.tpot - modelled)
    matrix = np.array(rows)
    if np.linalg.matrix_rank(matrix) < matrix.shape[1]:
        raise PlannerError("fit_engine_costs: the points need two contexts, two batch sizes and two depths "
                           "to separate the KV read rate from the fixed costs")
    inverse_rate, step, layer, sequence, sequence_layer = non_negative_least_squares(matrix, np.array(targets))
    if inverse_rate <= 0:
        raise PlannerError("fit_engine_costs: the measured points give no finite KV read rate "
                           "(too noisy, or no long-context point); re-measure")
    return EngineCosts(float(step), float(layer), float(sequence), float(sequence_layer), 1.0 / float(inverse_rate))
