"""benchmarks/results/multi_node.md is what the committed JSON says: the summary and the page are
recomputed from the pairs, so a number typed into the page, or a stale page, fails here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("multi_node_benchmark", ROOT / "benchmarks" / "multi_node.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_committed_page_and_summary_come_from_the_committed_pairs() -> None:
    payload = json.loads((bench.RESULTS / "multi_node.json").read_text())
    assert payload["summary"] == bench.summarise(payload["pairs"])
    assert (bench.RESULTS / "multi_node.md").read_text() == bench.markdown(payload)
    assert all(pair[side]["failed"] == 0 for pair in payload["pairs"] for side in ("one", "two"))


def test_the_verdict_names_a_cost_only_when_every_pair_agrees_on_its_sign() -> None:
    pair = {"one": {"tpot_ms": 10.0, "routes": ["shared-memory all-gather"]},
            "two": {"tpot_ms": 12.0, "routes": ["all-to-all over gloo"]}}
    payload = {"date": "2026-01-01", "machine": {"cpu": "test", "amx": False, "cores": 2, "python": "3", "versions": {}},
               "twin": "t", "layers": 2, "helix": "kvp=2", "prompts": 1,
               "input_len": 8, "output_len": 4, "pairs": [pair, pair]}
    payload["summary"] = bench.summarise(payload["pairs"])
    page = bench.markdown(payload)
    assert "+2.00 ms per decode step, i.e. +500 us per KVP collective" in page
    assert "both deployments run the exchange over gloo" not in page
