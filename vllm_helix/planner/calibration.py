"""Measured engine costs a roofline cannot see: the ``calibration`` section of a hardware profile.

A datasheet profile prices a decode step as bytes and FLOPs at peak rates. On a
machine where the project can run vLLM (the CPU machines here), that misses what
dominates small models and short contexts, and it overstates how fast a decode
kernel reads the KV cache. ``benchmarks/measure_hardware.py`` therefore times
vLLM engine steps on the machine and fits, for each engine (``vllm``: vLLM's own
decode path, which TP, DP and PP layouts run; ``helix``: the plugin's) and each
attention kind (``gqa``, ``mla``), five constants:

* ``step_ms``: per decode step (scheduling, sampling, hand-offs between processes);
* ``layer_ms``: per layer per step (operator dispatch, Helix's query all-gather and
  metadata, collectives' fixed costs beyond the profile's message latency);
* ``sequence_ms`` and ``sequence_layer_ms``: the same, per sequence in the batch;
* ``kv_read_gb_s``: the KV bytes per second one rank's attention kernel reads while
  every rank of the step reads at once (they share the memory bandwidth), which
  replaces the roofline's ``max(KV bytes / bandwidth, FLOPs / peak)`` for decode
  attention: the measured rate already includes the kernel's arithmetic.

The cost model (:mod:`vllm_helix.planner.cost`) charges them when a profile has
them; every other operation keeps its roofline. The constants are fitted, so
they are judged by the held-out long-context sweep
(``benchmarks/planner_validation.py``), not by the points they were fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from vllm_helix.planner.errors import PlannerError

ENGINES: tuple[str, ...] = ("vllm", "helix")
ATTENTION_KINDS: tuple[str, ...] = ("gqa", "mla")
_FIELDS_MS = ("step_ms", "layer_ms", "sequence_ms", "sequence_layer_ms")


def engine_of(strategy: str) -> str:
    """Which engine's costs a planner strategy pays: Helix's own, or vLLM's for every baseline."""
    return "helix" if strategy == "helix" else "vllm"


def attention_of(attention: str) -> str:
    """``mla`` for MLA models, ``gqa`` for every other attention (MHA is GQA with one head per group)."""
    return "mla" if attention == "mla" else "gqa"


@dataclass(frozen=True)
class EngineCosts:
    """One engine's fitted costs for one attention kind (seconds, bytes/s)."""

    step: float
    layer: float
    sequence: float
    sequence_layer: float
    kv_read_rate: float

    def fixed(self, layers: int, sequences: Any) -> Any:
        """Seconds per decode step that no byte or FLOP count explains (``sequences`` may be an array)."""
        return self.step + layers * self.layer + sequences * (self.sequence + layers * self.sequence_layer)

    def to_yaml(self) -> dict[str, float]:
        """Human units, as the profile file holds them."""
        values = (self.step, self.layer, self.sequence, self.sequence_layer)
        return {**{key: round(value * 1e3, 5) for key, value in zip(_FIELDS_MS, values)},
                "kv_read_gb_s": round(self.kv_read_rate / 1e9, 4)}

    @classmethod
    def from_yaml(cls, data: Any, where: str) -> "EngineCosts":
        if not isinstance(data, Mapping) or set(data) != {*_FIELDS_MS, "kv_read_gb_s"}:
            raise PlannerError(f"hardware profile {where} must hold exactly "
                               f"{', '.join((*_FIELDS_MS, 'kv_read_gb_s'))}, got {sorted(data) if isinstance(data, Mapping) else data!r}")
        for key in _FIELDS_MS:
            if not isinstance(data[key], (int, float)):
                raise PlannerError(f"hardware profile {where}: {key} must be a number, got {data[key]!r}")
        rate = data["kv_read_gb_s"]
        if not isinstance(rate, (int, float)) or rate <= 0:
            raise PlannerError(f"hardware profile {where}: kv_read_gb_s must be a positive number, got {rate!r}")
        return cls(*(float(data[key]) / 1e3 for key in _FIELDS_MS), kv_read_rate=float(rate) * 1e9)


@dataclass(frozen=True)
class Calibration:
    """Fitted engine costs by attention kind and engine, and where they were measured."""

    costs: Mapping[str, Mapping[str, EngineCosts]]
    source: str = ""

    def engine_costs(self, attention: str, strategy: str, profile: str) -> EngineCosts:
        """The costs a ``strategy`` pays for a model of ``attention``; refuses what was not measured."""
        kind, engine = attention_of(attention), engine_of(strategy)
        try:
            return self.costs[kind][engine]
        except KeyError:
            raise PlannerError(
                f"hardware {profile!r} is calibrated for {self.describe()} but not {kind}/{engine}; "
                f"re-run benchmarks/measure_hardware.py with a twin of that kind, or plan on an uncalibrated profile"
            ) from None

    def describe(self) -> str:
        return ", ".join(f"{kind}/{engine}" for kind, engines in self.costs.items() for engine in engines)

    @classmethod
    def from_yaml(cls, data: Any, where: str) -> "Calibration":
        if not isinstance(data, Mapping):
            raise PlannerError(f"hardware profile {where}: calibration must be a mapping")
        unknown = sorted(str(k) for k in data if k not in (*ATTENTION_KINDS, "source"))
        if unknown:
            raise PlannerError(f"hardware profile {where}: calibration has unknown key(s) {unknown}; "
                               f"valid: {', '.join(ATTENTION_KINDS)}, source")
        costs: dict[str, dict[str, EngineCosts]] = {}
        for kind in ATTENTION_KINDS:
            engines = data.get(kind, {})
            if not isinstance(engines, Mapping) or not set(engines) <= set(ENGINES):
                raise PlannerError(f"hardware profile {where}: calibration.{kind} takes engines "
                                   f"{', '.join(ENGINES)}, got {engines!r}")
            for engine, values in engines.items():
                costs.setdefault(kind, {})[engine] = EngineCosts.from_yaml(values, f"{where} calibration.{kind}.{engine}")
        if not costs:
            raise PlannerError(f"hardware profile {where}: calibration holds no engine costs")
        return cls(costs, str(data.get("source", "")))
