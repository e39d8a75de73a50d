"""Pareto plots (tokens/s/GPU against tokens/s/user) of Helix and each baseline.

matplotlib is imported here, lazily, so the CLI starts instantly and the planner
works without it; asking for a plot without it raises a :class:`PlannerError`
that says how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.strategies import BASELINES, HELIX_NO_OVERLAP, STRATEGY_LABELS
from vllm_helix.planner.pareto import frontier
from vllm_helix.planner.recommend import PlanPoint
from vllm_helix.planner.search import SearchResult

_STYLES: dict[str, dict[str, Any]] = {
    STRATEGY_LABELS["helix"]: {"color": "tab:red", "linewidth": 2.4, "marker": "o", "zorder": 5},
    HELIX_NO_OVERLAP: {"color": "tab:orange", "linestyle": "--", "marker": "."},
    STRATEGY_LABELS["tp"]: {"color": "tab:blue", "marker": "s"},
    STRATEGY_LABELS["tp_pp"]: {"color": "tab:green", "marker": "^"},
    STRATEGY_LABELS["dp_ep"]: {"color": "tab:purple", "marker": "v"},
    STRATEGY_LABELS["kvp"]: {"color": "tab:brown", "marker": "D"},
}
BEST_BASELINE = "best baseline"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlannerError("--plot needs matplotlib: pip install vllm-helix[plot]") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def plot_frontiers(result: SearchResult, path: str | Path, title: str | None = None,
                   highlight: PlanPoint | None = None, ttl_budget: float | None = None) -> Path:
    """Draw each family's frontier, the best-baseline envelope and the chosen point; save to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    present = set(result.families)
    for family, style in _STYLES.items():
        if family not in present:
            continue
        front = frontier(result, (family,))
        if front.rows.size:
            ax.plot(front.tokens_per_s_per_user, front.tokens_per_s_per_gpu, label=family, markersize=3.5,
                    **style)
    baselines = tuple(STRATEGY_LABELS[s] for s in BASELINES if STRATEGY_LABELS[s] in present)
    if baselines:
        envelope = frontier(result, baselines)
        ax.plot(envelope.tokens_per_s_per_user, envelope.tokens_per_s_per_gpu, color="black", linewidth=1,
                linestyle=":", label=BEST_BASELINE)
    if ttl_budget is not None:
        ax.axvline(1.0 / ttl_budget, color="gray", linewidth=0.8, linestyle="-.", label="TTL budget")
    if highlight is not None:
        ax.plot([highlight.tokens_per_s_per_user], [highlight.tokens_per_s_per_gpu], marker="*",
                markersize=16, color="gold", markeredgecolor="black", linestyle="none", zorder=10,
                label=f"chosen: {highlight.layout.family} {highlight.layout.describe()}, B={highlight.batch}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("interactivity: tokens/s/user (1 / TTL)")
    ax.set_ylabel("throughput: tokens/s/GPU")
    work = result.workload
    ax.set_title(title or f"{result.model.name} on {result.hardware.name}, {work.context:,} tokens of context "
                          f"({work.precision.weights} weights, {work.precision.kv} KV)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
