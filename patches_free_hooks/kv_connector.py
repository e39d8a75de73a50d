"""``HelixConnector``: prefill on one engine, decode on another (Helix or not), over vLLM's KV connector API.

Selected with ``--kv-transfer-config '{"kv_connector": "HelixConnector", "kv_role":
"kv_producer" | "kv_consumer" | "kv_both", "kv_connector_extra_config": {"path": DIR}}'``
on both servers (the plugin registers the name; ``kv_connector_module_path:
"patches_free_hooks.kv_connector"`` works too). Either side may be plain vLLM (any
TP) or Helix (any kvp x tpa): every byte goes through the canonical, token-ordered
form of :mod:`vllm_helix.kv_handoff`, written to and read from the local-file store
of :mod:`vllm_helix.kv_store`, so neither side's block packing or striping leaks
into the other.

Producer: when a prompt's last token has been computed, every writer rank (all
Helix ranks; for plain TP the first rank holding each KV head) writes its share of
each layer, and the scheduler publishes the entry once that step is over.
Consumer: a request whose ``L``-token prompt has an entry loads its first ``L - 1``
tokens in one synchronous step before its forward, each rank only its stripes and
its KV heads; the last prompt token is computed on the decode side (vLLM requires a
synchronous load to leave one, and its NIXL path recomputes one too), so the decode
server's first step for the request is a decode. Partial blocks need no special
case: the load writes slots, not whole blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_helix.config import from_additional_config
from vllm_helix.kv_handoff import BlockLayout, rank_tokens, tp_kv_heads
from vllm_helix.kv_store import DEFAULT_PATH, KVFileStore, entry_key
from vllm_helix.striping import KVStriping

from patches_free_hooks.compat import internal
from patches_free_hooks.kv_layouts import cpu_attn_isa, cpu_attn_layout

_base = "vllm.distributed.kv_transfer.kv_connector.v1.base"
KVConnectorBase_V1 = internal(f"{_base}:KVConnectorBase_V1")
KVConnectorMetadata = internal(f"{_base}:KVConnectorMetadata")
KVConnectorRole = internal(f"{_base}:KVConnectorRole")
_logger = logging.getLogger("vllm.helix")


@dataclass
class Transfer:
    """One request's KV to save or load this step: ``tokens`` positions from its block-table row."""

    key: str
    block_ids: list[int]
    tokens: int


@dataclass
class HelixConnectorMetadata(KVConnectorMetadata):
    saves: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)


@dataclass(frozen=True)
class _Placement:
    """Where this engine's ranks keep a sequence's KV (the same answer in scheduler and workers)."""

    kv_heads: int
    tp: int
    striping: KVStriping  # kvp = 1 and stripe = block size for a plain engine
    mla: bool

    @classmethod
    def of(cls, vllm_config: Any) -> _Placement:
        model, block_size = vllm_config.model_config, vllm_config.cache_config.block_size
        helix = from_additional_config(vllm_config.additional_config)
        striping = (KVStriping(helix.kvp, helix.stripe_for(block_size), block_size)
                    if helix is not None and helix.kvp > 1 else KVStriping(1, block_size, block_size))
        heads = 1 if model.use_mla else model.get_total_num_kv_heads()
        return cls(heads, vllm_config.parallel_config.tensor_parallel_size, striping, model.use_mla)

    def writes(self, tp_rank: int) -> bool:
        """Helix ranks hold distinct stripes: all write. Plain TP replicas of a head: the first writes."""
        replicas = max(1, self.tp // self.kv_heads)
        return self.striping.kvp > 1 or tp_rank % replicas == 0

    def writer_parts(self) -> dict[str, range]:
        """Each writer rank's part name and the KV heads it holds."""
        return {f"r{rank}": tp_kv_heads(self.kv_heads, self.tp, rank) for rank in range(self.tp) if self.writes(rank)}


class HelixConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._store = KVFileStore(Path(transfer.get_from_extra_config("path", DEFAULT_PATH)),
                                  float(transfer.get_from_extra_config("max_age_s", 3600.0)))
        self._model_id = str(transfer.get_from_extra_config("model_id", vllm_config.model_config.model))
        self._dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
        self._placement = _Placement.of(vllm_config)
        # scheduler state
        self._layers = sorted({name for group in getattr(kv_cache_config, "kv_cache_groups", [])
                               for name in group.layer_names})
        self._pending: dict[str, tuple[str, list[int], int]] = {}  # producer: prompt not finished
        self._to_load: dict[str, tuple[str, int]] = {}
        self._saved: dict[str, tuple[str, int]] = {}  # saves issued, not yet published
        self._layouts: dict[str, BlockLayout] = {}  # worker: per layer
        self._step: tuple[Any, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None  # worker: see _tokens

    # ------------------------------------------------------------------ scheduler side
    def _key(self, request: Any) -> str:
        return entry_key(self._model_id, self._dtype, request.prompt_token_ids or [])

    def _loadable(self, request: Any) -> int | None:
        """Tokens this engine would load for ``request``: 0 for none, None to ask again later."""
        prompt = len(request.prompt_token_ids or [])
        stored = self._store.tokens(self._key(request))
        if not stored:
            return stored
        # vLLM needs a synchronous load to leave a token to compute; leaving exactly one makes the
        # decode side's first step a decode (an MLA prefill over loaded context would take vLLM's
        # context-parallel gather, which its CPU build lacks).
        return min(stored, prompt - 1)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._kv_transfer_config.is_kv_consumer:
            return 0, False
        loadable = self._loadable(request)
        if loadable is None:
            return None, False
        return max(0, loadable - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            tokens = int(self._loadable(request) or 0)
            self._to_load[request.request_id] = (self._key(request), tokens)
            _logger.info("HelixConnector: loading %d tokens of a %d-token prompt (request %s)", tokens,
                         len(request.prompt_token_ids or []), request.request_id)

    def _publish(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            key, tokens = self._saved.pop(req_id)
            self._store.commit(key, tokens, self._layers, self._placement.writer_parts())

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        # Saves issued in the previous step have been written: that step's forward is over.
        self._publish(list(self._saved))
        meta = HelixConnectorMetadata()
        producer = self._kv_transfer_config.is_kv_producer
        for new in scheduler_output.scheduled_new_reqs:
            blocks = list(new.block_ids[0])
            if new.req_id in self._to_load:
                key, tokens = self._to_load.pop(new.req_id)
                meta.loads.append(Transfer(key, blocks, tokens))
            elif producer:
                prompt = new.prompt_token_ids or []
                key = entry_key(self._model_id, self._dtype, prompt)
                if not self._store.tokens(key):
                    self._pending[new.req_id] = (key, blocks, len(prompt))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            if req_id in self._pending and new_blocks is not None:
                key, blocks, prompt = self._pending[req_id]
                fresh = list(new_blocks[0])
                self._pending[req_id] = (key, fresh if req_id in cached.resumed_req_ids else blocks + fresh, prompt)
            if req_id in self._to_load:  # resumed after preemption: load again into its new blocks
                key, tokens = self._to_load.pop(req_id)
                meta.loads.append(Transfer(key, list(new_blocks[0]), tokens))
        done = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
        done.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id in list(self._pending):
            if req_id not in done:
                continue
            key, blocks, prompt = self._pending[req_id]
            if done[req_id] + scheduler_output.num_scheduled_tokens.get(req_id, 0) >= prompt:
                meta.saves.append(Transfer(key, blocks, prompt))
                self._saved[req_id] = (key, prompt)
                del self._pending[req_id]
        if self._to_load:
            raise RuntimeError(f"HelixConnector: loads for {sorted(self._to_load)} were not scheduled")
        return meta

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        self._pending.pop(request.request_id, None)
        if request.request_id in self._saved:  # its last step is over: publish now, not at the next step
            self._publish([request.request_id])
        return False, None

    # ------------------------------------------------------------------ worker side
    def _tp_rank(self) -> int:
        return internal("vllm.distributed.parallel_state:get_tensor_model_parallel_rank")()

    def _layer_cache(self, layer_name: str, cache: torch.Tensor) -> tuple[torch.Tensor, BlockLayout]:
        """The layer's cache as ``[blocks, kv_heads, block_size, row]`` and where its rows sit."""
        if self._placement.mla:  # CPU_MLA's [blocks, block_size, latent]: one token-major row per slot
            if cache.dim() != 3:
                raise RuntimeError(f"HelixConnector reads MLA caches laid out as CPU_MLA's [blocks, block_size, "
                                   f"latent]; {layer_name} has {list(cache.shape)} (another MLA backend): serve "
                                   "with --attention-backend CPU_MLA")
            cache = cache.unsqueeze(1)
        if layer_name not in self._layouts:
            blocks, heads, block_size, row = cache.shape
            if self._placement.mla or self._placement.striping.kvp > 1:  # the plugin's own caches
                layout = BlockLayout(block_size, row)
            else:  # vLLM's CPU attention packing, learned from its kernel
                isa = cpu_attn_isa(cache.dtype, block_size, row // 2)
                layout = cpu_attn_layout(cache.dtype, block_size, row // 2, isa)
            self._layouts[layer_name] = layout
        return cache, self._layouts[layer_name]

    def _tokens(self, meta: HelixConnectorMetadata, transfer: Transfer) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's positions of ``transfer`` and their slots, computed once per step (vLLM calls
        ``save_kv_layer`` once per layer with the same metadata)."""
        if self._step is None or self._step[0] is not meta:
            striping, rank = self._placement.striping, self._tp_rank() % self._placement.striping.kvp
            self._step = (meta, {id(t): rank_tokens(striping, torch.tensor(t.block_ids, dtype=torch.int64),
                                                    t.tokens, rank) for t in [*meta.saves, *meta.loads]})
        return self._step[1][id(transfer)]

    def _my_heads(self) -> range:
        return tp_kv_heads(self._placement.kv_heads, self._placement.tp, self._tp_rank())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for transfer in meta.loads:
            positions, slots = self._tokens(meta, transfer)
            for name, layer in forward_context.no_compile_layers.items():
                cache = getattr(layer, "kv_cache", None)
                if not isinstance(cache, torch.Tensor):
                    continue
                cache, layout = self._layer_cache(name, cache)
                canonical = self._store.read_layer(transfer.key, name, self._my_heads(), transfer.tokens)
                layout.write(cache, slots, canonical[positions])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are synchronous, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not meta.saves or not self._placement.writes(self._tp_rank()):
            return
        cache, layout = self._layer_cache(layer_name, kv_layer)
        for transfer in meta.saves:
            positions, slots = self._tokens(meta, transfer)
            self._store.write_part(transfer.key, layer_name, f"r{self._tp_rank()}", positions, self._my_heads(),
                                   layout.read(cache, slots))

    def wait_for_save(self) -> None:
        return None  # saves are synchronous, inside each layer
