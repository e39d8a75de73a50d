"""``HelixConnector``: prefill on one engine, decode on another (Helix or not), over vLLM's KV connector API.

Selected with ``--kv-transfer-config '{"kv_connector": "HelixConnector", "kv_role":
"kv_producer" | "kv_consumer" | "kv_both", "kv_connector_extra_config": {...}}'`` on
both servers (the plugin registers the name; ``kv_connector_module_path:
"patches_free_hooks.kv_connector"`` works too). The options are
:class:`vllm_helix.kv_store.StoreConfig`'s, checked at start-up on both sides. Either
side may be plain vLLM (any TP) or Helix (any kvp x tpa): every byte goes through the
canonical, token-ordered form of :mod:`vllm_helix.kv_handoff`, written to and read
from the store of :mod:`vllm_helix.kv_store`, so neither side's block packing or
striping leaks into the other.

Producer: when a prompt's last token has been computed, every writer rank (all
Helix ranks; for plain TP the first rank holding each KV head) writes its share of
each layer into a staging directory the scheduler made, and reports what it wrote
(sizes, checksums) through vLLM's worker metadata; the scheduler publishes the entry
when every writer's report is in, in the same ``update_from_output`` that answers the
request (so a router's decode request finds it). A write error anywhere drops the
entry whole, logged once and counted; the request is answered as usual.

Consumer: a request whose ``L``-token prompt has an entry loads what vLLM's prefix
cache does not already hold of its first ``L - 1`` tokens, in one synchronous step
before its forward, each rank only its stripes and its KV heads; the last prompt
token is computed on the decode side (vLLM requires a synchronous load to leave one),
so the decode server's first step for the request is a decode. A load never writes a
block the request shares through the prefix cache. A load that fails any check
writes nothing, and its blocks are reported through ``get_block_ids_with_load_errors``,
so vLLM's ``kv_load_failure_policy`` decides (``recompute`` the request, or ``fail``
it alone; vLLM 0.32's default is ``fail``); the engine keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_helix.kv_handoff import BlockLayout, rank_tokens, tp_kv_heads
from vllm_helix.kv_store import KVFileStore, KVStoreError, PartRecord, StoreConfig, entry_key, private_root
from vllm_helix.kv_store_janitor import JanitorThread, StoreJanitor
from vllm_helix.striping import KVStriping

from patches_free_hooks.compat import internal
from patches_free_hooks.engine_helix import engine_helix
from patches_free_hooks.kv_connector_stats import HelixConnectorStats, HelixPromMetrics
from patches_free_hooks.cpu_block_packing import cpu_attn_isa, cpu_attn_layout

_base = "vllm.distributed.kv_transfer.kv_connector.v1.base"
KVConnectorBase_V1 = internal(f"{_base}:KVConnectorBase_V1")
KVConnectorMetadata = internal(f"{_base}:KVConnectorMetadata")
KVConnectorRole = internal(f"{_base}:KVConnectorRole")
KVConnectorWorkerMetadata = internal(f"{_base}:KVConnectorWorkerMetadata")
_logger = logging.getLogger("vllm.helix")
_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
                 "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
                 "float32": torch.float32, "float": torch.float32}
_SAVE_PATIENCE = 4  # engine steps a save may go without any writer's report before it is dropped


@dataclass
class Transfer:
    """One request's KV to save or load this step: positions ``[start, end)`` through its block-table row."""

    key: str
    block_ids: list[int]
    start: int
    end: int
    staging: str = ""  # saves: the staging directory the writers fill


@dataclass
class HelixConnectorMetadata(KVConnectorMetadata):
    saves: list[Transfer] = field(default_factory=list)
    loads: list[Transfer] = field(default_factory=list)


@dataclass
class HelixWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: what each writer wrote per staging directory, and what failed."""

    records: dict[str, list[PartRecord]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def aggregate(self, other: Any) -> HelixWorkerMetadata:
        for staging, records in getattr(other, "records", {}).items():
            self.records.setdefault(staging, []).extend(records)
        self.failed.update(getattr(other, "failed", {}))
        return self


@dataclass
class _Save:
    key: str
    tokens: int
    records: list[PartRecord] = field(default_factory=list)
    waited: int = 0


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
        helix = engine_helix(vllm_config)
        striping = (helix.striping if helix is not None and helix.config.kvp > 1
                    else KVStriping(1, block_size, block_size))
        heads = 1 if model.use_mla else model.get_total_num_kv_heads()
        return cls(heads, vllm_config.parallel_config.tensor_parallel_size, striping, model.use_mla)

    def writes(self, tp_rank: int) -> bool:
        """Helix ranks hold distinct stripes: all write. Plain TP replicas of a head: the first writes."""
        replicas = max(1, self.tp // self.kv_heads)
        return self.striping.kvp > 1 or tp_rank % replicas == 0

    def writer_parts(self) -> dict[str, range]:
        """Each writer rank's part name and the KV heads it holds."""
        return {f"r{rank}": tp_kv_heads(self.kv_heads, self.tp, rank) for rank in range(self.tp) if self.writes(rank)}

    def blocks_of(self, transfer: Transfer) -> list[int]:
        """The block-table entries holding positions ``[start, end)`` (each covers ``block_size * kvp`` tokens)."""
        span = self.striping.block_size * self.striping.kvp
        return transfer.block_ids[transfer.start // span:-(-transfer.end // span)]


def engine_identity(vllm_config: Any, model_id: str | None) -> dict[str, str | None]:
    """What, besides a request, decides the KV of its tokens (:data:`vllm_helix.kv_store.ENGINE_FIELDS`)."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    dtype = str(model.dtype).removeprefix("torch.")
    kv = str(cache.cache_dtype)
    return {"model": model_id or str(model.model), "revision": model.revision,
            "quantization": model.quantization, "dtype": dtype,
            "kv_cache_dtype": dtype if kv == "auto" else kv}


def request_extras(request: Any) -> dict[str, Any] | None:
    """What vLLM's prefix-cache block hash adds to the token ids of ``request`` (LoRA, multimodal items,
    ``cache_salt``, prompt embeddings); ``None`` for a request this cannot represent."""
    extras: dict[str, Any] = {}
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        extras["lora"] = [str(lora.lora_name), str(lora.lora_path)]
    items = []
    for feature in getattr(request, "mm_features", None) or ():
        if getattr(feature, "identifier", None) is None:
            return None
        items.append([str(feature.identifier), int(feature.mm_position.offset), int(feature.mm_position.length)])
    if items:
        extras["mm"] = items
    if getattr(request, "cache_salt", None):
        extras["cache_salt"] = str(request.cache_salt)
    embeds = getattr(request, "prompt_embeds", None)
    if embeds is not None:
        digest = hashlib.sha256(f"{list(embeds.shape)}|{embeds.dtype}|".encode())
        digest.update(memoryview(embeds.detach().cpu().contiguous().view(torch.uint8).numpy()))
        extras["prompt_embeds"] = digest.hexdigest()
    return extras


class HelixConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self._config = StoreConfig.from_extra(transfer.kv_connector_extra_config)
        self._store = KVFileStore(private_root(self._config.path))
        self._engine = engine_identity(vllm_config, self._config.model_id)
        self._placement = _Placement.of(vllm_config)
        self._stats = HelixConnectorStats()
        # scheduler state
        self._layers = sorted({name for group in getattr(kv_cache_config, "kv_cache_groups", [])
                               for name in group.layer_names})
        self._keys: dict[str, str | None] = {}  # request id -> entry key (None: not representable)
        self._pending: dict[str, tuple[str, list[int], int]] = {}  # producer: prompt not finished
        self._saving: dict[str, _Save] = {}  # staging directory -> save in flight
        self._to_load: dict[str, tuple[str, int]] = {}  # request id -> (key, external tokens)
        self._issued: dict[str, tuple[set[int], int]] = {}  # request id -> (loaded blocks, updates since)
        self._invisible: dict[str, float] = {}  # request id -> first time its entry's parts were not all visible
        self._janitor: JanitorThread | None = None
        self._janitor_removed = 0
        if role == KVConnectorRole.SCHEDULER and transfer.is_kv_producer:
            self._janitor = JanitorThread(StoreJanitor(self._store.root, self._config.max_age_s,
                                                       self._config.max_bytes),
                                          interval_s=min(60.0, self._config.max_age_s / 4))
        # worker state
        self._layouts: dict[str, BlockLayout] = {}  # per layer
        self._step: tuple[Any, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None  # see _tokens
        self._records = HelixWorkerMetadata()
        self._invalid: set[int] = set()

    # ------------------------------------------------------------------ stats
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> HelixConnectorStats:
        return HelixConnectorStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> HelixPromMetrics:
        return HelixPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_stats(self) -> HelixConnectorStats | None:
        if self._janitor is not None and self._janitor.janitor.removed != self._janitor_removed:
            self._stats.add("evicted_entries", self._janitor.janitor.removed - self._janitor_removed)
            self._janitor_removed = self._janitor.janitor.removed
        return self._stats.take()

    def shutdown(self) -> None:
        if self._janitor is not None:
            self._janitor.stop()

    # ------------------------------------------------------------------ scheduler side
    def _key(self, request: Any) -> str | None:
        req_id = request.request_id
        if req_id not in self._keys:
            extras = request_extras(request)
            if extras is None:
                _logger.debug("HelixConnector: request %s has a multimodal item without an identifier; "
                              "its KV is neither saved nor loaded", req_id)
            self._keys[req_id] = None if extras is None else entry_key(
                self._engine, request.prompt_token_ids or [], extras)
        return self._keys[req_id]

    def _stored_tokens(self, key: str, req_id: str) -> int | None:
        """Tokens of a usable entry; 0 for none (or a broken one); None while its parts are still invisible."""
        try:
            tokens, complete = self._store.status(key)
        except KVStoreError as err:
            _logger.warning("HelixConnector: %s; request %s computes its prompt", err, req_id)
            self._stats.add("corrupt_entries")
            return 0
        if complete:
            self._invisible.pop(req_id, None)
            return tokens
        first = self._invisible.setdefault(req_id, time.monotonic())
        if time.monotonic() - first <= self._config.load_timeout_s:
            return None
        del self._invisible[req_id]
        _logger.warning("HelixConnector: entry %s is published but its parts stayed invisible for %.1f s "
                        "(load_timeout_s); request %s computes its prompt", key[:12], self._config.load_timeout_s,
                        req_id)
        return 0

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._kv_transfer_config.is_kv_consumer:
            return 0, False
        key = self._key(request)
        if key is None:
            return 0, False
        stored = self._stored_tokens(key, request.request_id)
        if stored is None:
            return None, False
        # vLLM needs a synchronous load to leave a token to compute; leaving exactly one makes the
        # decode side's first step a decode (an MLA prefill over loaded context would take vLLM's
        # context-parallel gather, which its CPU build lacks).
        loadable = min(stored, len(request.prompt_token_ids or []) - 1)
        return max(0, loadable - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        key = self._key(request)
        if num_external_tokens > 0 and key is not None:
            self._to_load[request.request_id] = (key, num_external_tokens)
            self._store.touch(key)
            self._stats.add("hits")
        elif self._kv_transfer_config.is_kv_consumer:
            self._stats.add("misses")

    def _drop(self, staging: str, reason: str) -> None:
        save = self._saving.pop(staging)
        self._store.abandon(staging)
        self._stats.add("save_failures")
        _logger.warning("HelixConnector: KV of prompt %s not stored (%s); the request is served as usual",
                        save.key[:12], reason)

    def _begin_save(self, key: str, blocks: list[int], tokens: int) -> Transfer | None:
        estimate = tokens * len(self._layers) * self._bytes_per_token_layer()
        if estimate > self._config.max_bytes:
            self._stats.add("save_failures")
            _logger.warning("HelixConnector: a %d-token prompt needs ~%d bytes, above max_bytes=%d; not stored",
                            tokens, estimate, self._config.max_bytes)
            return None
        try:
            staging = self._store.begin(key)
        except OSError as err:
            self._stats.add("save_failures")
            _logger.warning("HelixConnector: cannot stage KV of prompt %s (%s); not stored", key[:12], err)
            return None
        self._saving[staging] = _Save(key, tokens)
        return Transfer(key, blocks, 0, tokens, staging)

    def _bytes_per_token_layer(self) -> int:
        """Bytes one token of one layer takes in the store (every KV head; MLA: the latent)."""
        model = self._vllm_config.model_config
        kv = str(self._vllm_config.cache_config.cache_dtype)
        dtype = model.dtype if kv == "auto" else _CACHE_DTYPES.get(kv, torch.uint8)
        row = model.get_head_size() * (1 if self._placement.mla else 2)
        return self._placement.kv_heads * row * dtype.itemsize + 8

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        meta = HelixConnectorMetadata()
        producer = self._kv_transfer_config.is_kv_producer
        for new in scheduler_output.scheduled_new_reqs:
            blocks = list(new.block_ids[0])
            if new.req_id in self._to_load:
                meta.loads.append(self._load_transfer(new.req_id, blocks, new.num_computed_tokens,
                                                      len(new.prompt_token_ids or [])))
            elif producer and (key := self._keys.get(new.req_id)) is not None and not self._store.published(key):
                self._pending[new.req_id] = (key, blocks, len(new.prompt_token_ids or []))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            if req_id in self._pending and new_blocks is not None:
                key, blocks, prompt = self._pending[req_id]
                fresh = list(new_blocks[0])
                self._pending[req_id] = (key, fresh if req_id in cached.resumed_req_ids else blocks + fresh, prompt)
            if req_id in self._to_load:  # resumed after preemption: load again into its new blocks
                meta.loads.append(self._load_transfer(req_id, list(new_blocks[0]), cached.num_computed_tokens[i], 0))
        done = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
        done.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id in list(self._pending):
            if req_id not in done:
                continue
            key, blocks, prompt = self._pending[req_id]
            if done[req_id] + scheduler_output.num_scheduled_tokens.get(req_id, 0) >= prompt:
                del self._pending[req_id]
                if (save := self._begin_save(key, blocks, prompt)) is not None:
                    meta.saves.append(save)
        if self._to_load:
            raise RuntimeError(f"HelixConnector: loads for {sorted(self._to_load)} were not scheduled")
        return meta

    def _load_transfer(self, req_id: str, blocks: list[int], computed: int, prompt: int) -> Transfer:
        """Positions ``[computed - external, computed)``: what vLLM counts as loaded, never its own prefix hit."""
        key, external = self._to_load.pop(req_id)
        transfer = Transfer(key, blocks, computed - external, computed)
        self._issued[req_id] = (set(self._placement.blocks_of(transfer)), 0)
        _logger.info("HelixConnector: loading %d tokens of a %d-token prompt (positions %d..%d, request %s)",
                     external, prompt, transfer.start, transfer.end - 1, req_id)
        return transfer

    def update_connector_output(self, connector_output: Any) -> None:
        invalid = set(getattr(connector_output, "invalid_block_ids", None) or ())
        for req_id, (blocks, updates) in list(self._issued.items()):
            if blocks & invalid:
                self._stats.add("load_failures")
                del self._issued[req_id]
            elif updates >= 2:  # a load runs in the step it was issued for; async scheduling lags one
                del self._issued[req_id]
            else:
                self._issued[req_id] = (blocks, updates + 1)
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        reported = meta if isinstance(meta, HelixWorkerMetadata) else HelixWorkerMetadata()
        for staging, reason in reported.failed.items():
            if staging in self._saving:
                self._drop(staging, reason)
        for staging, records in reported.records.items():
            if staging in self._saving:
                self._saving[staging].records.extend(records)
                self._publish(staging)
        for staging, save in list(self._saving.items()):
            save.waited += 1
            if save.waited > _SAVE_PATIENCE:
                self._drop(staging, f"no writer reported within {_SAVE_PATIENCE} steps")

    def _publish(self, staging: str) -> None:
        save = self._saving[staging]
        try:
            nbytes = self._store.publish(staging, save.key, save.tokens, self._layers, self._placement.writer_parts(),
                                         save.records)
        except (KVStoreError, OSError) as err:
            self._drop(staging, str(err))
            return
        del self._saving[staging]
        if nbytes:
            self._stats.add("saved_entries")
            self._stats.add("saved_bytes", nbytes)
        if self._janitor is not None:
            self._janitor.poke()

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        for state in (self._pending, self._keys, self._invisible, self._to_load):
            state.pop(request.request_id, None)
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
        """This rank's positions in ``[start, end)`` of ``transfer`` and their slots, computed once per step
        (vLLM calls ``save_kv_layer`` once per layer with the same metadata)."""
        if self._step is None or self._step[0] is not meta:
            striping, rank = self._placement.striping, self._tp_rank() % self._placement.striping.kvp
            mine = {}
            for t in [*meta.saves, *meta.loads]:
                positions, slots = rank_tokens(striping, torch.tensor(t.block_ids, dtype=torch.int64), t.end, rank)
                keep = positions >= t.start
                mine[id(t)] = (positions[keep], slots[keep])
            self._step = (meta, mine)
        return self._step[1][id(transfer)]

    def _my_heads(self) -> range:
        return tp_kv_heads(self._placement.kv_heads, self._placement.tp, self._tp_rank())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not meta.loads:
            return  # called every step: nothing to walk when nothing loads
        layers = [(name, layer.kv_cache) for name, layer in forward_context.no_compile_layers.items()
                  if isinstance(getattr(layer, "kv_cache", None), torch.Tensor)]
        for transfer in meta.loads:
            try:
                self._load(meta, transfer, layers)
            except Exception as err:  # a store fault costs this request, never the engine
                self._invalid.update(self._placement.blocks_of(transfer))
                _logger.warning("HelixConnector: load of %s failed, %d blocks reported to vLLM's "
                                "kv_load_failure_policy: %s", transfer.key[:12],
                                len(self._placement.blocks_of(transfer)), err,
                                exc_info=not isinstance(err, KVStoreError))

    def _load(self, meta: HelixConnectorMetadata, transfer: Transfer, layers: list[tuple[str, torch.Tensor]]) -> None:
        """Read and check every layer first; only then write this rank's slots."""
        positions, slots = self._tokens(meta, transfer)
        staged = []
        with self._store.reader(transfer.key) as entry:
            for name, raw in layers:
                cache, layout = self._layer_cache(name, raw)
                rows = entry.read_layer(name, self._my_heads(), transfer.end, cache.dtype, layout.row,
                                        start=transfer.start)
                staged.append((cache, layout, rows[positions - transfer.start]))
        for cache, layout, rows in staged:
            layout.write(cache, slots, rows)
        self._stats.add("loaded_bytes", entry.bytes_read)

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid = self._invalid, set()
        return invalid

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are synchronous, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not meta.saves or not self._placement.writes(self._tp_rank()):
            return
        cache, layout = self._layer_cache(layer_name, kv_layer)
        part = f"r{self._tp_rank()}"
        for transfer in meta.saves:
            if transfer.staging in self._records.failed:
                continue
            try:
                positions, slots = self._tokens(meta, transfer)
                record = self._store.write_part(transfer.staging, layer_name, part, positions, self._my_heads(),
                                                layout.read(cache, slots))
            except Exception as err:  # e.g. a full disk: the entry is dropped, the request goes on
                self._records.failed[transfer.staging] = f"rank {part} writing {layer_name}: {err}"
                continue
            self._records.records.setdefault(transfer.staging, []).append(record)

    def wait_for_save(self) -> None:
        return None  # saves are synchronous, inside each layer

    def build_connector_worker_meta(self) -> HelixWorkerMetadata | None:
        if not self._records.records and not self._records.failed:
            return None
        records, self._records = self._records, HelixWorkerMetadata()
        return records
