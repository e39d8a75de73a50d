"""Per-process Helix state inside a vLLM worker: layout, stripes, KVP rank, exchange.

Built lazily from the current ``VllmConfig`` the first time a backend asks, and
cached for the process: every attention layer of a worker shares one
:class:`~vllm_helix.attention.KVPExchange` over vLLM's DCP group (which *is*
the KVP group: vLLM's DCP ranks are consecutive TP ranks, the Helix layout's
``rank = tpa_index * kvp + kvp_index``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vllm_helix.attention import KVPExchange
from vllm_helix.config import HelixConfig, from_additional_config
from vllm_helix.striping import KVStriping

from patches_free_hooks.compat import HelixStartupError, internal
from patches_free_hooks.cpu_collectives import enable_shared_memory_all_gather


@dataclass(frozen=True)
class HelixRuntime:
    """What a worker's Helix backends need at every step."""

    config: HelixConfig
    striping: KVStriping
    kvp_rank: int
    exchange: KVPExchange | None  # None when kvp == 1 (plain TP attention)

    @property
    def sharded(self) -> bool:
        """True when the KV cache is split along the sequence (kvp > 1)."""
        return self.config.kvp > 1


# id(vllm_config) -> (the config itself, its runtime). Holding the config keeps its id from being reused by
# another engine's config in the same process (an id alone can name a dead object's successor).
_CACHE: dict[int, tuple[Any, HelixRuntime | None]] = {}
_logger = logging.getLogger("vllm.helix")
_logged: set[str] = set()


def log_active_once(runtime: HelixRuntime, attention: str) -> None:
    """One line per worker and attention kind, so a user (and a test) can see Helix is on."""
    if attention in _logged:
        return
    _logged.add(attention)
    route = "none"
    if runtime.exchange is not None:  # the transport too: across nodes it is the group's backend over TCP
        route = ("shared-memory all-gather" if runtime.exchange.all_gather is not None else
                 f"all-to-all over {torch.distributed.get_backend(runtime.exchange.group)}")
    _logger.info(
        "Helix %s attention active: %s, KVP rank %d of %d, stripe %d tokens, exchange: %s",
        attention, runtime.config.to_cli(), runtime.kvp_rank, runtime.config.kvp, runtime.striping.stripe, route,
    )


def helix_runtime(vllm_config: Any | None = None) -> HelixRuntime | None:
    """The Helix state of this worker, or ``None`` when Helix is not requested."""
    if vllm_config is None:
        vllm_config = internal("vllm.config:get_current_vllm_config")()
    key = id(vllm_config)
    if key in _CACHE and _CACHE[key][0] is vllm_config:
        return _CACHE[key][1]
    helix = from_additional_config(vllm_config.additional_config)
    runtime = None
    if helix is not None:
        parallel = vllm_config.parallel_config
        if parallel.decode_context_parallel_size != helix.kvp:
            raise HelixStartupError(
                f"helix kvp={helix.kvp} but vLLM runs decode_context_parallel_size="
                f"{parallel.decode_context_parallel_size}: the plugin's engine hook did not "
                "run; start through `vllm serve`/`vllm-helix serve`/vllm.LLM with the plugin "
                "installed"
            )
        block_size = vllm_config.cache_config.block_size
        stripe = helix.stripe_for(block_size)
        if stripe != parallel.cp_kv_cache_interleave_size:
            raise HelixStartupError(
                f"helix stripe={stripe} but cp_kv_cache_interleave_size="
                f"{parallel.cp_kv_cache_interleave_size}; drop --cp-kv-cache-interleave-size"
            )
        exchange, rank = None, 0
        if helix.kvp > 1:
            group = internal("vllm.distributed.parallel_state:get_dcp_group")()
            rank = group.rank_in_group
            exchange = KVPExchange(group.device_group, helix.kvp, enable_shared_memory_all_gather(group))
        runtime = HelixRuntime(helix, KVStriping(helix.kvp, stripe, block_size), rank, exchange)
    _CACHE[key] = (vllm_config, runtime)
    return runtime
