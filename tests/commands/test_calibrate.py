"""`vllm-helix calibrate` without engines: the machine's rates and the fit's engine points replaced by the
committed calibration's, it writes one profile per machine kind into the user's profile directory, which
`plan --hardware this` then reads (the measurement itself ran on this machine kind: README, 'Calibrate')."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vllm_helix.commands.cli import main
from vllm_helix.harness import calibration_runs
from vllm_helix.host import this_machine_profile_name

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "calibration.json"


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch, fake_machine_rates: None) -> list[dict]:
    rows = json.loads(COMMITTED.read_text())["engine"]
    monkeypatch.setattr(calibration_runs, "fit_point_rows", lambda timing: rows)
    return rows


def test_calibrate_writes_this_machines_profile_where_plan_finds_it(
        measured: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VLLM_HELIX_PROFILE_DIR", str(tmp_path))
    assert main(["calibrate", "--log-dir", str(tmp_path / "logs")]) == 0
    path = tmp_path / f"{this_machine_profile_name()}.yaml"
    assert f"wrote {path}" in capsys.readouterr().out
    profile = yaml.safe_load(path.read_text())
    assert profile["platform"].startswith("cpu:") and set(profile["machine"]) == {"cpu", "amx", "isa", "cores"}
    assert set(profile["calibration"]) == {"source", "gqa", "mla"}
    assert "over gloo" in path.read_text()  # the header names the collective's transport
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed
    timings = json.loads((tmp_path / f"{this_machine_profile_name()}.timings.json").read_text())
    assert timings["engine"] == measured and timings["collectives"]["transport"] == "gloo"  # the fit's inputs
    assert main(["plan", "--model", "tiny-llama", "--hardware", "this", "--context", "64K", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["hardware"] == this_machine_profile_name()
    assert not any("was measured on" in w for w in plan["warnings"])  # measured here: no machine warning


def test_plan_for_this_machine_without_a_profile_says_how_to_make_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VLLM_HELIX_PROFILE_DIR", str(tmp_path))
    monkeypatch.setattr("vllm_helix.planner.hardware_spec.this_machine_profile_name", lambda: "cpu-nothing-3core")
    assert main(["plan", "--model", "tiny-llama", "--hardware", "this"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no profile of this machine kind (cpu-nothing-3core)" in err
    assert "vllm-helix calibrate" in err


def test_a_calibrated_profile_replaces_the_preset_of_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_helix.planner.hardware_spec import HARDWARE_PRESET_DIR, load_hardware

    monkeypatch.setenv("VLLM_HELIX_PROFILE_DIR", str(tmp_path))
    preset = yaml.safe_load((HARDWARE_PRESET_DIR / "cpu-epyc-2core.yaml").read_text())
    assert load_hardware("cpu-epyc-2core").memory_bandwidth == pytest.approx(preset["memory"]["bandwidth_gb_s"] * 1e9)
    (tmp_path / "cpu-epyc-2core.yaml").write_text(yaml.safe_dump({**preset, "memory": {**preset["memory"],
                                                                                       "bandwidth_gb_s": 99.0}}))
    assert load_hardware("cpu-epyc-2core").memory_bandwidth == pytest.approx(99e9)  # one profile per machine kind


def test_bad_calibrate_settings_are_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--instances", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "time each point at least once" in err
