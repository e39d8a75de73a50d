"""Pareto frontiers of tokens/s/GPU against tokens/s/user, and the paper's comparisons.

The paper's metrics, all from the same priced points:

* interactivity = tokens/s/user = 1 / TTL;
* throughput = tokens/s/GPU;
* a frontier point is the highest throughput at a given interactivity;
* TTL reduction at fixed batch: best TTL of the baselines over best TTL of Helix
  at the same number of concurrent sequences;
* batch (throughput) gain at equal TTL: largest batch (tokens/s/GPU) that meets
  a TTL budget, Helix over the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_helix.planner.search import SearchResult


def frontier_indices(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both ``x`` and ``y`` (larger is better), by ``x``."""
    order = np.lexsort((-y, -x))  # x descending, ties: best y first
    best_y = -np.inf
    keep = []
    for i in order:
        if y[i] > best_y:
            keep.append(i)
            best_y = y[i]
    return np.array(keep[::-1], dtype=int)


@dataclass(frozen=True)
class Frontier:
    """One family's frontier; ``rows``/``cols`` locate each point in the search result."""

    family: str
    tokens_per_s_per_user: np.ndarray
    tokens_per_s_per_gpu: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def frontier(result: SearchResult, families: tuple[str, ...], name: str | None = None) -> Frontier:
    """The frontier over every feasible point of ``families`` (their union)."""
    mask = result.feasible & result.rows_of(families)[:, None]
    rows, cols = np.nonzero(mask)
    x = 1.0 / result.ttl[rows, cols]
    y = result.tokens_per_s_per_gpu[rows, cols]
    keep = frontier_indices(x, y) if rows.size else np.array([], dtype=int)
    return Frontier(name or " + ".join(families), x[keep], y[keep], rows[keep], cols[keep])


def best_ttl_per_batch(result: SearchResult, families: tuple[str, ...]) -> np.ndarray:
    """Lowest feasible TTL of ``families`` at each batch size (inf where none fits)."""
    ttl = np.where(result.feasible & result.rows_of(families)[:, None], result.ttl, np.inf)
    return ttl.min(axis=0)


def best_within_budgets(result: SearchResult, families: tuple[str, ...], budgets: np.ndarray,
                        metric: np.ndarray) -> np.ndarray:
    """Largest ``metric`` (batch, tokens/s/GPU) among points meeting each TTL budget (0 if none)."""
    mask = result.feasible & result.rows_of(families)[:, None]
    ttl, value = result.ttl[mask], metric[mask]
    order = np.argsort(ttl)
    running = np.maximum.accumulate(value[order]) if order.size else np.array([0.0])
    position = np.searchsorted(ttl[order], budgets, side="right") - 1
    return np.where(position >= 0, running[np.maximum(position, 0)], 0.0)


def _loglog_interp(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``y`` at ``at`` along the curve through ``(x, y)``, straight in log-log space; NaN outside it.

    A frontier is a discrete staircase of batch sizes; reading it between its points
    this way compares two frontiers at equal abscissa without the staircase's steps.
    """
    order = np.argsort(x)
    log_x, log_y, log_at = np.log(x[order]), np.log(y[order]), np.log(np.asarray(at, dtype=float))
    inside = (log_at >= log_x[0]) & (log_at <= log_x[-1])
    return np.where(inside, np.exp(np.interp(log_at, log_x, log_y)), np.nan)


def _largest_loss(reference: np.ndarray, variant_at_reference: np.ndarray, levels: np.ndarray) -> tuple[float, float]:
    loss = 1.0 - variant_at_reference / reference
    if np.all(np.isnan(loss)):
        return 0.0, float("nan")
    i = int(np.nanargmax(loss))
    return float(loss[i]), float(levels[i])


def largest_interactivity_loss(result: SearchResult, reference: tuple[str, ...],
                               variant: tuple[str, ...]) -> tuple[float, float]:
    """Largest fractional drop of tokens/s/user from ``reference`` to ``variant`` at equal tokens/s/GPU.

    The paper's HOP-B ablation metric ("up to 12% lower tokens/s/user at fixed
    tokens/s/GPU"), taken at the reference frontier's points inside the throughput
    range both frontiers cover. Returns the loss and the tokens/s/GPU where it occurs.
    Where a frontier is nearly flat in throughput this metric is ill-conditioned:
    a sliver of throughput moves interactivity a lot.
    """
    ref, var = frontier(result, reference), frontier(result, variant)
    at = _loglog_interp(var.tokens_per_s_per_gpu, var.tokens_per_s_per_user, ref.tokens_per_s_per_gpu)
    return _largest_loss(ref.tokens_per_s_per_user, at, ref.tokens_per_s_per_gpu)


def largest_throughput_loss(result: SearchResult, reference: tuple[str, ...],
                            variant: tuple[str, ...]) -> tuple[float, float]:
    """Largest fractional drop of tokens/s/GPU from ``reference`` to ``variant`` at equal tokens/s/user."""
    ref, var = frontier(result, reference), frontier(result, variant)
    at = _loglog_interp(var.tokens_per_s_per_user, var.tokens_per_s_per_gpu, ref.tokens_per_s_per_user)
    return _largest_loss(ref.tokens_per_s_per_gpu, at, ref.tokens_per_s_per_user)


@dataclass(frozen=True)
class Comparison:
    """How a set of layouts (Helix) beats another (the best baseline) on one search."""

    ttl_reduction_at_fixed_batch: float
    ttl_reduction_batch: int
    ttl_reduction_at_batch_1: float
    batch_gain_at_equal_ttl: float
    batch_gain_ttl_ms: float
    throughput_gain_at_equal_ttl: float
    throughput_gain_ttl_ms: float
    max_interactivity_gain: float
    max_throughput_gain: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def compare(result: SearchResult, winners: tuple[str, ...], baselines: tuple[str, ...]) -> Comparison:
    """The paper's headline ratios of ``winners`` against ``baselines`` (each the best of its set).

    Ratios at equal TTL are taken over budgets the baselines can meet at all, so a
    budget only Helix meets does not produce an infinite gain.
    """
    ttl_w, ttl_b = best_ttl_per_batch(result, winners), best_ttl_per_batch(result, baselines)
    both = np.isfinite(ttl_w) & np.isfinite(ttl_b)
    ratio = np.where(both, ttl_b / np.where(both, ttl_w, 1.0), 0.0)
    i = int(np.argmax(ratio))
    at_one = float(ratio[0]) if result.batches[0] == 1 else float("nan")

    budgets = np.unique(result.ttl[result.feasible & result.rows_of(winners + baselines)[:, None]])
    batch = np.broadcast_to(result.batches, result.ttl.shape).astype(float)
    tput = result.tokens_per_s_per_gpu
    batch_w, batch_b = (best_within_budgets(result, f, budgets, batch) for f in (winners, baselines))
    tput_w, tput_b = (best_within_budgets(result, f, budgets, tput) for f in (winners, baselines))
    met = batch_b > 0
    batch_gain = np.where(met, batch_w / np.where(met, batch_b, 1.0), 0.0)
    tput_gain = np.where(met, tput_w / np.where(met, tput_b, 1.0), 0.0)
    j, k = int(np.argmax(batch_gain)), int(np.argmax(tput_gain))
    front_w, front_b = frontier(result, winners), frontier(result, baselines)
    return Comparison(
        ttl_reduction_at_fixed_batch=float(ratio[i]),
        ttl_reduction_batch=int(result.batches[i]),
        ttl_reduction_at_batch_1=at_one,
        batch_gain_at_equal_ttl=float(batch_gain[j]),
        batch_gain_ttl_ms=float(budgets[j] * 1e3),
        throughput_gain_at_equal_ttl=float(tput_gain[k]),
        throughput_gain_ttl_ms=float(budgets[k] * 1e3),
        max_interactivity_gain=float(front_w.tokens_per_s_per_user.max() / front_b.tokens_per_s_per_user.max()),
        max_throughput_gain=float(front_w.tokens_per_s_per_gpu.max() / front_b.tokens_per_s_per_gpu.max()),
    )
