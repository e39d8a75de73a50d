"""What each operation of one decode layer reads and computes on one GPU.

Every strategy (TP, TP x PP, DP attention + EP, Medha-style KVP, Helix) is the
same sequence of operations with different widths, so each operation has exactly
one function here and the strategies only choose the widths and token counts:

* ``tpa``: ranks the query heads are split over (KV heads split up to their
  count, then replicated: the KV duplication of wide TP);
* ``kvp``: ranks the sequence (KV history) is split over;
* ``width``: ranks a row/column-parallel weight is split over;
* ``tokens``: tokens this GPU pushes through a weight (all of the batch when
  activations are replicated, its own share under data parallelism).

An :class:`OpLoad` is bytes of weights, bytes of KV cache and FLOPs; time comes
from the roofline in :mod:`vllm_helix.planner.cost`. Activation reads and writes
(a few ``tokens x hidden`` vectors per operation) are left out: at the batch sizes
where they would matter the weights and KV cache are far larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_helix.planner.model_spec import ModelSpec
from vllm_helix.planner.precision import Precision

ArrayLike = np.ndarray | float

LSE_BYTES = 4  # the fp32 log-sum-exp that travels with each head's partial output


@dataclass(frozen=True)
class OpLoad:
    """Per-GPU work of one operation: bytes of weights and KV cache read, FLOPs done."""

    weight_bytes: ArrayLike = 0.0
    kv_bytes: ArrayLike = 0.0
    flops: ArrayLike = 0.0


def kv_head_share(model: ModelSpec, tpa: int) -> float:
    """Fraction of a layer's KV heads one rank stores when heads are split ``tpa`` ways.

    Below the KV head count the heads divide; above it every rank still needs one
    whole KV head, so the cache is duplicated ``tpa / num_kv_heads`` times (MLA has
    one latent head, so every TP rank holds the whole latent).
    """
    return 1.0 / min(tpa, model.num_kv_heads)


def attention_input_params(model: ModelSpec, tpa: int) -> float:
    """Weights one rank holds to project its heads' queries (and keys/values)."""
    return (model.latent_projection_params + model.query_head_params / tpa
            + model.kv_head_params * kv_head_share(model, tpa))


def attention_input(model: ModelSpec, tpa: int, tokens: ArrayLike, precision: Precision) -> OpLoad:
    """QKV projection of ``tokens`` tokens for this rank's ``1/tpa`` of the heads."""
    params = attention_input_params(model, tpa)
    return OpLoad(weight_bytes=params * precision.weight_bytes, flops=2.0 * np.asarray(tokens) * params)


def kv_cache_bytes(model: ModelSpec, tpa: int, kvp: int, requests: ArrayLike, context: float,
                   precision: Precision) -> ArrayLike:
    """KV bytes of one layer that one rank holds (and decode reads whole each step)."""
    return (np.asarray(requests) * (context / kvp) * model.kv_elements_per_token
            * kv_head_share(model, tpa) * precision.kv_bytes)


def attention_core(model: ModelSpec, tpa: int, kvp: int, requests: ArrayLike, context: float,
                   precision: Precision, extra_flops: ArrayLike = 0.0) -> OpLoad:
    """Decode attention over this rank's KV shard: ``context/kvp`` tokens, ``H/tpa`` heads.

    ``extra_flops`` carries prompt attention when prefill chunks share the step.
    """
    flops = (np.asarray(requests) * (context / kvp) * (model.num_q_heads / tpa)
             * model.decode_flops_per_context_token)
    return OpLoad(kv_bytes=kv_cache_bytes(model, tpa, kvp, requests, context, precision),
                  flops=flops + extra_flops)


def attention_output(model: ModelSpec, width: int, tokens: ArrayLike, precision: Precision) -> OpLoad:
    """``o_proj`` split row-wise over ``width`` ranks (each holds ``H/width`` whole heads)."""
    params = model.output_projection_params / width
    return OpLoad(weight_bytes=params * precision.weight_bytes, flops=2.0 * np.asarray(tokens) * params)


def dense_ffn(model: ModelSpec, width: int, tokens: ArrayLike, precision: Precision) -> OpLoad:
    """Dense SwiGLU FFN split ``width`` ways (``width=1``: replicated, as under DP)."""
    params = model.dense_ffn_params / width
    return OpLoad(weight_bytes=params * precision.weight_bytes, flops=2.0 * np.asarray(tokens) * params)


def experts_read(model: ModelSpec, ep: int, routed_tokens: ArrayLike) -> ArrayLike:
    """Whole experts the busiest rank of an ``ep``-way expert split reads this step.

    With routing uniform and independent across tokens, an expert is untouched by
    ``T`` tokens with probability ``(1 - k/E)^T``; a rank holds ``E/ep`` experts and
    must read at least the ceiling of its expected touched count (an expert is read
    whole or not at all), never more than it holds.
    """
    local = model.num_experts / ep
    touched = local * (1.0 - (1.0 - model.experts_per_token / model.num_experts) ** np.asarray(routed_tokens))
    return np.minimum(local, np.ceil(touched - 1e-9))


def moe_ffn(model: ModelSpec, tpf: int, ep: int, routed_tokens: ArrayLike, dense_width: int,
            dense_tokens: ArrayLike, precision: Precision) -> OpLoad:
    """Routed experts on a ``tpf x ep`` grid, plus the shared expert and router.

    ``routed_tokens`` is every token the grid serves (the whole batch); each expert
    is split ``tpf`` ways and routing is assumed balanced over the ``ep`` groups.
    The shared expert and router see ``dense_tokens`` per rank with the shared
    expert split ``dense_width`` ways (1 = replicated under DP attention).
    """
    routed_tokens = np.asarray(routed_tokens)
    dense_tokens = np.asarray(dense_tokens)
    weights = (experts_read(model, ep, routed_tokens) * model.expert_params / tpf
               + model.shared_expert_params / dense_width + model.router_params)
    flops = 2.0 * (routed_tokens * model.experts_per_token * model.expert_params / (ep * tpf)
                   + dense_tokens * (model.shared_expert_params / dense_width + model.router_params))
    return OpLoad(weight_bytes=weights * precision.weight_bytes, flops=flops)


def lm_head(model: ModelSpec, width: int, tokens: ArrayLike, precision: Precision) -> OpLoad:
    """Logits for each sequence's new token, vocabulary split ``width`` ways."""
    params = model.lm_head_params / width
    return OpLoad(weight_bytes=params * precision.weight_bytes, flops=2.0 * np.asarray(tokens) * params)


def prompt_attention_flops(model: ModelSpec, prompt_tokens: ArrayLike, prompt_length: float) -> ArrayLike:
    """One layer's attention FLOPs for prompt tokens processed as chunks of a causal prefill.

    A prompt token attends to on average half of its prompt, so a prompt of length
    ``P`` costs ``P * P/2`` token pairs per head.
    """
    return (np.asarray(prompt_tokens) * (prompt_length / 2.0) * model.num_q_heads
            * model.prefill_flops_per_context_token)


def partial_output_bytes(model: ModelSpec, heads: float, requests: ArrayLike, precision: Precision) -> ArrayLike:
    """Partial attention outputs (and their fp32 LSE) for ``heads`` heads of ``requests`` sequences."""
    return (np.asarray(requests) * heads
            * (model.partial_output_elements * precision.activation_bytes + LSE_BYTES))


def hidden_bytes(model: ModelSpec, tokens: ArrayLike, precision: Precision) -> ArrayLike:
    """Hidden states of ``tokens`` tokens: the payload of all-reduces, dispatch and pipeline sends."""
    return np.asarray(tokens) * model.hidden_size * precision.activation_bytes


def ffn_stored_params(model: ModelSpec, kind: str, tpf: int, ep: int, dense_width: int) -> float:
    """FFN weights one rank stores for a layer of ``kind`` (all of its experts, touched or not)."""
    if kind == "dense":
        return model.dense_ffn_params / dense_width
    return (model.num_experts / ep * model.expert_params / tpf
            + model.shared_expert_params / dense_width + model.router_params)
