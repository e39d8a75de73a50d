"""Helix attention for GQA/MHA models on vLLM's CPU platform (replaces ``CPU_ATTN``).

Without Helix (or with kvp == 1) every call goes to vLLM's own CPU backend
unchanged. With kvp > 1, one forward on one rank is (shapes for T query
tokens, H query heads, N = kvp * tpa ranks, D head dim):

1. ``do_kv_cache_update``: write the K/V of this step's tokens *that this rank
   owns* (vLLM's slot mapping, striped by the plugin, marks the others -1).
   In Helix mode the cache ``[blocks, kv_heads, block_size, 2 * D]`` holds K in
   ``[..., :D]`` and V in ``[..., D:]``: the backend both writes and reads it,
   so it does not depend on the ISA-specific packing of vLLM's C++ kernels.
2. all-gather the query over the KVP group: ``[T, H/N, D] -> [T, H/TPA, D]``
   (vLLM's TP split the heads N ways; the KVP group shares one KV head).
3. :func:`vllm_helix.attention.paged_extend`: each query token over the prefix of
   this rank's shard it may see (causal), each sequence's shard read once,
   giving partial out + LSE;
4. :func:`vllm_helix.attention.helix_decode`: the all-to-all over the KVP group
   and the exact LSE merge, micro-batched for HOP-B -> ``[T, H/N, D]``, the
   heads vLLM's row-parallel ``o_proj`` on this rank expects.

Prefill and decode take the same path (a prefill token is a decode against a
shorter prefix), so mixed batches, chunked prefill and prefix-cache hits need
nothing special.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm_helix.attention import helix_decode, paged_extend
from vllm_helix.attention.paged_cache import append_kv
from vllm_helix.profiling import hop
from vllm_helix.striping import query_positions, visible_local_lengths

from patches_free_hooks.compat import HelixStartupError, internal
from patches_free_hooks.runtime import HelixRuntime, log_active_once, helix_runtime
from patches_free_hooks.slot_mapping import register_striped_slot_mapping

_cpu_attn = "vllm.v1.attention.backends.cpu_attn"
CPUAttentionBackend = internal(f"{_cpu_attn}:CPUAttentionBackend")
CPUAttentionMetadata = internal(f"{_cpu_attn}:CPUAttentionMetadata")
CPUAttentionBackendImpl = internal(f"{_cpu_attn}:CPUAttentionBackendImpl")
CPUAttentionMetadataBuilder = internal(f"{_cpu_attn}:CPUAttentionMetadataBuilder")


@dataclasses.dataclass
class HelixCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus what every Helix layer of the step reads (built once per step).

    ``helix_table``: each query token's block-table row; ``helix_visible``: the
    shard tokens it may see; ``helix_runs``: the ``[start, end)`` token runs of
    each request.
    """

    helix_table: torch.Tensor | None = None
    helix_visible: torch.Tensor | None = None
    helix_runs: list[tuple[int, int]] | None = None


class HelixCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """Adds the per-token shard prefixes Helix attention reads."""

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.helix: HelixRuntime | None = helix_runtime(vllm_config)
        if self.helix is not None and self.helix.sharded:
            if kv_cache_spec.block_size != self.helix.striping.block_size:
                raise HelixStartupError(
                    f"KV block size {kv_cache_spec.block_size} differs from the cache config's "
                    f"{self.helix.striping.block_size}; pass one --block-size"
                )
            register_striped_slot_mapping()

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False):
        if self.helix is None or not self.helix.sharded:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        with hop("helix/metadata"):
            return self._build_helix(common_prefix_len, common_attn_metadata, fast_build)

    def _build_helix(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool):
        assert self.helix is not None
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        query_start_loc = common_attn_metadata.query_start_loc[: num_reqs + 1]
        rows, positions = query_positions(query_start_loc, common_attn_metadata.seq_lens[:num_reqs])
        visible = visible_local_lengths(self.helix.striping, positions, self.helix.kvp_rank)
        starts = query_start_loc.tolist()
        starts = [start - starts[0] for start in starts]
        runs = [(start, end) for start, end in zip(starts[:-1], starts[1:]) if end > start]
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        return HelixCPUAttentionMetadata(**fields, helix_table=metadata.block_table[rows], helix_visible=visible,
                                         helix_runs=runs)


class HelixCPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, or Helix attention when kvp > 1 (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        runtime = helix_runtime()
        self.helix = runtime if runtime is not None and runtime.sharded else None
        if self.helix is None:
            return
        unsupported = {
            "sliding window": self.sliding_window != -1,
            "ALiBi": self.alibi_slopes is not None,
            "logit soft-capping": bool(self.logits_soft_cap),
            "attention sinks": self.sinks is not None,
            f"attention type {self.attn_type!r}": self.attn_type != "decoder",
            f"kv cache dtype {self.kv_cache_dtype!r}": self.kv_cache_dtype != "auto",
        }
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise HelixStartupError(
                f"Helix attention does not support {', '.join(refused)} (this model uses them); "
                "serve it without the helix option"
            )
        # vLLM checks these per instance before it lets DCP start.
        self.can_return_lse_for_decode = True
        self.supports_dcp = True
        self.need_to_return_lse_for_decode = True
        log_active_once(self.helix, "GQA")

    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self.helix is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        with hop("helix/kv_append"):
            append_kv(kv_cache, key, value, slot_mapping)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.helix is None or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        num_tokens = attn_metadata.num_actual_tokens
        group = internal("vllm.distributed.parallel_state:get_dcp_group")()
        with hop("helix/query_all_gather"):
            slice_query = group.all_gather(query[:num_tokens].contiguous(), dim=1)  # [T, H/TPA, D]
        head_dim = self.head_size
        key_cache = kv_cache[..., :head_dim].transpose(1, 2)  # [blocks, block_size, kv_heads, D]
        value_cache = kv_cache[..., head_dim:].transpose(1, 2)

        runs = attn_metadata.helix_runs

        def shard_attention(q: torch.Tensor, table: torch.Tensor, lens: torch.Tensor):
            whole_batch = q.shape[0] == num_tokens  # HOP-B micro-batches find their own runs
            return paged_extend(q, key_cache, value_cache, table, lens, self.scale,
                                runs=runs if whole_batch else None)

        out, _ = helix_decode(
            shard_attention,
            slice_query,
            attn_metadata.helix_table,
            attn_metadata.helix_visible,
            self.helix.exchange,
            self.helix.config.hopb,
        )
        output[:num_tokens].copy_(out.reshape(output[:num_tokens].shape))
        return output


class HelixCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with the Helix impl and builder (same name, same cache shape)."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[HelixCPUAttentionImpl]:
        return HelixCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HelixCPUAttentionMetadataBuilder]:
        return HelixCPUAttentionMetadataBuilder
