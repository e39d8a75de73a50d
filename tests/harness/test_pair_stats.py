"""Helix / TP ratios from engine pairs (vllm_helix/harness/pair_stats.py)."""

from __future__ import annotations

import math

import pytest

from vllm_helix.harness.pair_stats import (crossover, instance_medians, pair_ratios, ratio, ratio_spread, ratios,
                                         spread, tpot_spread, verdict)


def test_crossover_is_log_linear_between_the_points_around_ratio_one() -> None:
    cross = crossover([(4096, 2.0), (16384, 1.5), (65536, 0.5), (262144, 0.4)])
    assert cross == pytest.approx(math.exp(math.log(16384) + 0.5 * math.log(4)))
    assert crossover([(4096, 0.9)]) == 4096.0
    assert crossover([(4096, 1.2), (8192, 1.1)]) is None



def test_ratios_pair_helix_and_tp_at_equal_context_and_batch() -> None:
    payload = {"settings": {"contexts": [4096, 65536]}, "records": [
        {"model": "m", "config": "TP=2", "points": [{"context": 4096, "batch": 1, "tpot_ms": 10.0},
                                                    {"context": 65536, "batch": 1, "does_not_fit": "x"}]},
        {"model": "m", "config": "Helix kvp=2", "points": [{"context": 4096, "batch": 1, "tpot_ms": 15.0},
                                                           {"context": 65536, "batch": 1, "tpot_ms": 30.0}]},
    ]}
    assert ratios(payload, "m", 1) == [(4096, 1.5)]



def _timed(context: int, samples: list[float], instances: list[int]) -> dict:
    return {"context": context, "batch": 1, "tpot_ms": sorted(samples)[(len(samples) - 1) // 2],
            "samples_ms": samples, "sample_instances": instances, "instances": len(set(instances))}



def test_the_ratio_is_the_median_of_the_engine_pairs_so_drift_between_pairs_cancels() -> None:
    """Pair i (TP instance i, Helix instance i) timed on a machine running 1.0, 1.8 and 1.3 times slow, TP's
    samples spread within an instance: each pair's ratio is the true 0.8; the pooled medians' ratio mixes
    instances (TP's middle sample is instance 2's fast one) and is not."""
    tp = _timed(4096, [10.0, 10.0, 17.0, 19.0, 12.0, 14.0], [0, 0, 1, 1, 2, 2])
    helix = _timed(4096, [8.0, 8.0, 14.4, 14.4, 10.4, 10.4], [0, 0, 1, 1, 2, 2])
    assert pair_ratios(helix, tp) == pytest.approx({0: 0.8, 1: 0.8, 2: 0.8})
    assert ratio(helix, tp) == pytest.approx(0.8)
    assert ratio(helix, tp, instance=1) == pytest.approx(0.8)
    assert helix["tpot_ms"] / tp["tpot_ms"] == pytest.approx(10.4 / 12.0)



def test_a_sweep_without_sample_instances_is_read_as_equal_runs_per_instance() -> None:
    """Sweeps written before 2026-12-02 stored each point's samples instance by instance, untagged."""
    point = {"context": 4096, "batch": 1, "tpot_ms": 5.0, "samples_ms": [1.0, 2.0, 3.0, 7.0, 8.0, 9.0],
             "instances": 2}
    assert instance_medians(point) == {0: 2.0, 1: 8.0}
    assert instance_medians({"context": 1, "batch": 1, "tpot_ms": 4.0}) == {0: 4.0}


def test_tables_show_the_same_statistic_for_tpot_and_ratio_with_their_range() -> None:
    tp = _timed(4096, [10.0, 10.0, 17.0, 19.0, 12.0, 14.0], [0, 0, 1, 1, 2, 2])  # engines' medians 10, 18, 13
    helix = _timed(4096, [8.0, 8.0, 14.4, 14.4, 10.4, 10.4], [0, 0, 1, 1, 2, 2])
    assert tpot_spread(tp) == (13.0, 10.0, 18.0)
    assert ratio_spread(helix, tp) == pytest.approx((0.8, 0.8, 0.8))
    assert spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)


def test_a_verdict_is_judged_by_the_pairs_range() -> None:
    assert verdict(0.55, 0.40, 0.50) == "met"
    assert verdict(0.55, 0.56, 0.79) == "missed"
    assert verdict(0.55, 0.50, 0.66) == "within noise"  # some pairs meet it, some do not: more pairs needed
