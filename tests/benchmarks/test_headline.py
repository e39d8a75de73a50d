"""The README's headline results are the committed JSON's, rendered (benchmarks/headline.py)."""

from __future__ import annotations

import pytest

from benchmarks import headline


def test_the_readme_headline_is_the_committed_results_rendered() -> None:
    readme = headline.README.read_text()
    assert headline.regenerate(readme) == readme, (
        "README.md's results table differs from the committed JSON: run `.venv/bin/python -m benchmarks.headline`")


def test_ratios_are_medians_over_engine_pairs_with_their_range() -> None:
    def point(samples: list[float]) -> dict:
        return {"context": 4096, "batch": 1, "tpot_ms": sorted(samples)[1], "samples_ms": samples,
                "sample_instances": [0, 1, 2], "instances": 3}

    sweep = {"date": "2026-01-01", "machine": {"cpu": "X", "amx": False, "cores": 2},
             "settings": {"contexts": [4096, 8192]}, "records": [
                 {"model": "llama_kv1", "config": "TP=2", "kv_cache_tokens": 100,
                  "points": [point([10.0, 20.0, 10.0]), {"context": 8192, "batch": 1, "does_not_fit": "x"}]},
                 {"model": "llama_kv1", "config": "Helix kvp=2", "kv_cache_tokens": 200,
                  "points": [point([8.0, 10.0, 12.0]), {**point([30.0, 30.0, 30.0]), "context": 8192}]}]}
    rows = headline.long_context_rows(sweep)
    ratio = next(r for r in rows if "TPOT at 4K" in r[0])
    assert ratio[1] == "0.80x (0.50-1.20, 3 pairs)"  # pairs 0.8, 0.5, 1.2: median and range, not pooled medians
    assert any(r[1] == "8K at 30 ms/token" for r in rows) and any(r[1] == "2.00x" for r in rows)


def test_a_readme_without_the_markers_is_refused() -> None:
    with pytest.raises(SystemExit, match="no <!-- results-headline --> block"):
        headline.regenerate("# README\n")
