"""How a plan's headline moves with the one constant no datasheet gives: the scale-up message latency.

Most of Helix's advantage at small batches is decided by per-message latency (one
all-to-all and two all-reduces per layer), which NVIDIA does not publish; the
profiles assume 1 us. Every plan therefore re-prices the same search at half and
five times the profile's latency and reports Helix's best point against the best
servable baseline's (TP, TP x PP, DP attention + EP) at each: tokens/s/GPU within
the latency budget, or, with no budget, the lowest TTL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from vllm_helix.planner.hardware_spec import HardwareSpec, Link
from vllm_helix.planner.recommend import PlanPoint, best_points, serve_refusal
from vllm_helix.planner.search import SearchResult

LATENCY_FACTORS = (0.5, 1.0, 5.0)
SERVABLE_BASELINES = ("tp", "tp_pp", "dp_ep")


@dataclass(frozen=True)
class LatencyPoint:
    """Helix's and the best servable baseline's best points at one scale-up latency."""

    latency_s: float
    helix: PlanPoint | None
    baseline: PlanPoint | None
    ttl_budget: float | None

    @property
    def ratio(self) -> float | None:
        """Helix over the baseline: tokens/s/GPU within the budget, or baseline TTL over Helix TTL."""
        if self.helix is None or self.baseline is None:
            return None
        if self.ttl_budget is None:
            return self.baseline.ttl / self.helix.ttl
        return self.helix.tokens_per_s_per_gpu / self.baseline.tokens_per_s_per_gpu

    def as_dict(self, model_ref: str) -> dict[str, Any]:
        return {"latency_us": self.latency_s * 1e6, "ratio": self.ratio,
                "helix": None if self.helix is None else self.helix.as_dict(model_ref),
                "baseline": None if self.baseline is None else self.baseline.as_dict(model_ref)}


def latency_sensitivity(base: SearchResult, price: Callable[[HardwareSpec], SearchResult],
                        ttl_budget: float | None) -> list[LatencyPoint]:
    """``base`` re-priced (``price``) with the scale-up latency at :data:`LATENCY_FACTORS` times its profile's."""
    hardware = base.hardware
    points = []
    for factor in LATENCY_FACTORS:
        latency = hardware.scale_up.latency * factor
        result = base if factor == 1.0 else price(replace(hardware, scale_up=Link(hardware.scale_up.bandwidth,
                                                                                   latency)))
        ranked = best_points(result, ttl_budget)
        helix = next((p for p in ranked if p.layout.strategy == "helix" and serve_refusal(p, result) is None), None)
        baseline = next((p for p in ranked if p.layout.strategy in SERVABLE_BASELINES), None)
        points.append(LatencyPoint(latency, helix, baseline, ttl_budget))
    return points


def sensitivity_text(points: list[LatencyPoint], assumed_latency: float) -> list[str]:
    """The plan's section on the latency, one line per latency."""
    lines = [f"Helix against the best servable baseline as the scale-up message latency varies "
             f"(the profile assumes {assumed_latency * 1e6:g} us):"]
    for p in points:
        if p.helix is None or p.baseline is None:
            missing = "no servable Helix layout" if p.helix is None else "no servable baseline"
            lines.append(f"  {p.latency_s * 1e6:g} us: {missing} meets the budget")
            continue
        unit = "tok/s/GPU" if p.ttl_budget is not None else "ms TTL"

        def value(point: PlanPoint) -> str:
            return (f"{point.tokens_per_s_per_gpu:.2f}" if p.ttl_budget is not None else f"{point.ttl * 1e3:.3f}")
        lines.append(f"  {p.latency_s * 1e6:g} us: Helix {p.helix.layout.describe()} {value(p.helix)} {unit} vs "
                     f"{p.baseline.layout.family} {p.baseline.layout.describe()} {value(p.baseline)}: "
                     f"{p.ratio:.2f}x")
    return lines
