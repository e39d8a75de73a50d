"""Per-process Helix state inside a vLLM worker: layout, stripes, KVP rank, exchange.

Built lazily from the current ``VllmConfig`` the first time a backend asks (from the
engine's one resolved layout, :mod:`patches_free_hooks.engine_helix`), and kept on that
config: every attention layer of a worker shares one
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
from vllm_helix.config import HelixConfig
from vllm_helix.striping import KVStriping

from patches_free_hooks.compat import internal
from patches_free_hooks.cpu_collectives import enable_shared_memory_all_gather
from patches_free_hooks.engine_helix import engine_helix, held


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
    """The Helix state of this worker, or ``None`` when Helix is not requested (kept on the config)."""
    if vllm_config is None:
        vllm_config = internal("vllm.config:get_current_vllm_config")()
    return held(vllm_config, "_vllm_helix_runtime", _build_runtime)


def _build_runtime(vllm_config: Any) -> HelixRuntime | None:
    layout = engine_helix(vllm_config)
    if layout is None:
        return None
    exchange, rank = None, 0
    if layout.config.kvp > 1:
        group = internal("vllm.distributed.parallel_state:get_dcp_group")()
        rank = group.rank_in_group
        exchange = KVPExchange(group.device_group, layout.config.kvp, enable_shared_memory_all_gather(group))
    return HelixRuntime(layout.config, layout.striping, rank, exchange)
