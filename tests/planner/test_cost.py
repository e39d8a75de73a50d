"""The cost model against hand calculations with explicit numbers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vllm_helix.planner.collectives import GroupPlacement, all_reduce_time, exchange_time, place_group
from vllm_helix.planner.cost import (TERMS, Workload, max_sequences, memory_per_gpu, pipelined_time, roofline,
                                     scheduler_defaults, step_cost, workspace_bytes)
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.hardware_spec import load_hardware
from vllm_helix.planner.strategies import Layout, layouts_for
from vllm_helix.planner.loads import OpLoad, experts_read
from vllm_helix.planner.model_spec import ModelSpec, load_model
from vllm_helix.planner.precision import Precision

BF16 = Precision.uniform("bf16")
FP4 = Precision.uniform("mxfp4")


def _terms_ms(cost, i: int = 0) -> dict[str, float]:
    return {k: float(v[i]) * 1e3 for k, v in cost.terms.items()}


def test_batch_one_single_gpu_ttl_is_bytes_over_bandwidth(toy_model: ModelSpec, toy_gpu) -> None:
    # weights read: 4,194,304 + 12,582,912 + 1,024,000 (LM head) = 17,801,216 params x 2 B = 35,602,432 B
    # KV read: 1000 tokens x 2048 elements x 2 B = 4,096,000 B; at 1e12 B/s: 39.698432 us, no communication
    cost = step_cost(toy_model, toy_gpu, Layout("tp", tpa=1, tpf=1), Workload(1000, BF16), [1])
    assert cost.ttl[0] == pytest.approx(39.698432e-6, rel=1e-12)
    assert cost.terms["weights"][0] == pytest.approx(35.602432e-6, rel=1e-12)
    assert cost.terms["kv_cache"][0] == pytest.approx(4.096e-6, rel=1e-12)
    assert cost.tokens_per_s_per_user[0] == pytest.approx(1 / 39.698432e-6)


def test_batch_one_tp2_adds_two_one_shot_all_reduces(toy_model: ModelSpec, toy_gpu) -> None:
    # every byte halves (8 KV heads split 2 ways); each all-reduce moves 1024 x 2 B to one peer:
    # 1 us + 2048 B / 1e11 B/s = 1.02048 us, twice per layer
    cost = step_cost(toy_model, toy_gpu, Layout("tp", tpa=2, tpf=2), Workload(1000, BF16), [1])
    assert cost.terms["all_reduce"][0] == pytest.approx(2 * 1.02048e-6, rel=1e-12)
    assert cost.ttl[0] == pytest.approx(39.698432e-6 / 2 + 2 * 1.02048e-6, rel=1e-12)
    assert cost.tokens_per_s_per_gpu[0] == pytest.approx(1 / (cost.ttl[0] * 2))


def test_helix_all_to_all_bytes(toy_model: ModelSpec, toy_gpu) -> None:
    # kvp=2, tpa=2: a rank holds 4 heads and sends the 2 heads of its peer:
    # 2 heads x (128 x 2 B + 4 B LSE) = 520 B -> 1 us + 520 / 1e11 s
    cost = step_cost(toy_model, toy_gpu, Layout("helix", tpa=2, kvp=2, tpf=4), Workload(1000, BF16), [1])
    assert cost.terms["attention_exchange"][0] == pytest.approx(1e-6 + 520 / 1e11, rel=1e-12)
    # KV per rank: 1/2 of the heads x 1/2 of the tokens
    assert cost.terms["kv_cache"][0] == pytest.approx(4.096e-6 / 4, rel=1e-12)


def test_medha_gather_and_broadcast(toy_model: ModelSpec, toy_gpu) -> None:
    # gather: 4 heads x 260 B = 1040 B from the other KVP group; broadcast: 1024 x 2 B back
    cost = step_cost(toy_model, toy_gpu, Layout("kvp", tpa=2, kvp=2, tpf=2), Workload(1000, BF16), [1])
    assert cost.terms["attention_exchange"][0] == pytest.approx(2e-6 + (1040 + 2048) / 1e11, rel=1e-12)


def test_pipeline_ttl_is_pp_times_slowest_stage(make_toy_model, toy_gpu) -> None:
    model = make_toy_model(num_layers=2)
    # a layer at micro-batch 1: (4,194,304 + 12,582,912) x 2 B + 4,096,000 B = 37,650,432 B -> 37.650432 us;
    # the LM head (2,048,000 B = 2.048 us) makes stage 2 the slowest, so TTL = 2 x (37.650432 + 2.048) us
    cost = step_cost(model, toy_gpu, Layout("tp_pp", tpa=1, pp=2, tpf=1), Workload(1000, BF16), [2])
    assert cost.ttl[0] == pytest.approx(2 * (37.650432e-6 + 2.048e-6), rel=1e-12)
    assert cost.terms["pipeline_send"][0] == pytest.approx(1e-6 + 2048 / 1e11, rel=1e-12)
    assert sum(float(v[0]) for v in cost.terms.values()) == pytest.approx(cost.ttl[0], rel=1e-12)
    odd = step_cost(model, toy_gpu, Layout("tp_pp", tpa=1, pp=2, tpf=1), Workload(1000, BF16), [3])
    assert not odd.feasible[0]  # 3 sequences do not split into 2 micro-batches


def test_kv_duplication_beyond_kv_heads() -> None:
    llama, gb200 = load_model("llama-3.1-405b"), load_hardware("gb200-nvl72")
    work = Workload(2**20, FP4)
    kv = {tp: step_cost(llama, gb200, Layout("tp", tpa=tp, tpf=tp), work, [1]).terms["kv_cache"][0]
          for tp in (4, 8, 16, 64)}
    assert kv[4] == pytest.approx(2 * kv[8])
    assert kv[16] == pytest.approx(kv[8]) and kv[64] == pytest.approx(kv[8])  # 8 KV heads: no gain past 8
    r1 = load_model("deepseek-r1")
    mla = {tp: step_cost(r1, gb200, Layout("tp", tpa=tp, tpf=tp), work, [1]).terms["kv_cache"][0]
           for tp in (8, 64)}
    assert mla[8] == pytest.approx(mla[64])  # one latent head: every TP rank reads it all
    helix = step_cost(r1, gb200, Layout("helix", kvp=64, tpf=64), work, [1]).terms["kv_cache"][0]
    assert helix == pytest.approx(mla[64] / 64)
    # the whole latent of 1M tokens x 61 layers x 576 x 4.25/8 B over 8 TB/s
    assert mla[64] == pytest.approx(61 * 2**20 * 576 * 4.25 / 8 / 8e12)


def test_roofline_compute_bound_term() -> None:
    gb200 = load_hardware("gb200-nvl72")
    parts = roofline(OpLoad(weight_bytes=8e6, kv_bytes=0.0, flops=1e13), gb200, BF16)
    assert parts["weights"] == pytest.approx(1e-6)  # 8 MB / 8 TB/s
    assert parts["compute"] == pytest.approx(1e13 / 2.5e15 - 1e-6)  # 4 ms of FLOPs beyond the 1 us read
    memory_bound = roofline(OpLoad(weight_bytes=8e9, flops=1.0), gb200, BF16)
    assert memory_bound["compute"] == 0.0


def test_experts_read() -> None:
    r1 = load_model("deepseek-r1")
    assert experts_read(r1, 1, np.array([1.0]))[0] == 8  # one token: its top-8
    assert experts_read(r1, 64, np.array([1.0]))[0] == 1  # busiest of 64 ranks holds >= 1 touched expert
    assert experts_read(r1, 64, np.array([1e4]))[0] == 4  # many tokens: all 4 local experts
    expected = 256 * (1 - (1 - 8 / 256) ** 16)
    assert experts_read(r1, 1, np.array([16.0]))[0] == np.ceil(expected)


def test_hopb_toy_example_from_the_paper() -> None:
    # 8 requests, 2 units of attention and 1.2 of communication each: 25.6 in lockstep, ~17 overlapped
    assert float(pipelined_time(np.array(16.0), np.array(9.6), 1)) == pytest.approx(25.6)
    assert float(pipelined_time(np.array(16.0), np.array(1.2), 8)) == pytest.approx(17.2)
    # communication-bound: overlap hides the compute instead
    assert float(pipelined_time(np.array(4.0), np.array(2.0), 4)) == pytest.approx(1 + 2 + 3 * 2)


def test_collectives_by_hand(toy_gpu) -> None:
    local8 = place_group(8, 1, 8)
    assert local8 == GroupPlacement(8, 7, 0)
    assert all_reduce_time(1000.0, local8, toy_gpu) == pytest.approx(1e-6 + 7 * 1000 / 1e11)  # one-shot
    assert all_reduce_time(1e9, local8, toy_gpu) == pytest.approx(2 * (1e-6 + 7 * 1.25e8 / 1e11))  # two-shot
    assert float(all_reduce_time(1e9, place_group(1, 1, 8), toy_gpu)) == 0.0
    across = place_group(16, 1, 8)
    assert across == GroupPlacement(16, 7, 8)
    # hierarchical: reduce-scatter and all-gather inside (1/8 per peer), two-shot across on 1/8 of the buffer
    hierarchical = 2 * (1e-6 + 7 * 1.25e8 / 1e11) + 2 * (5e-6 + 6.25e7 / 1e10)
    assert all_reduce_time(1e9, across, toy_gpu) == pytest.approx(hierarchical)
    assert place_group(16, 8, 64) == GroupPlacement(16, 7, 8)  # strided group spills out of the domain
    assert exchange_time(100.0, GroupPlacement(3, 1, 1), toy_gpu) == pytest.approx(5e-6 + 100 / 1e10)


def test_memory_per_gpu_by_hand(toy_model: ModelSpec, toy_gpu) -> None:
    # attention 4,194,304 + FFN 12,582,912 + embedding and LM head 2 x 1,024,000 = 18,825,216 params x 2 B
    # plus 4,096,000 B of KV per sequence; vLLM's workspace on an 80 GB (74.5 GiB) GPU: 8192 tokens x
    # (2 x 1024 residual + 3 x 4096 FFN) x 2 B = 234,881,024 B; plus the 2 GB runtime reserve
    layout = Layout("tp", tpa=1, tpf=1)
    memory = memory_per_gpu(toy_model, layout, Workload(1000, BF16), np.array([0.0, 1.0, 3.0]), toy_gpu)
    assert list(memory) == pytest.approx([x + 234_881_024 + 2e9 for x in (37_650_432, 41_746_432, 49_938_432)])


def test_workspace_follows_vllms_scheduler_defaults(toy_model: ModelSpec, make_toy_gpu) -> None:
    layout = Layout("tp", tpa=1, tpf=1)
    per_token = (2 * 1024 + 3 * 4096) * 2
    big, h100, small = (make_toy_gpu(memory={"capacity_gb": gb}) for gb in (192, 80, 40))
    assert scheduler_defaults(big) == (16384, 1024) and scheduler_defaults(small) == (2048, 256)
    assert workspace_bytes(toy_model, layout, big, np.array([1.0]))[0] == 16384 * per_token
    assert workspace_bytes(toy_model, layout, small, np.array([1.0]))[0] == 2048 * per_token
    # a batch past max_num_batched_tokens needs that many tokens of workspace
    assert workspace_bytes(toy_model, layout, h100, np.array([20000.0]))[0] == 20000 * per_token


def test_capacity_edges(toy_model: ModelSpec, make_toy_gpu) -> None:
    toy_hardware = make_toy_gpu
    layout, work = Layout("tp", tpa=1, tpf=1), Workload(1000, BF16, memory_utilization=1.0)
    workspace = 2048 * (2 * 1024 + 3 * 4096) * 2  # a GPU under 70 GiB: vLLM's 2048-token profile run
    one_sequence = 41_746_432 + workspace  # weights + workspace + exactly one sequence, no reserve
    exact = toy_hardware(memory={"capacity_gb": one_sequence / 1e9, "runtime_reserve_gb": 0})
    assert step_cost(toy_model, exact, layout, work, [1, 2]).feasible.tolist() == [True, False]
    assert max_sequences(toy_model, exact, layout, work) == 1
    short = toy_hardware(memory={"capacity_gb": (one_sequence - 1) / 1e9, "runtime_reserve_gb": 0})
    assert not step_cost(toy_model, short, layout, work, [1]).feasible[0]
    assert max_sequences(toy_model, short, layout, work) == 0
    # vLLM's default --gpu-memory-utilization 0.9 leaves a tenth of the memory alone
    roomy = toy_hardware(memory={"capacity_gb": one_sequence / 0.9 / 1e9, "runtime_reserve_gb": 0})
    assert max_sequences(toy_model, roomy, layout, Workload(1000, BF16)) == 1
    assert max_sequences(toy_model, roomy, layout, work) > 1
    with pytest.raises(PlannerError, match=r"--gpu-memory-utilization 1.2 must be in \(0, 1\]"):
        Workload(1000, BF16, memory_utilization=1.2)
    tiny = toy_hardware(memory={"capacity_gb": 1e-3})  # not even the weights
    assert max_sequences(toy_model, tiny, layout, work) == 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-deepseek-v3", "deepseek-r1", "llama-3.1-405b"])
def test_terms_sum_to_ttl_and_hopb_never_hurts(name: str) -> None:
    model, gb200 = load_model(name), load_hardware("gb200-nvl72")
    work = Workload(65536, FP4)
    batches = np.array([1, 2, 3, 8, 64, 256])
    for gpus in (1, 2, 4, 8, 16):
        for layout in layouts_for(model, gpus):
            cost = step_cost(model, gb200, layout, work, batches)
            assert set(cost.terms) == set(TERMS)
            assert np.allclose(sum(cost.terms.values()), cost.ttl, rtol=1e-12)
            assert np.all(cost.ttl > 0)
            if layout.hopb:
                plain = step_cost(model, gb200, dataclasses.replace(layout, hopb=False), work, batches)
                assert np.all(cost.ttl <= plain.ttl * (1 + 1e-12))
                assert np.all(cost.terms["hopb_hidden"] <= 0)
                assert np.all(cost.micro_batches <= batches)


def test_dp_attention_with_tp_inside_each_group() -> None:
    """vLLM's --data-parallel-size 2 --tensor-parallel-size 2 --enable-expert-parallel against DP=4."""
    model, gpu, work = load_model("tiny-deepseek-v3"), load_hardware("h100-sxm"), Workload(8192, BF16)
    dp4 = step_cost(model, gpu, Layout("dp_ep", dpa=4, tpf=1, ep=4), work, [4])
    dp2tp2 = step_cost(model, gpu, Layout("dp_ep", dpa=2, tpa=2, tpf=1, ep=4), work, [4])
    # MLA's one latent KV head is replicated inside a TP group, which holds 2 of the 4 sequences
    assert dp2tp2.terms["kv_cache"][0] == pytest.approx(2 * dp4.terms["kv_cache"][0], rel=1e-12)
    assert dp4.terms["all_reduce"][0] == 0.0 < dp2tp2.terms["all_reduce"][0]  # o_proj and dense FFN, over TP=2
    assert dp2tp2.memory_per_gpu[0] < memory_per_gpu(model, Layout("dp_ep", dpa=4, tpf=1, ep=4), work,
                                                     np.array([8.0]), gpu)[0]  # half the attention weights
