"""``HelixConnector``'s counters, through vLLM's connector stats: the engine's periodic log and ``/metrics``.

vLLM asks the connector's class for a :class:`KVConnectorStats` (``build_kv_connector_stats``),
sums the workers' and the scheduler's copies with ``aggregate`` each step, logs
``reduce()`` as "KV Transfer metrics: ..." and hands the same data to the connector's
Prometheus metrics (``build_prom_metrics``), here one counter per field,
``vllm:helix_kv_<field>_total``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from patches_free_hooks.compat import internal

_metrics = "vllm.distributed.kv_transfer.kv_connector.v1.metrics"
KVConnectorStats = internal(f"{_metrics}:KVConnectorStats")
KVConnectorPromMetrics = internal(f"{_metrics}:KVConnectorPromMetrics")

FIELDS = {
    "hits": "requests whose prompt KV was loaded from the store",
    "misses": "requests that found no entry (or none they could use) and computed their prompt",
    "load_failures": "requests whose load failed a check (vLLM's kv_load_failure_policy decided their fate)",
    "corrupt_entries": "entries whose manifest could not be read or validated (treated as misses)",
    "loaded_bytes": "bytes read from the store by loads, summed over ranks",
    "saved_entries": "entries published by this producer",
    "saved_bytes": "bytes of the entries published",
    "save_failures": "saves dropped whole (a write error, an incomplete save, or over max_bytes)",
    "evicted_entries": "entries deleted by the store's cleanup (age or size cap)",
}


@dataclass
class HelixConnectorStats(KVConnectorStats):
    """Counters since the last collection (every field of :data:`FIELDS`, 0 when absent)."""

    def __post_init__(self) -> None:
        self.data = {name: int(self.data.get(name, 0)) for name in FIELDS}

    def add(self, name: str, amount: int = 1) -> None:
        self.data[name] += amount

    def reset(self) -> None:
        self.data = dict.fromkeys(FIELDS, 0)

    def aggregate(self, other: Any) -> HelixConnectorStats:
        for name, value in getattr(other, "data", {}).items():
            if name in self.data:
                self.data[name] += int(value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def take(self) -> HelixConnectorStats | None:
        """This interval's counters (``None`` when nothing happened), and a fresh start."""
        if self.is_empty():
            return None
        taken = HelixConnectorStats(dict(self.data))
        self.reset()
        return taken


class HelixPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per field, labelled per engine like vLLM's own."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {name: self._counter_cls(name=f"vllm:helix_kv_{name}_total", documentation=text,
                                                  labelnames=labelnames)
                          for name, text in FIELDS.items()}

    def observe(self, transfer_stats_data: dict[str, Any] | None, engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in (transfer_stats_data or {}).items():
            if name in self._counters and value:
                self._counters[name].labels(*labels).inc(value)
