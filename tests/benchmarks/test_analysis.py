"""The benchmarks' own arithmetic: profile self times, crossover, refusals (no vLLM, no engine)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import decode_step_profile as profile  # noqa: E402
import long_context  # noqa: E402


def _event(name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_self_time_subtracts_children_per_thread_and_keeps_siblings_apart() -> None:
    events = [
        _event("step", 0, 100), _event("a", 10, 30), _event("b", 15, 10), _event("a", 50, 20),
        _event("other-thread", 0, 100, tid=2),
    ]
    assert profile.self_times(events) == {"step": 50.0, "a": 40.0, "b": 10.0, "other-thread": 100.0}


def test_only_events_inside_decode_steps_count_and_groups_sum_by_name() -> None:
    step = _event(profile.STEP + "1(1)", 100, 50)
    events = [_event("aten::mm", 0, 10), step, _event("_C::cpu_attention_with_kv_cache", 110, 20),
              {"ph": "X", "name": "PyTorch Profiler (0)", "cat": "Trace", "ts": 0, "dur": 500}]
    inside = profile.within_steps(events, profile.decode_steps(events))
    assert [e["name"] for e in inside] == [step["name"], "_C::cpu_attention_with_kv_cache"]
    assert profile.grouped(profile.self_times(inside)) == {"worker Python between ops": 30.0, "attention kernel": 20.0}
    assert profile.group_of("helix/exchange_wait_merge") == "helix hops (self)"
    assert profile.group_of("gloo:all_to_all") == "collectives"


def test_crossover_is_log_linear_between_the_points_around_ratio_one() -> None:
    cross = long_context.crossover([(4096, 2.0), (16384, 1.5), (65536, 0.5), (262144, 0.4)])
    assert cross == pytest.approx(math.exp(math.log(16384) + 0.5 * math.log(4)))
    assert long_context.crossover([(4096, 0.9)]) == 4096.0
    assert long_context.crossover([(4096, 1.2), (8192, 1.1)]) is None


def test_vllm_refusal_is_shortened_to_its_facts() -> None:
    refusal = ("To serve at least one request with the model's max seq len (2000032), (1.91 GiB KV cache is "
               "needed, which is larger than the available KV cache memory (1.0 GiB). Based on the available "
               "memory, the estimated maximum model length is 1048448. Try increasing ...")
    assert long_context._short(refusal) == ("a request of 2,000,032 tokens needs 1.91 GiB of KV cache per worker, "
                                            "1 GiB holds at most 1,048,448 tokens")
    assert long_context._short("something else") == "something else"


def test_ratios_pair_helix_and_tp_at_equal_context_and_batch() -> None:
    payload = {"settings": {"contexts": [4096, 65536]}, "records": [
        {"model": "m", "config": "TP=2", "points": [{"context": 4096, "batch": 1, "tpot_ms": 10.0},
                                                    {"context": 65536, "batch": 1, "does_not_fit": "x"}]},
        {"model": "m", "config": "Helix kvp=2", "points": [{"context": 4096, "batch": 1, "tpot_ms": 15.0},
                                                           {"context": 65536, "batch": 1, "tpot_ms": 30.0}]},
    ]}
    assert long_context.ratios(payload, "m", 1) == [(4096, 1.5)]


def test_the_committed_results_explain_each_llama_miss_from_the_profile() -> None:
    """long_context.md's explanations are computed from the committed sweep and profile; both must exist."""
    payload = json.loads((long_context.RESULTS / "long_context.json").read_text())
    fixed, kernel = long_context.fixed_cost_lines(payload), long_context.kernel_gap_lines(payload)
    assert len(fixed) == 1 and "4K on the Llama twin" in fixed[0]
    assert len(kernel) == 1 and "256K and beyond on the Llama twin" in kernel[0]
    assert "x at 1M" in kernel[0] and "as fast in the served setting" in kernel[0]


def test_repeated_points_merge_into_their_median_with_every_sample_kept() -> None:
    def point(context: int, batch: int, tpot: float) -> dict:
        return {"context": context, "batch": batch, "tpot_ms": tpot, "tpot_ms_per_request": [tpot] * batch,
                "wall_s": 1.0}

    merged = long_context.merge_repeats([point(4096, 1, 9.0), point(4096, 1, 6.0), point(4096, 1, 7.0),
                                         point(4096, 8, 20.0), point(4096, 8, 22.0), point(65536, 1, 30.0)])
    assert [(p["context"], p["batch"], p["tpot_ms"]) for p in merged] == [(4096, 1, 7.0), (4096, 8, 20.0),
                                                                          (65536, 1, 30.0)]
    assert merged[0]["samples_ms"] == [9.0, 6.0, 7.0] and merged[0]["wall_s"] == 3.0
    assert merged[1]["tpot_ms_per_request"] == [20.0] * 8  # the median sample's own per-request times
