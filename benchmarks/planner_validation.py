"""Does the calibrated planner predict the long-context points it was not fitted on?

``measure_hardware.py`` times the long-context sweep (``long_context.json``: TP=2
and Helix kvp=2, both twins, 4K to 2M tokens, batch 1 and 8) and, in the same run,
fits this machine's profile on five points per (twin, layout): the sweep's 4K
batch 1 and 8 and its long point, and two 4-layer 4K points. This script prices
every sweep point with ``vllm-helix plan``'s cost model on that profile and compares:

* every TPOT: error = predicted / measured - 1. The fit's own points are marked
  'fit' (reproduced, exactly unless a constant was held at zero); every other point is held out and must land
  within 20%;
* the crossover context where Helix starts to win (measured: log-linear between
  the sweep's points, as ``long_context.md`` does; predicted: where the model's
  ratio crosses 1), within 25%.

Writes ``benchmarks/results/planner_validation.{json,md,png}``;
``tests/benchmarks/test_planner_validation.py`` recomputes it from the committed
profile and sweep, so a cost-model change that breaks the fit goes red.

    .venv/bin/python -m benchmarks.planner_validation
    .venv/bin/python -m benchmarks.planner_validation --run benchmarks/results/runs/<run stamp>

``--run`` judges an archived run (its sweep against the ``profile.yaml`` fitted in it); the committed
page lists every archived run's verdict, against its own fit and against the committed profile.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path
from typing import Any

from vllm_helix.harness.calibration_runs import fit_pairs, twin_spec
from vllm_helix.harness.pair_stats import crossover, instance_medians, ratios, records_of, tokens_text
from vllm_helix.host import profile_name
from vllm_helix.harness.machine import machine_line
from vllm_helix.planner.fit import SERVED_LAYOUTS, EnginePoint, predicted_step
from vllm_helix.planner.hardware_spec import HARDWARE_PRESET_DIR, HardwareSpec, load_hardware

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TPOT_TOLERANCE, CROSSOVER_TOLERANCE = 0.20, 0.25


def predicted_tpot_ms(hw: HardwareSpec, model: str, config: str, context: int, batch: int) -> float:
    point = EnginePoint(twin_spec(model, 2), SERVED_LAYOUTS[config], context, batch, tpot=0.0)
    return float(predicted_step(point, hw).ttl[0]) * 1e3


def predicted_ratio(hw: HardwareSpec, model: str, batch: int, context: float) -> float:
    """The model's Helix kvp=2 / TP=2 TPOT at ``context``."""
    c = int(round(context))
    return predicted_tpot_ms(hw, model, "Helix kvp=2", c, batch) / predicted_tpot_ms(hw, model, "TP=2", c, batch)


def predicted_crossover(hw: HardwareSpec, model: str, batch: int, low: int, high: int) -> float | None:
    """Context in [low, high] where the model's Helix/TP ratio crosses 1 (bisection in log context)."""
    ratio = functools.partial(predicted_ratio, hw, model, batch)
    if ratio(low) < 1.0:
        return float(low)  # wins from the shortest context on, as long_context.crossover reports it
    if ratio(high) >= 1.0:
        return None
    a, b = math.log(low), math.log(high)
    for _ in range(40):
        middle = (a + b) / 2
        a, b = (middle, b) if ratio(math.exp(middle)) >= 1.0 else (a, middle)
    return math.exp((a + b) / 2)


def crossover_range(sweep: dict[str, Any], model: str, batch: int) -> list[float | None]:
    """The lowest and highest crossover that one engine pair measured on its own (TP=2's instance i against
    Helix's instance i, ``ratios(..., instance=i)``): the spread of the measurement itself.
    ``None`` as the upper end: some pair never crosses within the sweep; ``[None, None]``: none does."""
    tp, helix = records_of(sweep, model)
    instances = sorted({i for record in (tp, helix) if record for p in record["points"] if "tpot_ms" in p
                        for i in instance_medians(p)})
    found = [crossover(ratios(sweep, model, batch, instance)) for instance in instances]
    crossed = [c for c in found if c is not None]
    return [min(crossed) if crossed else None, max(crossed) if len(crossed) == len(found) and crossed else None]


def validate(sweep: dict[str, Any], hw: HardwareSpec) -> dict[str, Any]:
    """Every measured point priced, errors, and crossovers, against the tolerances."""
    rows = []
    for record in sweep["records"]:
        fitted = fit_pairs(record["model"])
        for point in record["points"]:
            if "tpot_ms" not in point:
                continue
            predicted = predicted_tpot_ms(hw, record["model"], record["config"], point["context"], point["batch"])
            rows.append({"model": record["model"], "config": record["config"], "context": point["context"],
                         "batch": point["batch"], "measured_ms": point["tpot_ms"],
                         "samples_ms": point.get("samples_ms", [point["tpot_ms"]]), "predicted_ms": predicted,
                         "error": predicted / point["tpot_ms"] - 1.0,
                         "role": "fit" if (point["context"], point["batch"]) in fitted else "held out"})
    crossovers = []
    for model in sorted({r["model"] for r in sweep["records"]}):
        for batch in sweep["settings"]["batches"]:
            pairs = ratios(sweep, model, batch)
            measured = crossover(pairs)
            if measured is None or len(pairs) < 2:
                continue
            predicted = predicted_crossover(hw, model, batch, pairs[0][0], pairs[-1][0])
            floor = measured == pairs[0][0]  # measured: Helix wins from the shortest context on
            error = (None if predicted is None else
                     0.0 if floor and predicted <= measured else predicted / measured - 1.0)
            crossovers.append({"model": model, "batch": batch, "measured": measured, "predicted": predicted,
                               "at_shortest_context": floor, "error": error,
                               "predicted_ratio_at_measured": predicted_ratio(hw, model, batch, measured),
                               "measured_ratios": pairs,
                               "measured_range": crossover_range(sweep, model, batch)})
    held = [r for r in rows if r["role"] == "held out"]
    return {"profile": hw.name, "profile_description": hw.description,
            "sweep_machine": sweep["machine"], "sweep_date": sweep["date"], "sweep_run": sweep.get("run"),
            "sweep_instances": sweep["settings"].get("instances", 1),
            "sweep_pairs_back_to_back": sweep["settings"].get("pairs_back_to_back", False), "rows": rows,
            "crossovers": crossovers,
            "summary": {"held_out": len(held),
                        "held_out_within": sum(abs(r["error"]) <= TPOT_TOLERANCE for r in held),
                        "mean_abs_error_held_out": sum(abs(r["error"]) for r in held) / max(1, len(held)),
                        "crossovers_within": sum(c["error"] is not None and abs(c["error"]) <= CROSSOVER_TOLERANCE
                                                 for c in crossovers)}}


def _tokens(n: float | None) -> str:
    return "-" if n is None else tokens_text(n)


def markdown(result: dict[str, Any], other_runs: list[str] | None = None,
             constants: list[str] | None = None) -> str:
    s = result["summary"]
    committed = result["run_dir"] == str(RESULTS.relative_to(ROOT))
    calibration = "[calibration.md](calibration.md)" if committed else "its engine timings in `calibration.json` here"
    option = "" if committed else f" --run {result['run_dir']}"
    lines = [
        "# The planner against the long-context points it was not fitted on",
        "",
        f"Profile `{result['profile_file']}` (fitted by `benchmarks/measure_hardware.py` in the sweep's run, "
        f"{calibration}) against `{result['run_dir']}/long_context.json` ({result['sweep_date']}, "
        f"{machine_line(result['sweep_machine'])}). Predicted = `vllm-helix plan`'s cost model "
        "(`vllm_helix.planner.cost.step_cost`) for the same twin, layout, context and batch; error = predicted / "
        f"measured - 1. Held-out points must be within {TPOT_TOLERANCE:.0%}, crossovers within "
        f"{CROSSOVER_TOLERANCE:.0%}. Reproduce: `.venv/bin/python -m benchmarks.planner_validation{option}`.",
        "",
        f"**Held out: {s['held_out_within']} of {s['held_out']} TPOTs within {TPOT_TOLERANCE:.0%}** (mean absolute "
        f"error {s['mean_abs_error_held_out']:.1%}); **crossovers: {s['crossovers_within']} of "
        f"{len(result['crossovers'])} within {CROSSOVER_TOLERANCE:.0%}**.",
        "",
        "| twin | configuration | context | batch | measured ms | predicted ms | error | point |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['config']} | {r['context']:,} | {r['batch']} | {r['measured_ms']:.1f} | "
                     f"{r['predicted_ms']:.1f} | {r['error']:+.1%} | {r['role']} |")
    lines += ["", "## Crossover: the context from which Helix kvp=2 decodes faster than TP=2", "",
              "Measured from the Helix/TP ratio at each context, the median over engine pairs (TP=2's instance i "
              "against Helix's instance i) of each pair's ratio of medians, log-linear between points, as "
              "long_context.md; the range spans the crossovers the pairs measure each on its own ('-' as the upper "
              "end: some pair never crosses), the spread of the measurement itself. '<=' means Helix already wins at "
              "the shortest context. "
              "'model's ratio there': the cost model's Helix/TP TPOT at the measured crossover (for a crossing inside the "
              "sweep 1.00 would be exact; on a '<=' row any value below 1 agrees).", "",
              "| twin | batch | measured | range over pairs | predicted | error | model's ratio there |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for c in result["crossovers"]:
        measured = ("<= " if c["at_shortest_context"] else "~") + _tokens(c["measured"])
        low, high = c["measured_range"]
        error = "-" if c["error"] is None else f"{c['error']:+.0%}"
        lines.append(f"| {c['model']} | {c['batch']} | {measured} | {_tokens(low)} to {_tokens(high)} | "
                     f"{_tokens(c['predicted'])} | {error} | {c['predicted_ratio_at_measured']:.2f} |")
    lines += ["", "## Reading", ""]
    misses = [r for r in result["rows"] if r["role"] == "held out" and abs(r["error"]) > TPOT_TOLERANCE]
    for r in misses:
        inside = min(r["samples_ms"]) <= r["predicted_ms"] <= max(r["samples_ms"])
        lines.append(f"- Miss: {r['model']} {r['config']} at {r['context']:,} tokens, batch {r['batch']}: "
                     f"{r['error']:+.0%} (measured {r['measured_ms']:.1f} ms, samples "
                     f"{', '.join(f'{v:.1f}' for v in r['samples_ms'])}; the prediction lies "
                     f"{'inside' if inside else 'outside'} the samples' range).")
    instances = result.get("sweep_instances", 1)
    order = ("TP=2's and Helix's engines alternated (instance i of each back to back), so a pair's ratio is timed "
             "minutes apart" if result.get("sweep_pairs_back_to_back") else
             "all of TP=2's engines of a twin before all of Helix's (this run predates alternating them), so a "
             "pair's ratio spans the machine's drift over tens of minutes")
    lines += [
        "- How the points were timed: one engine's repeated samples of a point agree within ~10-20%, but the same "
        "point moves by 30-40% between engine instances on this VM (which cores the workers land on, where vLLM's "
        f"allocator put the blocks). The sweep therefore times every point in {instances} fresh engines and keeps "
        f"the median of all their samples (the samples above run instance by instance); {order}. The profile "
        f"({result['profile_description']}) was fitted in the same run (`run` {result.get('sweep_run', '-')}): "
        "the machine's speed drifts between hours by more than the model's error, so a fit from another hour "
        "would judge the drift, not the model.",
        "- The crossover is the context where two such curves meet, so its error is the difference of two noisy "
        "fixed costs divided by a small slope: where the measured ratio falls slowly, a few percent of error in "
        "either TPOT moves it by a large factor, which the spread of the pairs' own crossovers shows.",
        *crossover_miss_lines(result),
        *(["", "## Other runs on this machine kind", "", *other_runs] if other_runs else []),
        *(["", "## The fitted constants across runs", "",
           "Each run fits five constants per engine from five points; the per-step and per-layer costs trade "
           "off against each other (2- and 4-layer twins only), so they move between runs by more than the "
           "predictions do:", "", *constants] if constants else []),
        "",
        "![predicted against measured TPOT](planner_validation.png)", ""]
    return "\n".join(lines) + "\n"


def crossover_miss_lines(result: dict[str, Any]) -> list[str]:
    """One line per crossover outside the tolerance: how flat the measured ratio is around it."""
    lines = []
    for c in result["crossovers"]:
        if c["error"] is not None and abs(c["error"]) <= CROSSOVER_TOLERANCE:
            continue
        around = ", ".join(f"{r:.2f} at {tokens_text(context)}" for context, r in c["measured_ratios"])
        low, high = c["measured_range"]
        moved = "" if c["predicted"] is None else f", and that moves the crossover {c['predicted'] / c['measured']:.1f}x"
        lines.append(
            f"- Miss: the {c['model']} batch-{c['batch']} crossover, measured ~{_tokens(c['measured'])} (the pairs "
            f"span {_tokens(low)} to {_tokens(high)}), predicted {_tokens(c['predicted'])}. The measured Helix/TP "
            f"ratio is {around}; the model puts the layouts {abs(c['predicted_ratio_at_measured'] - 1):.0%} apart "
            f"where they measured equal{moved}.")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    markers = {"llama_kv1": "o", "deepseek_v3": "s"}
    colors = {"TP=2": "tab:blue", "Helix kvp=2": "tab:red"}
    for r in result["rows"]:
        ax.scatter(r["measured_ms"], r["predicted_ms"], marker=markers.get(r["model"], "o"),
                   color=colors[r["config"]], facecolors="none" if r["role"] == "fit" else colors[r["config"]])
    values = [v for r in result["rows"] for v in (r["measured_ms"], r["predicted_ms"])]
    low, high = min(values) / 1.3, max(values) * 1.3
    ax.plot([low, high], [low, high], color="black", linewidth=1)
    for factor in (1 - TPOT_TOLERANCE, 1 + TPOT_TOLERANCE):
        ax.plot([low, high], [low * factor, high * factor], color="grey", linestyle="--", linewidth=0.8)
    for model, marker in markers.items():
        for config, color in colors.items():
            ax.scatter([], [], marker=marker, color=color, label=f"{model}, {config}")
    ax.scatter([], [], marker="o", color="grey", facecolors="none", label="fit point")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("measured TPOT ms (long_context.json)")
    ax.set_ylabel("predicted TPOT ms (vllm-helix plan's cost model)")
    ax.set_title(f"Planner on {result['profile']}: dashed = +/-{TPOT_TOLERANCE:.0%}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RUNS = RESULTS / "runs"


def archived_runs() -> list[Path]:
    """The archived runs (``results/runs/<run stamp>/``), oldest first."""
    return sorted(p for p in RUNS.glob("*") if p.is_dir())


def compute(run: Path = RESULTS, profile: Path | None = None) -> dict[str, Any]:
    """The validation of ``run``'s sweep (``long_context.json``) against ``profile``: by default the profile
    fitted in that run (the machine's preset for the committed run; ``profile.yaml`` for an archived run
    under ``results/runs/``, which keeps its own so the planner still reads one profile per machine)."""
    sweep = json.loads((run / "long_context.json").read_text())
    if profile is None:
        archived = run / "profile.yaml"
        machine = sweep["machine"]
        name = profile_name(machine["cpu"], machine["cores"], machine.get("isa"))
        profile = archived if archived.exists() else HARDWARE_PRESET_DIR / f"{name}.yaml"
    return {"profile_file": str(profile.resolve().relative_to(ROOT)), "run_dir": str(run.resolve().relative_to(ROOT)),
            **validate(sweep, load_hardware(str(profile)))}


def other_run_lines(committed_profile: Path) -> list[str]:
    """The archived runs, each judged against its own fit and against the committed profile: how far the
    verdict moves between runs on this VM (computed here, so the page never quotes a stale archive)."""
    lines = []
    for run in archived_runs():
        own, committed = compute(run), compute(run, committed_profile)
        crossovers = "; ".join(
            f"{c['model']} batch {c['batch']} {'<= ' if c['at_shortest_context'] else '~'}{_tokens(c['measured'])} "
            f"(pairs span {_tokens(c['measured_range'][0])} to {_tokens(c['measured_range'][1])})"
            for c in own["crossovers"])
        contexts = json.loads((run / "long_context.json").read_text())["settings"]["contexts"]
        lines.append(
            f"- [runs/{run.name}](runs/{run.name}/planner_validation.md) (`run` {own['sweep_run']}, "
            f"contexts {', '.join(_tokens(c) for c in contexts)}): "
            f"against its own fit, {_summary(own)}; against this page's profile, {_summary(committed)}. "
            f"Measured crossovers there: {crossovers}.")
    return lines


def constant_spread_lines(committed_profile: Path) -> list[str]:
    """The fitted constants of the committed profile beside their range over every run's fit (committed and
    archived): how well five points per engine determine them on this VM."""
    import yaml

    profiles = [committed_profile, *(run / "profile.yaml" for run in archived_runs() if (run / "profile.yaml").exists())]
    fits = [yaml.safe_load(path.read_text())["calibration"] for path in profiles]
    lines = ["| attention | engine | constant | this page's profile | range over the " + str(len(fits)) + " runs' fits |",
             "|---|---|---|---:|---:|"]
    for kind in ("gqa", "mla"):
        for engine in ("vllm", "helix"):
            for constant in ("step_ms", "layer_ms", "sequence_ms", "sequence_layer_ms", "kv_read_gb_s"):
                values = [fit[kind][engine][constant] for fit in fits if engine in fit.get(kind, {})]
                if values:
                    lines.append(f"| {kind} | {engine} | {constant} | {values[0]:.3f} | "
                                 f"{min(values):.3f}-{max(values):.3f} |")
    return lines


def _summary(result: dict[str, Any]) -> str:
    s = result["summary"]
    return (f"{s['held_out_within']} of {s['held_out']} held-out TPOTs within {TPOT_TOLERANCE:.0%} (mean "
            f"{s['mean_abs_error_held_out']:.1%}), {s['crossovers_within']} of {len(result['crossovers'])} "
            f"crossovers within {CROSSOVER_TOLERANCE:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=RESULTS,
                        help="a directory holding long_context.json (and profile.yaml for an archived run); "
                             "the comparison is written there")
    args = parser.parse_args()
    if not (args.run / "long_context.json").exists() or not args.run.resolve().is_relative_to(ROOT):
        parser.error(f"--run {args.run}: expected a directory inside the repository holding long_context.json "
                     "(benchmarks/results, or an archived run under benchmarks/results/runs/)")
    result = compute(args.run)
    committed = args.run.resolve() == RESULTS
    extra = other_run_lines(ROOT / result["profile_file"]) if committed else []
    constants = constant_spread_lines(ROOT / result["profile_file"]) if committed else []
    (args.run / "planner_validation.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.run / "planner_validation.md").write_text(markdown(result, extra, constants))
    plot(result, args.run / "planner_validation.png")
    print(markdown(result, extra, constants))


if __name__ == "__main__":
    main()
