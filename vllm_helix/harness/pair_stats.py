"""Helix / TP ratios from engine pairs: the statistics every long-context results page and the planner's
validation compute the same way.

An engine *pair* is instance i of TP=2 and instance i of Helix kvp=2, timed back to back
(:func:`vllm_helix.harness.engine_runs.measure_twin`); these shared VMs drift by up to 1.8x within
hours, so a ratio is taken within each pair and the median over pairs reported, never the ratio
of pooled medians.
"""

from __future__ import annotations

import math
import statistics
from typing import Any


def point_at(record: dict[str, Any] | None, context: int, batch: int) -> dict[str, Any] | None:
    """The record's point at (context, batch), or None."""
    if record is None:
        return None
    return next((p for p in record["points"] if p["context"] == context and p["batch"] == batch), None)


def records_of(payload: dict[str, Any], model: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(TP=2's, Helix kvp=2's) record of ``model`` in a sweep payload."""
    by_config = {r["config"]: r for r in payload["records"] if r["model"] == model}
    return by_config.get("TP=2"), by_config.get("Helix kvp=2")


def instance_medians(point: dict[str, Any]) -> dict[int, float]:
    """A timed point's median TPOT in each engine instance that timed it.

    Samples are stored instance by instance; a sweep written before their instances
    were recorded (``sample_instances``, 2026-12-02) held ``instances`` equal runs.
    """
    samples = point.get("samples_ms", [point["tpot_ms"]])
    tags = point.get("sample_instances") or [i * point.get("instances", 1) // len(samples)
                                             for i in range(len(samples))]
    groups: dict[int, list[float]] = {}
    for tag, sample in zip(tags, samples):
        groups.setdefault(tag, []).append(sample)
    return {tag: statistics.median(group) for tag, group in sorted(groups.items())}


def pair_ratios(helix: dict[str, Any], tp: dict[str, Any]) -> dict[int, float]:
    """Helix / TP TPOT of each engine pair (instance i of each configuration, timed back to back by
    ``measure_twin``): the ratio of the two engines' medians."""
    h, t = instance_medians(helix), instance_medians(tp)
    return {i: h[i] / t[i] for i in sorted(h.keys() & t.keys())}


def ratio(helix: dict[str, Any], tp: dict[str, Any], instance: int | None = None) -> float:
    """Helix / TP TPOT at one point: the median of the pairs' ratios (or pair ``instance``'s), so that
    drift between pairs cancels instead of entering as the ratio of pooled medians would let it."""
    pairs = pair_ratios(helix, tp)
    return statistics.median(pairs.values()) if instance is None else pairs[instance]


def ratios(payload: dict[str, Any], model: str, batch: int, instance: int | None = None) -> list[tuple[int, float]]:
    """(context, Helix / TP TPOT) where both ran (``ratio``; with ``instance``, where that pair ran)."""
    tp, helix = records_of(payload, model)
    out = []
    for context in payload["settings"]["contexts"]:
        a, b = point_at(helix, context, batch), point_at(tp, context, batch)
        if a and b and "tpot_ms" in a and "tpot_ms" in b and (instance is None or instance in pair_ratios(a, b)):
            out.append((context, ratio(a, b, instance)))
    return out


def crossover(pairs: list[tuple[int, float]]) -> float | None:
    """Context where Helix's TPOT ratio crosses 1 (log-linear between the two measured points around it)."""
    for (c0, r0), (c1, r1) in zip(pairs, pairs[1:]):
        if r0 >= 1.0 > r1:
            t = (r0 - 1.0) / (r0 - r1)
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    if pairs and pairs[0][1] < 1.0:
        return float(pairs[0][0])  # wins from the shortest measured context on
    return None


def tokens_text(n: float) -> str:
    """4K, 256K (binary below a million), 1M, 2M (decimal from a million on, as the contexts are chosen)."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1024:.0f}K"


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of samples: the statistic every results table shows, with its range."""
    return statistics.median(values), min(values), max(values)


def tpot_spread(point: dict[str, Any]) -> tuple[float, float, float]:
    """A point's TPOT as the median over the engines that timed it (each engine's own median), with the
    engines' range: the same statistic as :func:`ratio_spread`, so a table's columns agree."""
    return spread(list(instance_medians(point).values()))


def ratio_spread(helix: dict[str, Any], tp: dict[str, Any]) -> tuple[float, float, float]:
    """Helix / TP as the median over engine pairs, with the pairs' range."""
    return spread(list(pair_ratios(helix, tp).values()))


def verdict(limit: float, low: float, high: float) -> str:
    """Against a "ratio <= limit" target, by the pairs' range: ``met`` when every pair meets it, ``missed``
    when none does, ``within noise`` when the range straddles it (more pairs would be needed to say)."""
    if high <= limit:
        return "met"
    return "missed" if low > limit else "within noise"
