"""The README's headline results table, rendered from the committed results JSON (never typed by hand).

Each row reads one results file: the long-context sweep (Helix / TP ratios as the median over engine
pairs with their range, the longest context only Helix holds, the KV capacity), the planner's
held-out validation, the prefill/decode split and the run across two loopback nodes, and names the
machine and date the file records. ``tests/benchmarks/test_headline.py`` fails when the README's
block differs from this rendering; after a new run:

    .venv/bin/python -m benchmarks.headline       # rewrites the block between the README's markers
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from vllm_helix.harness.machine import machine_line
from vllm_helix.harness.pair_stats import pair_ratios, point_at, records_of, tokens_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results-headline -->\n)(.*?)(<!-- /results-headline -->)", re.DOTALL)
TWINS = {"llama_kv1": "Llama twin (GQA, 1 KV head)", "deepseek_v3": "DeepSeek-V3 twin (MLA)"}


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def _where(machine: dict[str, Any], date: str) -> str:
    return f"{machine_line(machine)}; {date}"


def _ratio_cell(helix: dict[str, Any], tp: dict[str, Any]) -> str:
    """Median Helix / TP over engine pairs, with the pairs' range."""
    pairs = sorted(pair_ratios(helix, tp).values())
    median = statistics.median(pairs)
    return f"{median:.2f}x ({pairs[0]:.2f}-{pairs[-1]:.2f}, {len(pairs)} pairs)"


def long_context_rows(sweep: dict[str, Any]) -> list[list[str]]:
    """Per twin at batch 1: the ratio at the shortest and the longest context both layouts ran, the longest
    context only Helix decoded (with its TPOT), and the KV capacity ratio."""
    where, rows = _where(sweep["machine"], sweep["date"]), []
    for twin, label in TWINS.items():
        tp, helix = records_of(sweep, twin)
        if tp is None or helix is None:
            continue
        both = [c for c in sweep["settings"]["contexts"]
                if all("tpot_ms" in (point_at(r, c, 1) or {}) for r in (tp, helix))]
        for context in (both[0], both[-1]):
            rows.append([f"{label}: Helix kvp=2 / TP=2 TPOT at {tokens_text(context)}, batch 1",
                         _ratio_cell(point_at(helix, context, 1), point_at(tp, context, 1)), where,
                         "long_context.md"])
        alone = [c for c in sweep["settings"]["contexts"] if c > both[-1] and "tpot_ms" in (point_at(helix, c, 1) or {})]
        if alone:
            rows.append([f"{label}: longest context, Helix only (TP=2 cannot hold it)",
                         f"{tokens_text(alone[-1])} at {point_at(helix, alone[-1], 1)['tpot_ms']:.0f} ms/token",
                         where, "long_context.md"])
        rows.append([f"{label}: KV cache tokens, Helix / TP=2, same memory",
                     f"{helix['kv_cache_tokens'] / tp['kv_cache_tokens']:.2f}x", where, "long_context.md"])
    return rows


def planner_rows(validation: dict[str, Any]) -> list[list[str]]:
    summary = validation["summary"]
    where = _where(validation["sweep_machine"], validation["sweep_date"])
    return [[f"Planner ({validation['profile']}): held-out TPOTs within 20%",
             f"{summary['held_out_within']} of {summary['held_out']} (mean error "
             f"{100 * summary['mean_abs_error_held_out']:.1f}%)", where, "planner_validation.md"],
            ["Planner: crossover contexts within 25%",
             f"{summary['crossovers_within']} of {len(validation['crossovers'])}", where, "planner_validation.md"]]


def split_rows(split: dict[str, Any]) -> list[list[str]]:
    where = _where(split["machine"], split["date"])
    return [[f"Split, {TWINS[r['model']]}: plain prefill -> Helix decode behind vllm-router",
             f"{r['identical_tokens']} of {r['prompts']} prompts token-identical, logprobs within "
             f"{r['max_logprob_diff']:.1e}; {r['bench']['failed']} failed of {r['bench']['completed']}",
             where, "serve_split.md"] for r in split["records"]]


def multi_node_rows(nodes: dict[str, Any]) -> list[list[str]]:
    summary = nodes["summary"]
    return [[f"Helix {nodes['helix'].split(',tpf')[0]} over two loopback nodes / one node, TPOT",
             f"{summary['ratio_median']:.2f}x ({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f}, "
             f"{len(nodes['pairs'])} pairs)", _where(nodes["machine"], nodes["date"]), "multi_node.md"]]


def render() -> str:
    """The table, from the committed JSON."""
    rows = (long_context_rows(_load("long_context.json")) + planner_rows(_load("planner_validation.json"))
            + split_rows(_load("serve_split.json")) + multi_node_rows(_load("multi_node.json")))
    lines = ["| result | value (ratios: median over engine pairs, their range) | machine; date | details |",
             "|---|---|---|---|"]
    lines += [f"| {what} | {value} | {where} | [{page}](benchmarks/results/{page}) |" for what, value, where, page in rows]
    return "\n".join(lines) + "\n"


def regenerate(readme: str) -> str:
    """``readme`` with the headline block replaced by :func:`render`."""
    if not BLOCK.search(readme):
        raise SystemExit("README.md has no <!-- results-headline --> block")
    return BLOCK.sub(lambda m: m.group(1) + render() + m.group(3), readme)


def main() -> None:
    README.write_text(regenerate(README.read_text()))
    print(render())


if __name__ == "__main__":
    main()
