"""The search: every valid layout on 1..N GPUs, priced at every batch size in one sweep.

An instance of ``n <= N`` GPUs is a candidate as long as the GPU budget holds one
copy; replicas fill the rest, and tokens/s/GPU does not change with the number of
replicas. Instances larger than one scale-up domain are allowed when the hardware
profile has a scale-out network (their collectives then cross it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from vllm_helix.planner.cost import StepCost, Workload, memory_budget, step_cost
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.hardware_spec import HardwareSpec
from vllm_helix.planner.strategies import STRATEGIES, Layout, layouts_for
from vllm_helix.planner.model_spec import ModelSpec, kv_bytes_per_request


# The largest instance priced. The enumeration is linear in the instance sizes it walks (each
# size has its own divisor grids), so ``--gpus 100000`` would take minutes; no vLLM instance
# comes near this size, and replicas of a priced instance fill any larger budget (tokens/s/GPU
# does not change with the number of replicas).
MAX_INSTANCE_GPUS = 1024


def default_batches(max_batch: int = 65536, per_octave: int = 4) -> np.ndarray:
    """Batch sizes spaced ``2^(1/per_octave)`` apart from 1 to ``max_batch`` (distinct integers)."""
    steps = int(round(np.log2(max_batch) * per_octave))
    grid = np.unique(np.round(2.0 ** (np.arange(steps + 1) / per_octave)).astype(int))
    return grid[grid <= max_batch]


@dataclass(frozen=True)
class SearchResult:
    """All priced points: one row per layout, one column per batch size."""

    model: ModelSpec
    hardware: HardwareSpec
    workload: Workload
    batches: np.ndarray
    costs: tuple[StepCost, ...]

    @property
    def layouts(self) -> list[Layout]:
        return [cost.layout for cost in self.costs]

    @cached_property
    def ttl(self) -> np.ndarray:
        return np.stack([cost.ttl for cost in self.costs])

    @cached_property
    def feasible(self) -> np.ndarray:
        return np.stack([cost.feasible for cost in self.costs])

    @cached_property
    def tokens_per_s_per_gpu(self) -> np.ndarray:
        return np.stack([cost.tokens_per_s_per_gpu for cost in self.costs])

    @cached_property
    def families(self) -> np.ndarray:
        return np.array([cost.layout.family for cost in self.costs])

    @property
    def num_points(self) -> int:
        return len(self.costs) * len(self.batches)

    def rows_of(self, families: tuple[str, ...] | list[str]) -> np.ndarray:
        """Boolean mask over layouts belonging to any of ``families``."""
        return np.isin(self.families, list(families))


def search(model: ModelSpec, hardware: HardwareSpec, workload: Workload, max_gpus: int,
           batches: np.ndarray | None = None, strategies: tuple[str, ...] = STRATEGIES,
           min_gpus: int = 1, layouts: list[Layout] | None = None) -> SearchResult:
    """Price every layout of ``strategies`` on ``min_gpus..max_gpus`` GPUs at every batch size.

    Instances stop at :data:`MAX_INSTANCE_GPUS` GPUs whatever ``max_gpus`` is (replicas fill the rest).

    ``layouts`` replaces the enumeration with exactly those layouts (``--helix``).
    Raises :class:`PlannerError` when nothing is feasible, naming what one sequence
    needs, so the user knows whether to add GPUs, shrink the KV format or the context.
    """
    if max_gpus < 1 or min_gpus < 1 or min_gpus > max_gpus:
        raise PlannerError(f"GPU range {min_gpus}..{max_gpus} is empty; give --gpus N with N >= 1")
    if max_gpus > hardware.gpus_per_domain and hardware.scale_out is None:
        hardware.link_between_domains()  # raises with the domain size
    if workload.context < 1:
        raise PlannerError(f"context must be at least 1 token, got {workload.context}")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise PlannerError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    batches = default_batches() if batches is None else np.asarray(sorted(set(int(b) for b in batches)))
    if batches.size == 0 or batches.min() < 1:
        raise PlannerError("batch sizes must be positive integers, e.g. --batch 1,8,64")
    if layouts is None:
        largest = min(max_gpus, MAX_INSTANCE_GPUS)
        layouts = [layout for gpus in range(min_gpus, largest + 1) for layout in layouts_for(model, gpus, strategies)]
    costs = tuple(step_cost(model, hardware, layout, workload, batches) for layout in layouts)
    if not costs:
        raise PlannerError(
            f"no {'/'.join(strategies)} layout of {min_gpus}..{max_gpus} GPUs fits {model.name}'s "
            f"{model.num_q_heads} query heads / {model.num_kv_heads} KV heads; try another --gpus"
        )
    result = SearchResult(model, hardware, workload, batches, costs)
    if not result.feasible.any():
        need = kv_bytes_per_request(model, workload.context, workload.precision.kv_bytes)
        raise PlannerError(
            f"a {workload.context}-token context fits on no layout of <= {max_gpus} {hardware.name} GPUs: "
            f"one sequence needs {need / 1e9:.1f} GB of {workload.precision.kv} KV cache plus "
            f"{model.total_params * workload.precision.weight_bytes / 1e9:.0f} GB of weights against the "
            f"{memory_budget(hardware, workload) / 1e9:.0f} GB vLLM may use per GPU "
            f"(--gpu-memory-utilization {workload.memory_utilization:g} of {hardware.memory_capacity / 1e9:.0f} GB, "
            f"less its activation workspace); add GPUs (--gpus), use a smaller "
            f"--kv-dtype/--weight-dtype, or shorten --context"
        )
    return result
