"""The benchmarks' own arithmetic: profile self times, crossover, refusals (no vLLM, no engine)."""

from __future__ import annotations

import json


from benchmarks import decode_step_profile as profile  # noqa: E402
from vllm_helix.harness.step_groups import group_of, grouped  # noqa: E402
from benchmarks import long_context  # noqa: E402


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
    assert grouped(profile.self_times(inside)) == {"worker Python between ops": 30.0, "attention kernel": 20.0}
    assert group_of("helix/exchange_wait_merge") == "helix hops (self)"
    assert group_of("gloo:all_to_all") == "collectives"


def test_vllm_refusal_is_shortened_to_its_facts() -> None:
    refusal = ("To serve at least one request with the model's max seq len (2000032), (1.91 GiB KV cache is "
               "needed, which is larger than the available KV cache memory (1.0 GiB). Based on the available "
               "memory, the estimated maximum model length is 1048448. Try increasing ...")
    assert long_context._short(refusal) == ("a request of 2,000,032 tokens needs 1.91 GiB of KV cache per worker, "
                                            "1 GiB holds at most 1,048,448 tokens")
    assert long_context._short("something else") == "something else"


def test_the_committed_results_explain_each_llama_miss_from_the_profile() -> None:
    """long_context.md's explanations are computed from the committed sweep and profile; both must exist."""
    payload = json.loads((long_context.RESULTS / "long_context.json").read_text())
    fixed, kernel = long_context.fixed_cost_lines(payload), long_context.kernel_gap_lines(payload)
    assert len(fixed) == 1 and "4K on the Llama twin" in fixed[0]
    assert len(kernel) == 1 and "256K and beyond on the Llama twin" in kernel[0]
    assert "x at 1M" in kernel[0] and "as fast in the served setting" in kernel[0]


