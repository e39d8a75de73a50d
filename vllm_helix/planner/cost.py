"""The decode cost model: time of one decode step (TTL) of a layout, per term, for many batch sizes.

One decode step pushes one new token of each of ``B`` sequences through every
layer. Per layer, on the busiest GPU, the step runs these operations in order:

1. QKV projection                      roofline(weights, FLOPs)
2. attention over the local KV shard   roofline(KV bytes, FLOPs)
3. attention exchange                  Helix: all-to-all over KVP (HOP-B can hide it
                                       behind step 2); Medha: gather to the TP group
4. ``o_proj``                          roofline(weights, FLOPs)
5. all-reduce of ``B x hidden``        over the ranks that split ``o_proj``
6. FFN (dense or MoE)                  roofline(weights read, FLOPs)
7. FFN communication                   all-reduce over the FFN grid, or MoE dispatch
                                       + combine all-to-alls (DP attention + EP), and
                                       Medha's broadcast back to every KVP group

then the LM head once per step. Each operation's time is the roofline
``max(bytes / HBM bandwidth, FLOPs / peak)`` with the profile's constants and
nothing else: no efficiency factors. A profile calibrated on vLLM engine runs
(:mod:`vllm_helix.planner.calibration`) changes two things: step 2 reads the KV
cache at the measured rate of the layout's kernel instead, and the step pays the
engine's measured fixed costs (per step, per layer, per sequence). Operations do
not overlap each other except where HOP-B overlaps the Helix all-to-all with attention. Pipeline parallelism keeps
``PP`` micro-batches in flight, so a token takes ``PP`` times the slowest stage.

All arrays are over batch sizes, so one call prices a layout for every batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vllm_helix.planner import loads
from vllm_helix.planner.calibration import EngineCosts
from vllm_helix.planner.collectives import GroupPlacement, all_reduce_time, exchange_time, place_group
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.hardware_spec import HardwareSpec
from vllm_helix.planner.strategies import Layout
from vllm_helix.planner.loads import OpLoad
from vllm_helix.planner.model_spec import ModelSpec
from vllm_helix.planner.precision import Precision

DEFAULT_MEMORY_UTILIZATION = 0.9  # vLLM's default --gpu-memory-utilization

# The breakdown of a step, in seconds; the terms sum to the TTL.
TERMS: tuple[str, ...] = (
    "weights",             # reading weights from HBM
    "kv_cache",            # reading the KV cache from HBM
    "compute",             # FLOP time beyond the memory time of compute-bound operations
    "attention_exchange",  # Helix all-to-all / Medha gather and broadcast
    "all_reduce",          # tensor-parallel all-reduces of hidden states
    "moe_dispatch",        # MoE token dispatch and combine all-to-alls (DP attention + EP)
    "pipeline_send",       # hidden states between pipeline stages
    "hopb_hidden",         # minus what HOP-B hides of the all-to-all
    "pipeline_bubble",     # waiting on the slowest pipeline stage
    "fixed",               # calibrated profiles only: the engine's measured per-step/layer/sequence costs
)


@dataclass(frozen=True)
class Workload:
    """What is being decoded.

    ``context`` tokens of KV history per sequence (all sequences alike, as in the
    paper). For co-located (aggregated) serving, ``prompt_tokens_per_decode_token``
    prompt tokens of ``prompt_length``-token prompts are prefilled inside each step
    per decoded token (ISL/OSL in steady state); decode-only serving leaves it 0.
    """

    context: int
    precision: Precision
    prompt_tokens_per_decode_token: float = 0.0
    prompt_length: int = 0
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION  # vLLM's --gpu-memory-utilization

    def __post_init__(self) -> None:
        if not 0.0 < self.memory_utilization <= 1.0:
            raise PlannerError(f"--gpu-memory-utilization {self.memory_utilization:g} must be in (0, 1], "
                               f"the fraction of each GPU's memory vLLM may use (vLLM's default: 0.9)")


@dataclass(frozen=True)
class StepCost:
    """A layout's decode step over an array of batch sizes (times in seconds)."""

    layout: Layout
    batch: np.ndarray
    ttl: np.ndarray
    terms: dict[str, np.ndarray]
    memory_per_gpu: np.ndarray
    feasible: np.ndarray
    micro_batches: np.ndarray = field(repr=False)

    @property
    def tokens_per_s_per_user(self) -> np.ndarray:
        return 1.0 / self.ttl

    @property
    def tokens_per_s_per_gpu(self) -> np.ndarray:
        return self.batch / (self.ttl * self.layout.gpus)


def roofline(load: OpLoad, hw: HardwareSpec, precision: Precision) -> dict[str, np.ndarray]:
    """An operation's time split into weight reads, KV reads and compute beyond them.

    The operation takes ``max(memory time, FLOP time)``; the compute term is the
    excess of FLOP time over memory time, so the three always sum to that maximum.
    """
    weights = np.asarray(load.weight_bytes) / hw.memory_bandwidth
    kv = np.asarray(load.kv_bytes) / hw.memory_bandwidth
    flop_time = np.asarray(load.flops) / hw.flop_rate(precision.compute)
    return {"weights": weights, "kv_cache": kv, "compute": np.maximum(0.0, flop_time - weights - kv)}


def calibrated_attention(load: OpLoad, prompt_flops: np.ndarray | float, costs: EngineCosts, hw: HardwareSpec,
                         precision: Precision) -> dict[str, np.ndarray]:
    """Decode attention at the kernel's measured KV read rate (which already includes its arithmetic);
    co-located prompt tokens' attention FLOPs stay at the profile's peak."""
    kv = np.asarray(load.kv_bytes) / costs.kv_read_rate
    return {"weights": np.zeros_like(kv), "kv_cache": kv,
            "compute": np.asarray(prompt_flops) / hw.flop_rate(precision.compute) + np.zeros_like(kv)}


def _engine_costs(model: ModelSpec, hw: HardwareSpec, layout: Layout) -> EngineCosts:
    assert hw.calibration is not None
    return hw.calibration.engine_costs(model.attention, layout.strategy, hw.name)


def pipelined_time(compute: np.ndarray, comm_per_micro_batch: np.ndarray, micro_batches: int) -> np.ndarray:
    """Two-stage pipeline of ``m`` micro-batches: compute one while the previous one communicates.

    HOP-B: ``compute/m + comm + (m-1) * max(compute/m, comm)``, where ``comm`` is one
    micro-batch's exchange. The paper's toy example, 8 requests of 2 units of
    attention and 1.2 of communication each, gives 17.2 instead of 8 x 3.2 = 25.6.
    """
    step = compute / micro_batches
    return step + comm_per_micro_batch + (micro_batches - 1) * np.maximum(step, comm_per_micro_batch)


def _add(total: dict[str, np.ndarray], part: dict[str, np.ndarray], times: float = 1.0) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + times * value


# ---------------------------------------------------------------- layer model
def _output_width(layout: Layout) -> int:
    """Ranks splitting ``o_proj`` and the LM head: all of a stage under Helix (heads arrive
    H/N per rank after the all-to-all), the (DP group's) TP group otherwise."""
    return layout.stage_gpus if layout.strategy == "helix" else layout.tpa


def _dense_width(layout: Layout) -> int:
    """Ranks splitting a dense FFN (and MoE shared experts): a DP group's TP ranks under DP
    attention (each group runs its own tokens), the whole FFN grid otherwise."""
    return layout.tpa if layout.strategy == "dp_ep" else layout.tpf * layout.ep


@dataclass(frozen=True)
class _Placements:
    """Which groups each collective of a layer runs over, and where their peers sit."""

    attention_exchange: GroupPlacement
    attention_reduce: GroupPlacement
    ffn: GroupPlacement
    output_width: int  # ranks splitting o_proj and the LM head

    @classmethod
    def of(cls, layout: Layout, hw: HardwareSpec) -> "_Placements":
        n = layout.stage_gpus
        domains = math.ceil(n / hw.gpus_per_domain)
        per_domain = math.ceil(n / domains)  # an instance is spread evenly over its domains
        if layout.strategy == "helix":  # KVP ranks of a head slice are consecutive (vllm_helix.rank_grid)
            exchange = place_group(layout.kvp, 1, per_domain)
        elif layout.strategy == "kvp":  # Medha: TP groups consecutive, KVP groups across them
            exchange = place_group(layout.kvp, layout.tpa, per_domain)
        else:
            exchange = place_group(1, 1, per_domain)
        output_width = _output_width(layout)
        return cls(
            attention_exchange=exchange,
            attention_reduce=place_group(output_width, 1, per_domain),
            ffn=place_group(layout.tpf * layout.ep, 1, per_domain),
            output_width=output_width,
        )


@dataclass(frozen=True)
class _LayerCost:
    """One layer's terms, plus what HOP-B needs to re-price the exchange per micro-batch."""

    terms: dict[str, np.ndarray]
    attention_time: np.ndarray
    exchange_bytes_per_peer: np.ndarray


def _layer_cost(model: ModelSpec, hw: HardwareSpec, layout: Layout, work: Workload, kind: str,
                micro_batch: np.ndarray, place: _Placements) -> _LayerCost:
    """Terms of one layer of ``kind`` for a (pipeline) micro-batch of ``micro_batch`` sequences."""
    p = work.precision
    n = layout.stage_gpus
    mix = 1.0 + work.prompt_tokens_per_decode_token
    requests = np.ceil(micro_batch / layout.dpa)  # sequences whose KV this rank reads
    tokens = requests * mix  # tokens through this rank's projections
    batch_tokens = micro_batch * mix  # tokens of the whole micro-batch (replicated activations)
    prompt_flops = loads.prompt_attention_flops(model, micro_batch * work.prompt_tokens_per_decode_token,
                                                work.prompt_length) / n

    terms: dict[str, np.ndarray] = {}
    _add(terms, roofline(loads.attention_input(model, layout.tpa, tokens, p), hw, p))
    core_load = loads.attention_core(model, layout.tpa, layout.kvp, requests, work.context, p, prompt_flops)
    core = (roofline(core_load, hw, p) if hw.calibration is None
            else calibrated_attention(core_load, prompt_flops, _engine_costs(model, hw, layout), hw, p))
    _add(terms, core)
    attention_time = sum(core.values())

    heads = model.num_q_heads / layout.tpa
    exchange_bytes = np.zeros_like(requests)
    if layout.strategy == "helix":  # each rank keeps 1/kvp of its heads, sends the rest
        exchange_bytes = loads.partial_output_bytes(model, heads / layout.kvp, requests, p)
        terms["attention_exchange"] = exchange_time(exchange_bytes, place.attention_exchange, hw)
    elif layout.strategy == "kvp":  # gather every shard's partials on the TP group, broadcast back
        gather = exchange_time(loads.partial_output_bytes(model, heads, requests, p), place.attention_exchange, hw)
        broadcast = exchange_time(loads.hidden_bytes(model, batch_tokens, p), place.attention_exchange, hw)
        terms["attention_exchange"] = gather + broadcast

    _add(terms, roofline(loads.attention_output(model, place.output_width, tokens, p), hw, p))
    terms["all_reduce"] = all_reduce_time(loads.hidden_bytes(model, tokens, p), place.attention_reduce, hw)

    dense_width = _dense_width(layout)
    if kind == "dense":
        _add(terms, roofline(loads.dense_ffn(model, dense_width, tokens, p), hw, p))
    else:
        _add(terms, roofline(loads.moe_ffn(model, layout.tpf, layout.ep, batch_tokens, dense_width, tokens, p),
                             hw, p))
    if layout.strategy != "dp_ep":
        terms["all_reduce"] = terms["all_reduce"] + all_reduce_time(loads.hidden_bytes(model, batch_tokens, p),
                                                                    place.ffn, hw)
    elif kind == "moe":  # each token to its k experts' ranks and back
        per_peer = loads.hidden_bytes(model, tokens * model.experts_per_token / layout.ep, p)
        terms["moe_dispatch"] = 2 * exchange_time(per_peer, place.ffn, hw)
    else:  # a dense layer of a DP group: all-reduced over the group's TP ranks (nothing at TP=1)
        terms["all_reduce"] = terms["all_reduce"] + all_reduce_time(loads.hidden_bytes(model, tokens, p),
                                                                    place.attention_reduce, hw)
    return _LayerCost(terms, attention_time, exchange_bytes)


# ------------------------------------------------------------------ the step
def pipeline_stages(kinds: list[str], pp: int) -> list[list[str]]:
    """Contiguous stages of near-equal layer counts (the first ``L mod PP`` get one more)."""
    base, extra = divmod(len(kinds), pp)
    stages, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        stages.append(kinds[start:start + size])
        start += size
    return stages


def _hopb_overlap(layers: dict[str, _LayerCost], counts: dict[str, int], micro_batch: np.ndarray,
                  place: _Placements, hw: HardwareSpec) -> tuple[np.ndarray, np.ndarray]:
    """Seconds HOP-B saves per step and the micro-batch count that saves the most.

    Candidates are powers of two up to the batch. Splitting hides more of the
    exchange's bandwidth time behind attention (never the last micro-batch's
    latency), but every extra micro-batch is one more exchange to issue and one
    more combine on the compute stream, charged one scale-up message latency
    (the same per-message constant as the exchange itself). Without that charge
    the model would always ask for one micro-batch per sequence.
    """
    best_hidden = np.zeros_like(micro_batch)
    best_m = np.ones_like(micro_batch)
    m = 2
    while m <= micro_batch.max():
        hidden = np.zeros_like(micro_batch)
        for kind, layer in layers.items():
            lockstep = layer.attention_time + layer.terms["attention_exchange"]
            comm = exchange_time(layer.exchange_bytes_per_peer / m, place.attention_exchange, hw)
            overlapped = pipelined_time(layer.attention_time, comm, m) + (m - 1) * hw.scale_up.latency
            hidden = hidden + counts[kind] * (lockstep - overlapped)
        better = (m <= micro_batch) & (hidden > best_hidden)
        best_hidden = np.where(better, hidden, best_hidden)
        best_m = np.where(better, m, best_m)
        m *= 2
    return best_hidden, best_m


def _pipeline_sends(model: ModelSpec, hw: HardwareSpec, layout: Layout, micro_batch: np.ndarray,
                    work: Workload) -> np.ndarray:
    """Hidden states across the ``PP - 1`` stage boundaries; each TP rank sends its slice."""
    payload = loads.hidden_bytes(model, micro_batch * (1.0 + work.prompt_tokens_per_decode_token),
                                 work.precision) / layout.tpa
    total = np.zeros_like(micro_batch)
    sg = layout.stage_gpus
    for stage in range(layout.pp - 1):
        crosses = (stage * sg) // hw.gpus_per_domain != ((stage + 1) * sg) // hw.gpus_per_domain
        total = total + exchange_time(payload, GroupPlacement(2, 0 if crosses else 1, 1 if crosses else 0), hw)
    return total


def scheduler_defaults(hw: HardwareSpec) -> tuple[int, int]:
    """``(max_num_batched_tokens, max_num_seqs)`` that vLLM 0.32's ``vllm serve`` picks on this GPU.

    From ``vllm/engine/arg_utils.py`` (``_set_default_max_num_seqs_and_batched_tokens_args``),
    which chooses by device memory: >= 160 GiB 16384 and 1024, >= 70 GiB 8192 and
    1024, else 2048 and 256.
    """
    gib = 2**30
    if hw.memory_capacity >= 160 * gib:
        return 16384, 1024
    if hw.memory_capacity >= 70 * gib:
        return 8192, 1024
    return 2048, 256


def scheduler_limits(hw: HardwareSpec, layout: Layout, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per engine, the ``max_num_batched_tokens`` and ``max_num_seqs`` a batch needs (>= vLLM's defaults).

    Under DP attention every attention rank is an engine with its own scheduler
    holding ``batch / dpa`` requests.
    """
    tokens, seqs = scheduler_defaults(hw)
    per_engine = np.ceil(np.asarray(batch, dtype=float) / layout.dpa)
    return np.maximum(tokens, per_engine), np.maximum(seqs, per_engine)


def workspace_bytes(model: ModelSpec, layout: Layout, hw: HardwareSpec, batch: np.ndarray) -> np.ndarray:
    """Activation memory vLLM reserves on one GPU before it sizes the KV cache (an estimate).

    At start-up vLLM runs the model on ``max_num_batched_tokens`` dummy tokens and
    the sampler on ``max_num_seqs`` rows, and keeps their peak free for activations.
    The forward's peak is priced at the widest point of a layer (the residual
    stream twice, plus the attention's q/k/v-sized buffers or the FFN's gate/up
    and activation buffers, for this rank's share of the heads and intermediate
    width), in the compute format (fp32 for fp32 models, bf16 otherwise); the
    sampler's at two fp32 ``[seqs, vocab]`` buffers (logits, probabilities).
    """
    tokens, seqs = scheduler_limits(hw, layout, batch)
    dense_width = _dense_width(layout)
    attention = 3.0 * model.num_q_heads / layout.tpa * model.head_dim
    ffn = 3.0 * model.intermediate_size / dense_width
    if model.is_moe:
        ffn = max(ffn, model.experts_per_token * (3.0 * model.moe_intermediate_size / layout.tpf + model.hidden_size))
    per_token = 2.0 * model.hidden_size + max(attention, ffn)
    activation_bytes = 4.0 if model.dtype == "fp32" else 2.0
    return np.maximum(tokens * per_token * activation_bytes, 2.0 * seqs * model.vocab_size * 4.0)


def memory_per_gpu(model: ModelSpec, layout: Layout, work: Workload, batch: np.ndarray,
                   hw: HardwareSpec) -> np.ndarray:
    """Bytes the fullest GPU needs: its weights (all experts it owns), its KV cache, vLLM's
    activation workspace (:func:`workspace_bytes`) and the runtime's own reserve.

    The fullest GPU is one of the stage with the most layers; under Medha it is in
    the TP group that also holds the FFN. Embedding and LM head are charged to every
    stage (split like ``o_proj``), a slight over-estimate under PP. Compare with
    :func:`memory_budget`, not with the whole memory.
    """
    p = work.precision
    requests = np.ceil(np.asarray(batch, dtype=float) / layout.dpa)
    dense_width = _dense_width(layout)
    worst = np.zeros_like(requests)
    for stage in pipeline_stages(model.layer_kinds(), layout.pp):
        params = sum(loads.attention_input_params(model, layout.tpa)
                     + model.output_projection_params / _output_width(layout)
                     + loads.ffn_stored_params(model, kind, layout.tpf, layout.ep, dense_width)
                     for kind in stage)
        kv = len(stage) * loads.kv_cache_bytes(model, layout.tpa, layout.kvp, requests, work.context, p)
        worst = np.maximum(worst, params * p.weight_bytes + kv)
    return (worst + model.embedding_params / _output_width(layout) * p.weight_bytes
            + workspace_bytes(model, layout, hw, np.asarray(batch, dtype=float)) + hw.runtime_reserve)


def memory_budget(hw: HardwareSpec, work: Workload) -> float:
    """What vLLM lets one instance use per GPU: ``--gpu-memory-utilization`` of its memory."""
    return hw.memory_capacity * work.memory_utilization


def step_cost(model: ModelSpec, hw: HardwareSpec, layout: Layout, work: Workload,
              batch: np.ndarray | list[int]) -> StepCost:
    """Price one decode step of ``layout`` for every batch size in ``batch``.

    ``batch`` counts all sequences in flight on the instance (under PP, ``PP``
    micro-batches of ``batch / PP``). A point is feasible when the batch splits into
    whole micro-batches and weights plus KV fit in every GPU's memory.
    """
    batch = np.asarray(batch, dtype=float)
    micro_batch = batch / layout.pp
    place = _Placements.of(layout, hw)
    kinds = model.layer_kinds()
    layers = {kind: _layer_cost(model, hw, layout, work, kind, micro_batch, place) for kind in set(kinds)}
    head_tokens = np.ceil(micro_batch / layout.dpa)
    head = roofline(loads.lm_head(model, place.output_width, head_tokens, work.precision), hw, work.precision)

    terms = {name: np.zeros_like(batch) for name in TERMS}
    counts = {kind: kinds.count(kind) for kind in layers}
    for kind, layer in layers.items():
        _add(terms, layer.terms, counts[kind])
    _add(terms, head)

    micro_batches = np.ones_like(batch)
    if layout.pp > 1:
        stage_times = [sum(sum(layers[kind].terms.values()) for kind in stage)
                       for stage in pipeline_stages(kinds, layout.pp)]
        stage_times[-1] = stage_times[-1] + sum(head.values())
        terms["pipeline_send"] = _pipeline_sends(model, hw, layout, micro_batch, work)
        busy = sum(stage_times) + terms["pipeline_send"]
        terms["pipeline_bubble"] = np.maximum(busy, layout.pp * np.maximum.reduce(stage_times)) - busy
    if layout.hopb:
        hidden, micro_batches = _hopb_overlap(layers, counts, micro_batch, place, hw)
        terms["hopb_hidden"] = -hidden
    if hw.calibration is not None:  # every layer's and the step's fixed costs, once per step
        terms["fixed"] = _engine_costs(model, hw, layout).fixed(len(kinds), head_tokens)

    ttl = sum(terms.values())
    memory = memory_per_gpu(model, layout, work, batch, hw)
    feasible = (memory <= memory_budget(hw, work)) & (batch >= 1) & (np.mod(batch, layout.pp) == 0)
    return StepCost(layout, batch, ttl, terms, memory, feasible, micro_batches.astype(int))


def max_sequences(model: ModelSpec, hw: HardwareSpec, layout: Layout, work: Workload) -> int:
    """The most sequences of ``work.context`` tokens that fit next to the weights and workspace (0: none).

    Under DP attention a rank holds ``1/dpa`` of them. Memory grows with the batch
    (the KV share, and the workspace once the batch passes vLLM's default
    ``max_num_seqs``), so the largest fitting count is found by bisection below
    the bound the KV share alone gives.
    """
    budget = memory_budget(hw, work)

    def fits(per_rank: int) -> bool:
        return bool(memory_per_gpu(model, layout, work, np.array([float(per_rank * layout.dpa)]), hw)[0] <= budget)

    if not fits(0):
        return 0
    empty, one = memory_per_gpu(model, layout, work, np.array([0.0, float(layout.dpa)]), hw)
    low, high = 0, int((budget - empty) // (one - empty)) + 1  # fits(low); not fits(high) or past the bound
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * layout.dpa
