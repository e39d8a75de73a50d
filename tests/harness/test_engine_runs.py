"""Engine runs' bookkeeping without engines (vllm_helix/harness/engine_runs.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vllm_helix.harness import engine_runs
from vllm_helix.harness.engine_runs import measure_twin, merge_repeats
from vllm_helix.harness.pair_stats import pair_ratios


def test_repeated_points_merge_into_their_median_with_every_sample_kept() -> None:
    def point(context: int, batch: int, tpot: float) -> dict:
        return {"context": context, "batch": batch, "tpot_ms": tpot, "tpot_ms_per_request": [tpot] * batch,
                "wall_s": 1.0}

    merged = merge_repeats([point(4096, 1, 9.0), point(4096, 1, 6.0), point(4096, 1, 7.0),
                                         point(4096, 8, 20.0), point(4096, 8, 22.0), point(65536, 1, 30.0)])
    assert [(p["context"], p["batch"], p["tpot_ms"]) for p in merged] == [(4096, 1, 7.0), (4096, 8, 20.0),
                                                                          (65536, 1, 30.0)]
    assert merged[0]["samples_ms"] == [9.0, 6.0, 7.0] and merged[0]["wall_s"] == 3.0
    assert merged[1]["tpot_ms_per_request"] == [20.0] * 8  # the median sample's own per-request times



def test_measure_twin_alternates_tp_and_helix_engines_and_tags_every_sample(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First instances establish what fits (TP's engines, then Helix's); then instance i of TP, of Helix, ...
    Every point ends with one sample per instance and repeat, tagged with its instance."""
    calls: list[tuple[str, bool, str]] = []

    def engine(model, config, points, fill, output_len, log, timeout_s, **_):  # noqa: ANN001
        calls.append((config, fill, log.stem))
        return {"kv_cache_tokens": 10 ** 6,
                "points": [{"context": c, "batch": b, "tpot_ms": 1.0 + len(calls), "wall_s": 0.1} for c, b in points]}

    monkeypatch.setattr(engine_runs, "run_engine", engine)
    monkeypatch.setattr(engine_runs, "twin", lambda name: tmp_path / name)
    args = argparse.Namespace(contexts=[4096, 65536, 131072], batches=[1], real_prefill_max=4096, repeats=2,
                              instances=3, output_len=8, timeout=1.0, log_dir=tmp_path)
    records = measure_twin("llama_kv1", args)
    order = [(config, fill) for config, fill, _ in calls]
    first = [("TP=2", False), ("TP=2", True), ("Helix kvp=2", False), ("Helix kvp=2", True)]
    assert order == first * 3
    assert [stem.endswith(f"instance{i}") for i in (1, 2) for _, _, stem in calls[4 * i:4 * i + 4]] == [True] * 8
    for record in records:
        assert "samples" not in record
        by_context = {p["context"]: p for p in record["points"]}
        assert by_context[4096]["sample_instances"] == [0, 0, 1, 1, 2, 2] and not by_context[4096]["fill"]
        assert by_context[131072]["sample_instances"] == [0, 1, 2] and by_context[131072]["fill"]
    tp, helix = records
    assert pair_ratios(helix["points"][0], tp["points"][0]) == {0: 4.0 / 2.0, 1: 8.0 / 6.0,
                                                                            2: 12.0 / 10.0}
