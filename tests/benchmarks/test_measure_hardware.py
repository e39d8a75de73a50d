"""measure_hardware.py's bookkeeping without engines: the fit takes its 2-layer points from the sweep of
the same run, refuses a sweep that lacks one, and writes a profile the planner reads back with the sweep
stamped by the same run (engines and machine timings replaced by the committed numbers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import long_context  # noqa: E402
from benchmarks import measure_hardware  # noqa: E402
from benchmarks import planner_validation  # noqa: E402
from vllm_helix.harness.calibration_runs import DEEPER, fit  # noqa: E402
from vllm_helix.harness.engine_runs import CONFIGS  # noqa: E402
from vllm_helix.planner.hardware_spec import hardware_from_dict  # noqa: E402

COMMITTED = measure_hardware.RESULTS


def _committed_sweep() -> dict:
    return json.loads((COMMITTED / "long_context.json").read_text())


def _committed_deeper_rows(model: str, config: str) -> list[dict]:
    rows = json.loads((COMMITTED / "calibration.json").read_text())["engine"]
    return [r for r in rows if r["model"] == model and r["config"] == config and r["layers"] == DEEPER]


def test_one_run_writes_a_profile_the_planner_reads_and_a_sweep_with_the_same_stamp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_machine_rates: None) -> None:
    sweep = _committed_sweep()
    records = {(r["model"], r["config"]): r for r in sweep["records"]}
    for module in (measure_hardware, long_context):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(measure_hardware, "HARDWARE_PRESET_DIR", tmp_path)
    monkeypatch.setattr(measure_hardware, "measure_twin",
                        lambda model, args: [records[(model, config)] for config in CONFIGS])
    monkeypatch.setattr(measure_hardware, "deeper_rows",
                        lambda model, config, timing: _committed_deeper_rows(model, config))
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
    refit = fit(profile, calibration["engine"], measure_hardware.SOURCE)  # the profile holds the fit of the rows written
    assert refit == profile["calibration"]
    deeper = {(r["model"], r["config"]) for r in calibration["engine"] if r["layers"] == DEEPER}
    assert deeper == set(records)
