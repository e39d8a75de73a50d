"""From priced points to an answer: each layout's best operating point and the recommendation.

With a TTL budget, a layout's best point is its highest tokens/s/GPU among batches
that meet the budget (ties: lower TTL); without one, its lowest TTL (ties: higher
throughput), i.e. the most interactive way to run it. The recommendation is the
best such point over the layouts a command can serve: Medha-style KVP is a
baseline with no vLLM mode; a Helix point must pass ``vllm-helix serve``'s own layout
rules for the hardware's platform (:func:`vllm_helix.serving_rules.check_layout`: e.g.
no HOP-B on CUDA, ``tpa`` = KV heads when ``kvp > 1``; and the KV cache in the model's dtype); a
baseline's KV format must be one vLLM stores; and "Helix (no HOP-B)" never
beats the same layout with HOP-B where that one is servable (it may choose one
micro-batch). The points left out stay in the per-strategy table and the plot.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vllm_helix.config import HelixConfigError
from vllm_helix.planner.cost import DEFAULT_MEMORY_UTILIZATION, scheduler_defaults, scheduler_limits
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.formats import kv_cache_flags, kv_cache_refusal, weight_flags
from vllm_helix.planner.strategies import HELIX_NO_OVERLAP, STRATEGY_LABELS, Layout, helix_shape
from vllm_helix.planner.search import SearchResult
from vllm_helix.serving_rules import check_kv_cache_dtype, check_layout, nodes_for


MASTER_PORT = 29501  # vLLM's default --master-port, printed so every node's command names the same one


@dataclass(frozen=True)
class PlanPoint:
    """One layout at one batch size, with its breakdown (seconds, bytes)."""

    layout: Layout
    batch: int
    ttl: float
    tokens_per_s_per_gpu: float
    memory_per_gpu: float
    micro_batches: int
    terms: dict[str, float]
    serve_flags: tuple[str, ...] = ()  # vLLM options this point needs beyond their defaults
    serve_env: tuple[str, ...] = ()  # environment the command needs (a context past the model's position limit)
    gpus_per_node: int = 0  # the hardware's GPUs per host (0: one host holds any layout)

    @property
    def tokens_per_s_per_user(self) -> float:
        return 1.0 / self.ttl

    def command(self, model_ref: str) -> str | None:
        command = self.layout.serve_command(model_ref, self.micro_batches)
        return None if command is None else " ".join([*self.serve_env, command, *self.serve_flags])

    @property
    def nodes(self) -> int:
        """Hosts one instance spans: the fewest that hold it and divide its GPUs evenly (vLLM's rule,
        :func:`vllm_helix.serving_rules.nodes_for`, which serve's start-up checks the same way)."""
        return nodes_for(self.layout.gpus, self.gpus_per_node)

    def node_commands(self, model_ref: str) -> list[tuple[str, str]]:
        """``(which nodes, command)``: one entry on one host; across hosts vLLM's multi-node
        multiprocessing flags, node 0 serving the API and every other node ``--headless``, with
        ``MASTER_ADDR`` (node 0's address) and ``R`` (the node's rank) for the user to fill in."""
        command = self.command(model_ref)
        if command is None:
            return []
        if self.nodes == 1:
            return [("", command)]
        common = f"{command} --nnodes {self.nodes} --master-addr MASTER_ADDR --master-port {MASTER_PORT}"
        others = ("node 1", "1") if self.nodes == 2 else (f"node R = 1..{self.nodes - 1}", "R")
        return [("node 0", f"{common} --node-rank 0"), (others[0], f"{common} --node-rank {others[1]} --headless")]

    def as_dict(self, model_ref: str) -> dict[str, Any]:
        layout = self.layout
        return {
            "strategy": layout.strategy,
            "family": layout.family,
            "layout": {"tpa": layout.tpa, "kvp": layout.kvp, "dpa": layout.dpa, "pp": layout.pp,
                       "tpf": layout.tpf, "ep": layout.ep,
                       "hopb": self.micro_batches if layout.hopb else 1},
            "gpus": layout.gpus,
            "batch": self.batch,
            "ttl_ms": self.ttl * 1e3,
            "tokens_per_s_per_user": self.tokens_per_s_per_user,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "memory_per_gpu_gb": self.memory_per_gpu / 1e9,
            "breakdown_ms": {name: value * 1e3 for name, value in self.terms.items()},
            "command": self.command(model_ref),
            "nodes": self.nodes,
            "node_commands": {which: command for which, command in self.node_commands(model_ref) if which},
        }


def serve_flags(result: SearchResult, layout: Layout, batch: int) -> tuple[str, ...]:
    """The vLLM options a point needs beyond vLLM's defaults: the context it was priced for
    (``--max-model-len``), the weight and KV formats (:mod:`vllm_helix.planner.formats`), the memory fraction the plan assumed, and scheduler limits raised to
    the batch (vLLM runs at most ``max_num_seqs``)."""
    model, precision = result.model, result.workload.precision
    flags = [f"--max-model-len {result.workload.context}", *weight_flags(model, precision, result.hardware.platform)]
    if layout.strategy != "helix":
        flags += kv_cache_flags(model, precision)
    utilization = result.workload.memory_utilization
    if utilization != DEFAULT_MEMORY_UTILIZATION:
        flags.append(f"--gpu-memory-utilization {utilization:g}")
    default_tokens, default_seqs = scheduler_defaults(result.hardware)
    tokens, seqs = (int(x[0]) for x in scheduler_limits(result.hardware, layout, np.array([batch])))
    if seqs > default_seqs:
        flags.append(f"--max-num-seqs {seqs}")
    if tokens > default_tokens:
        flags.append(f"--max-num-batched-tokens {tokens}")
    return tuple(flags)


def serve_env(result: SearchResult) -> tuple[str, ...]:
    """vLLM refuses a ``--max-model-len`` past the model's position limit unless told to (the plan's
    context warning says at what risk): the planned command says so."""
    limit = result.model.max_position_embeddings
    return ("VLLM_ALLOW_LONG_MAX_MODEL_LEN=1",) if limit and result.workload.context > limit else ()


def point_at(result: SearchResult, row: int, col: int) -> PlanPoint:
    """The point of layout ``row`` at batch index ``col``."""
    cost = result.costs[row]
    return PlanPoint(
        layout=cost.layout,
        batch=int(result.batches[col]),
        ttl=float(cost.ttl[col]),
        tokens_per_s_per_gpu=float(cost.tokens_per_s_per_gpu[col]),
        memory_per_gpu=float(cost.memory_per_gpu[col]),
        micro_batches=int(cost.micro_batches[col]),
        terms={name: float(values[col]) for name, values in cost.terms.items()},
        serve_flags=serve_flags(result, cost.layout, int(result.batches[col])),
        serve_env=serve_env(result),
        gpus_per_node=result.hardware.node_gpus,
    )


def _sort_key(point: PlanPoint, ttl_budget: float | None) -> tuple[float, float]:
    if ttl_budget is None:
        return (point.ttl, -point.tokens_per_s_per_gpu)
    return (-point.tokens_per_s_per_gpu, point.ttl)


def best_points(result: SearchResult, ttl_budget: float | None = None) -> list[PlanPoint]:
    """Each layout's best point (see module doc), best first; layouts with none are skipped."""
    points = []
    for row, cost in enumerate(result.costs):
        ok = cost.feasible & (cost.ttl <= ttl_budget if ttl_budget is not None else True)
        if not ok.any():
            continue
        if ttl_budget is None:
            score = np.where(ok, cost.ttl - 1e-12 * cost.tokens_per_s_per_gpu, np.inf)
            col = int(np.argmin(score))
        else:
            score = np.where(ok, cost.tokens_per_s_per_gpu - 1e-12 * cost.ttl, -np.inf)
            col = int(np.argmax(score))
        points.append(point_at(result, row, col))
    return sorted(points, key=lambda p: _sort_key(p, ttl_budget))


def best_per_family(points: list[PlanPoint]) -> dict[str, PlanPoint]:
    """The first (best) point of each family in an already ranked list.

    Where HOP-B's best choice is one micro-batch, the Helix point *is* the
    no-overlap point; it is listed once (as Helix), not twice.
    """
    best: dict[str, PlanPoint] = {}
    for point in points:
        best.setdefault(point.layout.family, point)
    helix, plain = best.get(STRATEGY_LABELS["helix"]), best.get(HELIX_NO_OVERLAP)
    if (helix is not None and plain is not None and helix.micro_batches == 1 and helix.batch == plain.batch
            and replace(helix.layout, hopb=False) == plain.layout):
        del best[HELIX_NO_OVERLAP]
    return best


def serve_refusal(point: PlanPoint, result: SearchResult) -> str | None:
    """Why ``vllm-helix serve`` would refuse ``point`` on the hardware's platform (None: it serves it)."""
    if point.layout.strategy == "kvp":
        return "Medha-style KVP has no vLLM mode"
    if point.layout.strategy != "helix":
        return kv_cache_refusal(result.model, result.workload.precision)
    config = point.layout.helix_config(point.micro_batches if point.layout.hopb else 1)
    try:
        check_kv_cache_dtype(result.workload.precision.kv, result.model.kv_cache_dtype)
        check_layout(config, helix_shape(result.model), result.hardware.platform)
    except HelixConfigError as err:
        return str(err)
    return None


def _servable(points: list[PlanPoint], result: SearchResult) -> list[PlanPoint]:
    """Points a command can serve (:func:`serve_refusal`), less "Helix (no HOP-B)" where the same
    layout is also servable with HOP-B."""
    servable = [p for p in points if serve_refusal(p, result) is None]
    with_overlap = {p.layout for p in servable if p.layout.hopb}
    return [p for p in servable
            if not (p.layout.family == HELIX_NO_OVERLAP and replace(p.layout, hopb=True) in with_overlap)]


def busy_fraction(point: PlanPoint, gpus: int) -> float:
    """The share of a ``gpus``-GPU budget that whole replicas of ``point``'s layout keep busy."""
    size = point.layout.gpus
    return (gpus // size) * size / gpus if gpus >= size else 1.0


def recommend(result: SearchResult, ttl_budget: float | None = None,
              gpus: int | None = None) -> tuple[PlanPoint, list[PlanPoint]]:
    """The recommended point and the ranked servable per-layout points it was chosen from.

    With a TTL budget and a GPU budget ``gpus``, points rank by tokens/s per budget GPU:
    a layout whose replicas leave GPUs idle (6 GPUs of 8) counts them (two 4-GPU
    replicas can beat it). Raises :class:`PlannerError` naming the fastest achievable
    TTL when no layout meets the budget.
    """
    candidates = _servable(best_points(result, ttl_budget), result)
    if gpus is not None and ttl_budget is not None:
        candidates.sort(key=lambda p: (-p.tokens_per_s_per_gpu * busy_fraction(p, gpus), p.ttl))
    if not candidates:
        servable = _servable(best_points(result), result)
        if not servable:
            reasons = sorted({serve_refusal(p, result) or "" for p in best_points(result)} - {""})
            raise PlannerError("no priced layout can be served: " + "; ".join(reasons))
        fastest = servable[0]
        raise PlannerError(
            f"no layout reaches TTL <= {ttl_budget * 1e3:.3g} ms; the fastest is "
            f"{fastest.ttl * 1e3:.3g} ms ({fastest.layout.family} {fastest.layout.describe()} on "
            f"{fastest.layout.gpus} GPUs at batch {fastest.batch}); raise --ttl-ms or add GPUs"
        )
    return candidates[0], candidates
