"""The calibration's bookkeeping without engines (vllm_helix/harness/calibration_runs.py): which sweep points the
fit takes, the profile it writes, and that the planner reads that profile back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from vllm_helix.harness.calibration_runs import SHORT_CONTEXT, fit_pairs, sweep_fit_rows

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _committed_sweep() -> dict:
    return json.loads((COMMITTED / "long_context.json").read_text())


def test_the_fit_takes_the_sweeps_short_and_long_points_and_nothing_else() -> None:
    for record in _committed_sweep()["records"]:
        rows = sweep_fit_rows(record)
        assert {(r["context"], r["batch"]) for r in rows} == fit_pairs(record["model"])
        by_pair = {(p["context"], p["batch"]): p for p in record["points"]}
        for r in rows:
            assert r["layers"] == 2 and r["tpot_ms"] == by_pair[(r["context"], r["batch"])]["tpot_ms"]


def test_a_sweep_without_a_fit_point_is_refused_by_name() -> None:
    record = copy.deepcopy(_committed_sweep()["records"][0])
    record["points"] = [p for p in record["points"] if p["context"] != SHORT_CONTEXT]
    with pytest.raises(SystemExit, match=r"has no TPOT at \[\(4096, 1\), \(4096, 8\)\]"):
        sweep_fit_rows(record)
