"""Energy per token of a layout: tokens per joule from power under load.

Method after MLPerf Power (arXiv 2410.12032): energy efficiency is throughput
divided by the average power drawn over the same run, i.e. tokens per joule =
(tokens/s) / W. A model has no measured power, so the average power under load
is taken as the GPU's TDP (its board power limit, which a GPU saturating HBM or
tensor cores runs at or near). What this means, stated once:

* it is GPU power only: host CPUs, NICs, switches and cooling are excluded, which
  MLPerf's wall-power measurement includes;
* TDP bounds board power from above, so tokens/J is a lower bound for the GPUs;
* within one hardware profile tokens/J is proportional to tokens/s/GPU, so
  energy ranks layouts like throughput does; across profiles it adds the power
  dimension (e.g. 1,200 W GB200 against 700 W H100).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_helix.planner.hardware_spec import HardwareSpec
from vllm_helix.planner.recommend import PlanPoint


@dataclass(frozen=True)
class EnergyPoint:
    """A plan point with its energy: tokens per joule and joules per token (all GPUs of the instance)."""

    point: PlanPoint
    watts_per_gpu: float

    @property
    def tokens_per_joule(self) -> float:
        return self.point.tokens_per_s_per_gpu / self.watts_per_gpu

    @property
    def joules_per_token(self) -> float:
        return 1.0 / self.tokens_per_joule


def energy_of(point: PlanPoint, hardware: HardwareSpec) -> EnergyPoint:
    """Tokens per joule of ``point`` with every GPU of its instance at TDP."""
    return EnergyPoint(point, hardware.tdp_watts)
