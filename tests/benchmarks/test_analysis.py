"""The benchmarks' own arithmetic: profile self times, crossover, refusals (no vLLM, no engine)."""

from __future__ import annotations

import argparse
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


def _timed(context: int, samples: list[float], instances: list[int]) -> dict:
    return {"context": context, "batch": 1, "tpot_ms": sorted(samples)[(len(samples) - 1) // 2],
            "samples_ms": samples, "sample_instances": instances, "instances": len(set(instances))}


def test_the_ratio_is_the_median_of_the_engine_pairs_so_drift_between_pairs_cancels() -> None:
    """Pair i (TP instance i, Helix instance i) timed on a machine running 1.0, 1.8 and 1.3 times slow, TP's
    samples spread within an instance: each pair's ratio is the true 0.8; the pooled medians' ratio mixes
    instances (TP's middle sample is instance 2's fast one) and is not."""
    tp = _timed(4096, [10.0, 10.0, 17.0, 19.0, 12.0, 14.0], [0, 0, 1, 1, 2, 2])
    helix = _timed(4096, [8.0, 8.0, 14.4, 14.4, 10.4, 10.4], [0, 0, 1, 1, 2, 2])
    assert long_context.pair_ratios(helix, tp) == pytest.approx({0: 0.8, 1: 0.8, 2: 0.8})
    assert long_context.ratio(helix, tp) == pytest.approx(0.8)
    assert long_context.ratio(helix, tp, instance=1) == pytest.approx(0.8)
    assert helix["tpot_ms"] / tp["tpot_ms"] == pytest.approx(10.4 / 12.0)


def test_a_sweep_without_sample_instances_is_read_as_equal_runs_per_instance() -> None:
    """Sweeps written before 2026-12-02 stored each point's samples instance by instance, untagged."""
    point = {"context": 4096, "batch": 1, "tpot_ms": 5.0, "samples_ms": [1.0, 2.0, 3.0, 7.0, 8.0, 9.0],
             "instances": 2}
    assert long_context.instance_medians(point) == {0: 2.0, 1: 8.0}
    assert long_context.instance_medians({"context": 1, "batch": 1, "tpot_ms": 4.0}) == {0: 4.0}


def test_measure_twin_alternates_tp_and_helix_engines_and_tags_every_sample(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First instances establish what fits (TP's engines, then Helix's); then instance i of TP, of Helix, ...
    Every point ends with one sample per instance and repeat, tagged with its instance."""
    calls: list[tuple[str, bool, str]] = []

    def engine(model, config, points, fill, output_len, log, timeout_s, **_):  # noqa: ANN001
        calls.append((config, fill, log.stem))
        return {"kv_cache_tokens": 10 ** 6,
                "points": [{"context": c, "batch": b, "tpot_ms": 1.0 + len(calls), "wall_s": 0.1} for c, b in points]}

    monkeypatch.setattr(long_context, "run_engine", engine)
    monkeypatch.setattr(long_context, "twin", lambda name: tmp_path / name)
    args = argparse.Namespace(contexts=[4096, 65536, 131072], batches=[1], real_prefill_max=4096, repeats=2,
                              instances=3, output_len=8, timeout=1.0, log_dir=tmp_path)
    records = long_context.measure_twin("llama_kv1", args)
    order = [(config, fill) for config, fill, _ in calls]
    first = [("TP=2", False), ("TP=2", True), ("Helix kvp=2", False), ("Helix kvp=2", True)]
    assert order == first * 3
    assert [stem.endswith(f"instance{i}") for i in (1, 2) for _, _, stem in calls[4 * i:4 * i + 4]] == [True] * 8
    for record in records:
        assert "samples" not in record
        by_context = {p["context"]: p for p in record["points"]}
        assert by_context[4096]["sample_instances"] == [0, 0, 1, 1, 2, 2] and not by_context[4096]["fill"]
        assert by_context[131072]["sample_instances"] == [0, 1, 2] and by_context[131072]["fill"]
    tp, helix = records
    assert long_context.pair_ratios(helix["points"][0], tp["points"][0]) == {0: 4.0 / 2.0, 1: 8.0 / 6.0,
                                                                            2: 12.0 / 10.0}
