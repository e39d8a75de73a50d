"""Parallel layouts: how N GPUs are carved up for attention and for the FFN.

One :class:`Layout` describes every strategy the planner compares:

========  =========================================================================
strategy  attention grid                       FFN grid            vLLM spelling
========  =========================================================================
tp        TP = N over heads (KV dup. > KV heads) TPF x EP = N        --tensor-parallel-size
tp_pp     PP stages, each TP = N/PP             TPF x EP = N/PP     + --pipeline-parallel-size
dp_ep     DP x TP = N (each DP group its own    EP = N              --data-parallel-size --tensor-parallel-size
          requests, TP over heads inside)                          --enable-expert-parallel
kvp       KVP x TPA (Medha: KV split, gathered  TPF x EP = TPA      (none: a baseline only)
          back to one TP group for the FFN)     (one group works)
helix     KVP x TPA, all-to-all over KVP        TPF x EP = N        vllm-helix serve --helix ...
========  =========================================================================

Helix candidates are checked with :meth:`vllm_helix.config.HelixConfig.validate`, the
same validation ``vllm-helix serve`` applies, so the planner never recommends a
layout the server would refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from vllm_helix.config import HelixConfig, HelixConfigError, ModelShape
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.model_spec import ModelSpec

STRATEGIES: tuple[str, ...] = ("tp", "tp_pp", "dp_ep", "kvp", "helix")
BASELINES: tuple[str, ...] = ("tp", "tp_pp", "dp_ep", "kvp")
STRATEGY_LABELS: dict[str, str] = {
    "tp": "TP",
    "tp_pp": "TP x PP",
    "dp_ep": "DP attn + EP",
    "kvp": "KVP (Medha)",
    "helix": "Helix",
}
HELIX_NO_OVERLAP = "Helix (no HOP-B)"


@dataclass(frozen=True)
class Layout:
    """A parallel layout of one model instance.

    ``gpus = pp * dpa * kvp * tpa``. The FFN grid ``tpf x ep`` spans a pipeline
    stage (``gpus / pp``) except for ``kvp``, where only one TP group of ``tpa``
    ranks runs the FFN. ``hopb`` says whether Helix overlaps its all-to-all with
    attention (the number of micro-batches is chosen per batch size).
    """

    strategy: str
    tpa: int = 1
    kvp: int = 1
    dpa: int = 1
    pp: int = 1
    tpf: int = 1
    ep: int = 1
    hopb: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PlannerError(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        for name in ("tpa", "kvp", "dpa", "pp", "tpf", "ep"):
            if getattr(self, name) < 1:
                raise PlannerError(f"layout {name}={getattr(self, name)} must be >= 1")
        expected = self.tpa if self.strategy == "kvp" else self.stage_gpus
        if self.tpf * self.ep != expected:
            raise PlannerError(
                f"{self.strategy}: the FFN grid tpf*ep={self.tpf * self.ep} must cover {expected} GPUs"
            )
        if self.hopb and self.strategy != "helix":
            raise PlannerError("HOP-B overlaps the Helix all-to-all; only helix layouts take hopb")

    @property
    def gpus(self) -> int:
        return self.pp * self.dpa * self.kvp * self.tpa

    @property
    def stage_gpus(self) -> int:
        return self.gpus // self.pp

    @property
    def family(self) -> str:
        """The curve this layout belongs to on a Pareto plot."""
        if self.strategy == "helix" and not self.hopb:
            return HELIX_NO_OVERLAP
        return STRATEGY_LABELS[self.strategy]

    @property
    def is_baseline(self) -> bool:
        return self.strategy != "helix"

    def describe(self) -> str:
        """Compact layout text, attention grid then FFN grid, e.g. ``kvp=8,tpa=8; tpf=64,ep=1``."""
        attention = {
            "tp": f"tp={self.tpa}",
            "tp_pp": f"tp={self.tpa},pp={self.pp}",
            "dp_ep": f"dp={self.dpa}" + (f",tp={self.tpa}" if self.tpa > 1 else ""),
            "kvp": f"kvp={self.kvp},tp={self.tpa}",
            "helix": f"kvp={self.kvp},tpa={self.tpa}",
        }[self.strategy]
        return f"{attention}; tpf={self.tpf},ep={self.ep}"

    def helix_config(self, micro_batches: int) -> HelixConfig:
        """The ``--helix`` layout for this Helix layout with ``micro_batches`` HOP-B micro-batches."""
        if self.strategy != "helix":
            raise PlannerError(f"{self.strategy} is not a Helix layout")
        return HelixConfig(kvp=self.kvp, tpa=self.tpa, tpf=self.tpf, ep=self.ep, hopb=max(1, micro_batches))

    def serve_command(self, model_ref: str, micro_batches: int = 1) -> str | None:
        """The command that serves this layout, or ``None`` where vLLM has no such mode (Medha)."""
        expert_flag = " --enable-expert-parallel" if self.ep > 1 else ""
        if self.strategy == "helix":
            return f"vllm-helix serve {model_ref} --helix {self.helix_config(micro_batches).to_cli()}"
        if self.strategy == "tp":
            return f"vllm serve {model_ref} --tensor-parallel-size {self.tpa}{expert_flag}"
        if self.strategy == "tp_pp":
            return (f"vllm serve {model_ref} --tensor-parallel-size {self.tpa} "
                    f"--pipeline-parallel-size {self.pp}{expert_flag}")
        if self.strategy == "dp_ep":
            tp = f" --tensor-parallel-size {self.tpa}" if self.tpa > 1 else ""
            return f"vllm serve {model_ref} --data-parallel-size {self.dpa}{tp} --enable-expert-parallel"
        return None


# ------------------------------------------------------------------ validity
def _divisors(n: int) -> list[int]:
    """Divisors of ``n`` in increasing order, in ``O(sqrt n)`` (``--gpus`` may be large)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def attention_tp_valid(model: ModelSpec, tp: int) -> bool:
    """vLLM's rule for tensor-parallel attention: heads divide evenly; KV heads divide or replicate."""
    kv = model.num_kv_heads
    return model.num_q_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)


def _dense_ffn_splits(model: ModelSpec, width: int) -> bool:
    """Dense FFN layers (and DeepSeek's first dense layers) column-split ``width`` ways."""
    return model.intermediate_size % width == 0


def vllm_ffn_grids(model: ModelSpec, width: int) -> list[tuple[int, int]]:
    """FFN grids stock vLLM can express over ``width`` ranks: all TP, or all EP for MoE."""
    if not _dense_ffn_splits(model, width):
        return []
    if not model.is_moe:
        return [(width, 1)]
    grids = []
    if model.moe_intermediate_size % width == 0:
        grids.append((width, 1))
    if width > 1 and model.num_experts % width == 0:
        grids.append((1, width))
    return grids


def helix_shape(model: ModelSpec) -> ModelShape:
    """The model as ``HelixConfig.validate`` sees it."""
    return ModelShape(num_q_heads=model.num_q_heads, num_kv_heads=model.num_kv_heads, is_mla=model.is_mla,
                      num_experts=model.num_experts, moe_intermediate_size=model.moe_intermediate_size)


def helix_layouts(model: ModelSpec, gpus: int) -> Iterator[Layout]:
    """Every Helix layout of ``gpus`` ranks that ``vllm-helix serve`` accepts (KVP >= 2)."""
    if not _dense_ffn_splits(model, gpus):
        return
    shape = helix_shape(model)
    for tpa in _divisors(gpus):
        kvp = gpus // tpa
        if kvp < 2:
            continue
        for ep in (_divisors(gpus) if model.is_moe else [1]):
            try:
                HelixConfig(kvp=kvp, tpa=tpa, tpf=gpus // ep, ep=ep).validate(gpus, shape)
            except HelixConfigError:
                continue
            for hopb in (False, True):
                yield Layout("helix", tpa=tpa, kvp=kvp, tpf=gpus // ep, ep=ep, hopb=hopb)


def layouts_for(model: ModelSpec, gpus: int, strategies: tuple[str, ...] = STRATEGIES) -> list[Layout]:
    """Every valid layout of ``strategies`` on exactly ``gpus`` GPUs."""
    found: list[Layout] = []
    if "tp" in strategies and attention_tp_valid(model, gpus):
        found += [Layout("tp", tpa=gpus, tpf=f, ep=e) for f, e in vllm_ffn_grids(model, gpus)]
    if "tp_pp" in strategies:
        for pp in _divisors(gpus):
            tp = gpus // pp
            if 2 <= pp <= model.num_layers and attention_tp_valid(model, tp):
                found += [Layout("tp_pp", tpa=tp, pp=pp, tpf=f, ep=e) for f, e in vllm_ffn_grids(model, tp)]
    if "dp_ep" in strategies and model.is_moe and gpus >= 2 and model.num_experts % gpus == 0:
        # vLLM's DP attention takes TP inside each DP group; its MoE is then EP over all DP x TP ranks
        # (FusedMoEParallelConfig: all-EP or all-TP, never a mixed grid, so baselines get no TPF x EP grid).
        for tp in _divisors(gpus):
            dp = gpus // tp
            if dp >= 2 and attention_tp_valid(model, tp) and _dense_ffn_splits(model, tp):
                found.append(Layout("dp_ep", dpa=dp, tpa=tp, tpf=1, ep=gpus))
    if "kvp" in strategies:
        for tpa in _divisors(gpus):
            kvp = gpus // tpa
            if kvp >= 2 and attention_tp_valid(model, tpa):
                found += [Layout("kvp", tpa=tpa, kvp=kvp, tpf=f, ep=e) for f, e in vllm_ffn_grids(model, tpa)]
    if "helix" in strategies:
        found += list(helix_layouts(model, gpus))
    return found
