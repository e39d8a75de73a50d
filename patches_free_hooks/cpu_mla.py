"""Helix attention for MLA models (DeepSeek) on vLLM's CPU platform (replaces ``CPU_MLA``).

vLLM's MLA layer already orchestrates decode-context parallelism: it absorbs
``W_UK`` into the query, all-gathers the query over the KVP (DCP) group, calls
the backend's ``forward_mqa`` and then ``layer.dcp_manager.combine`` on the
partial output and LSE. vLLM's CPU MLA backend cannot return the LSE, so DCP
refuses to start; this backend provides it. One decode on one rank (B
sequences, H heads, latent 512 + rope 64):

1. query ``[B, H, 576]`` (absorbed, all heads: MLA has TPA = 1);
2. :func:`vllm_helix.attention.paged_decode_mla` over this rank's shard of the
   latent cache ``[blocks, 16, 576]`` -> partial ``[B, H, 512]`` + LSE;
3. :func:`vllm_helix.attention.helix_decode`: all-to-all + exact merge, HOP-B
   micro-batched -> ``[B, H/N, 512]``, the heads this rank's ``W_UV`` / ``o_proj``
   slice needs.

Because step 3 already produced the combined heads (overlapped with the next
micro-batch's attention, which vLLM's combine-after-attention order cannot
express), the layer's ``dcp_manager.combine`` is set to pass them through.
Prefill is vLLM's own (the CPU platform disables chunked prefill and prefix
caching for MLA, so a prompt attends only its own, locally computed K/V).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_helix.attention import helix_decode, paged_decode_mla
from vllm_helix.profiling import hop

from patches_free_hooks.compat import internal
from patches_free_hooks.runtime import HelixRuntime, log_active_once, helix_runtime
from patches_free_hooks.slot_mapping import register_striped_slot_mapping

_cpu_mla = "vllm.v1.attention.backends.mla.cpu_mla"
CPUMLABackend = internal(f"{_cpu_mla}:CPUMLABackend")
CPUMLAImpl = internal(f"{_cpu_mla}:CPUMLAImpl")


def _already_combined(partial_output: torch.Tensor, partial_lse: torch.Tensor, **_: Any) -> torch.Tensor:
    """``dcp_manager.combine`` for outputs that Helix combined inside ``forward_mqa``."""
    return partial_output


class HelixCPUMLAImpl(CPUMLAImpl):
    """vLLM's CPU MLA, with an LSE-returning Helix decode when kvp > 1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        runtime = helix_runtime()
        self.helix: HelixRuntime | None = runtime if runtime is not None and runtime.sharded else None
        if self.helix is None:
            return
        register_striped_slot_mapping()
        # CPUMLAImpl.__init__ pins DCP off; restore what the base class derived.
        self.dcp_world_size, self.dcp_rank = internal(
            "vllm.distributed.parallel_state:get_dcp_world_size_and_rank"
        )()
        self.total_cp_world_size, self.total_cp_rank = self.dcp_world_size, self.dcp_rank
        self.cp_kv_cache_interleave_size = self.helix.striping.stripe
        self.can_return_lse_for_decode = True
        self.supports_dcp = True
        self.need_to_return_lse_for_decode = True
        log_active_once(self.helix, "MLA")

    def forward_mqa(self, q: Any, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: Any,
                    layer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.helix is None:
            return super().forward_mqa(q, kv_c_and_k_pe_cache, attn_metadata, layer)
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        decode = attn_metadata.decode
        total = decode.dcp_tot_seq_lens
        with hop("helix/metadata"):
            local = self.helix.striping.local_lengths(total)[self.helix.kvp_rank]
        layer.dcp_manager.combine = _already_combined

        def shard_attention(query: torch.Tensor, table: torch.Tensor, lens: torch.Tensor):
            return paged_decode_mla(query, kv_c_and_k_pe_cache, table, lens, self.scale, self.kv_lora_rank)

        return helix_decode(shard_attention, q, decode.block_table, local,
                            self.helix.exchange, self.helix.config.hopb)


class HelixCPUMLABackend(CPUMLABackend):
    """``CPU_MLA`` with the Helix impl (same name, cache shape and builder)."""

    @staticmethod
    def get_name() -> str:
        return "CPU_MLA"

    @staticmethod
    def get_impl_cls() -> type[HelixCPUMLAImpl]:
        return HelixCPUMLAImpl
