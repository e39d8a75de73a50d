"""measure_hardware.py's bookkeeping without engines: the fit takes its 2-layer points from the sweep of
the same run, refuses a sweep that lacks one, and writes a profile the planner reads back with the sweep
stamped by the same run (engines and machine timings replaced by the committed numbers)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import long_context  # noqa: E402
import measure_hardware  # noqa: E402
import planner_validation  # noqa: E402
from vllm_helix.planner.hardware_spec import hardware_from_dict  # noqa: E402

COMMITTED = measure_hardware.RESULTS


def _committed_sweep() -> dict:
    return json.loads((COMMITTED / "long_context.json").read_text())


def _committed_deeper_rows(model: str, config: str) -> list[dict]:
    rows = json.loads((COMMITTED / "calibration.json").read_text())["engine"]
    return [r for r in rows if r["model"] == model and r["config"] == config and r["layers"] == measure_hardware.DEEPER]


def test_the_fit_takes_the_sweeps_short_and_long_points_and_nothing_else() -> None:
    for record in _committed_sweep()["records"]:
        rows = measure_hardware.sweep_fit_rows(record)
        assert {(r["context"], r["batch"]) for r in rows} == measure_hardware.fit_pairs(record["model"])
        by_pair = {(p["context"], p["batch"]): p for p in record["points"]}
        for r in rows:
            assert r["layers"] == 2 and r["tpot_ms"] == by_pair[(r["context"], r["batch"])]["tpot_ms"]


def test_a_sweep_without_a_fit_point_is_refused_by_name() -> None:
    record = copy.deepcopy(_committed_sweep()["records"][0])
    record["points"] = [p for p in record["points"] if p["context"] != measure_hardware.SHORT_CONTEXT]
    with pytest.raises(SystemExit, match=r"has no TPOT at \[\(4096, 1\), \(4096, 8\)\]"):
        measure_hardware.sweep_fit_rows(record)


def test_one_run_writes_a_profile_the_planner_reads_and_a_sweep_with_the_same_stamp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = _committed_sweep()
    records = {(r["model"], r["config"]): r for r in sweep["records"]}
    for module in (measure_hardware, long_context):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(measure_hardware, "HARDWARE_PRESET_DIR", tmp_path)
    monkeypatch.setattr(measure_hardware, "measure_memory", lambda repeats: {"copy_bytes_per_s": 20e9,
                                                                            "read_bytes_per_s": 15e9})
    monkeypatch.setattr(measure_hardware, "measure_matmul", lambda dtype, size, repeats: 1e11)
    monkeypatch.setattr(measure_hardware, "measure_shm", lambda repeats: {
        op: {"latency_s": 5e-6, "bandwidth_bytes_per_s": 4e9} for op in ("all_reduce", "all_gather")})
    monkeypatch.setattr(long_context, "measure_twin",
                        lambda model, args: [records[(model, config)] for config in long_context.CONFIGS])
    monkeypatch.setattr(measure_hardware, "deeper_rows", lambda model, config, args: _committed_deeper_rows(model, config))
    monkeypatch.setattr(sys, "argv", ["measure_hardware.py"])
    measure_hardware.main()

    calibration = json.loads((tmp_path / "calibration.json").read_text())
    written = json.loads((tmp_path / "long_context.json").read_text())
    assert calibration["run"] == written["run"] and written["records"] == sweep["records"]
    assert (tmp_path / "long_context.md").exists() and (tmp_path / "calibration.md").exists()
    profile = yaml.safe_load((tmp_path / f"{calibration['profile_name']}.yaml").read_text())
    hw = hardware_from_dict(profile, profile["name"])
    result = planner_validation.validate(written, hw)
    assert len([r for r in result["rows"] if r["role"] == "fit"]) == 12  # 3 sweep points per (twin, layout)
    assert len([r for r in result["rows"] if r["role"] == "held out"]) >= 15
    refit = measure_hardware.fit(profile, calibration["engine"])  # the profile holds the fit of the rows written
    assert refit == profile["calibration"]
    deeper = {(r["model"], r["config"]) for r in calibration["engine"] if r["layers"] == measure_hardware.DEEPER}
    assert deeper == set(records)
