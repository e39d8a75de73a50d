"""The engine's Helix layout, resolved once per ``VllmConfig`` and held on it.

vLLM carries the layout as ``additional_config["helix"]`` (written by the engine hook,
:func:`patches_free_hooks.engine_config.apply_helix`, with the stripe resolved). Every
reader in the engine and its workers (the attention runtime, the KV connector, the
MoE grid hook) takes it from :func:`engine_helix`: one parse, one check against vLLM's
parallel settings, one :class:`~vllm_helix.striping.KVStriping`, kept on the config
object itself (a private attribute), so a second engine in the same process, or a
config that reuses a dead one's ``id()``, can never see another engine's layout.
A copy of the config whose ``additional_config`` is another object resolves again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from vllm_helix.config import HelixConfig, from_additional_config
from vllm_helix.striping import KVStriping

from patches_free_hooks.compat import HelixStartupError

T = TypeVar("T")


@dataclass(frozen=True)
class EngineHelix:
    """One engine's layout and where its ranks keep each token's KV."""

    config: HelixConfig
    striping: KVStriping


def held(vllm_config: Any, name: str, build: Callable[[Any], T]) -> T:
    """``build(vllm_config)``, computed once per config and kept on it under ``name``.

    Keyed on the identity of the config's ``additional_config`` too: a copy that replaced
    it (another layout) is built afresh.
    """
    slot = vars(vllm_config).get(name)
    if slot is not None and slot[0] is vllm_config.additional_config:
        return slot[1]
    value = build(vllm_config)
    object.__setattr__(vllm_config, name, (vllm_config.additional_config, value))
    return value


def _resolve(vllm_config: Any) -> EngineHelix | None:
    helix = from_additional_config(vllm_config.additional_config)
    if helix is None:
        return None
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
    return EngineHelix(helix, KVStriping(helix.kvp, stripe, block_size))


def engine_helix(vllm_config: Any) -> EngineHelix | None:
    """This engine's Helix layout, or ``None`` when it runs without Helix."""
    return held(vllm_config, "_vllm_helix_layout", _resolve)
