"""`vllm-helix calibrate`: measure this machine and write its planner profile, which `plan` then reads.

Measures the machine (memory bandwidth, matmul rates, the collective the workers use) and times
the fit's engine points only (both twins, TP=2 and Helix kvp=2, 2 and 4 layers: 16 fresh engines
at the defaults, 17.2 minutes on the AVX2 EPYC's two cores), fits the cost model's engine constants and
writes one profile per machine kind, ``<profile dir>/cpu-<family>[-avx2]-<cores>core.yaml``, and beside it
the timings it was fitted to (``....timings.json``). The
profile directory is the user's (``$VLLM_HELIX_PROFILE_DIR``, else
``$XDG_CONFIG_HOME/vllm-helix/hardware``, else ``~/.config/vllm-helix/hardware``); a profile
there is found before the presets of the same name, and ``plan --hardware this`` picks it.
``benchmarks/measure_hardware.py`` runs the same fit inside the full long-context sweep, which
the planner's validation predicts (about an hour).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "measure this machine (CPU) and write the planner profile `plan --hardware this` reads (~17 min)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=None,
                        help="directory to write the profile to (default: the user's profile directory, "
                             "$VLLM_HELIX_PROFILE_DIR or ~/.config/vllm-helix/hardware)")
    parser.add_argument("--instances", type=int, default=2, help="fresh engines per point set")
    parser.add_argument("--repeats", type=int, default=3, help="samples per 4K point in each engine")
    parser.add_argument("--output-len", type=int, default=32, help="tokens decoded per timed request")
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/calibration"), help="engine logs")


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from patches_free_hooks.cpu_collectives import measured_collectives
    from vllm_helix.harness.calibration_runs import Timing, fit, fit_point_rows, measure_machine, write_profile
    from vllm_helix.planner.hardware_spec import load_hardware, user_profile_dir

    if args.instances < 1 or args.repeats < 1 or args.output_len < 2:
        print(f"error: --instances {args.instances} --repeats {args.repeats} --output-len {args.output_len}: time "
              "each point at least once, at least 2 tokens per request", file=sys.stderr)
        return 2
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        print("error: calibrate times vLLM engines: install vLLM first (README, 'Install')", file=sys.stderr)
        return 2
    started, date = time.monotonic(), time.strftime("%Y-%m-%d")
    measured = measure_machine(measured_collectives, date)
    profile, name = measured.profile, measured.name
    rows = fit_point_rows(Timing(instances=args.instances, repeats=args.repeats, output_len=args.output_len,
                                 log_dir=args.log_dir))
    profile["calibration"] = fit(profile, rows, "vllm-helix calibrate (the fit's engine points only)")
    path = (args.output or user_profile_dir()) / f"{name}.yaml"
    write_profile(path, profile, measured.memory, measured.collectives["transport"], "vllm-helix calibrate", date,
                  measured.line, torch.__version__)
    load_hardware(str(path))  # the planner reads what was written
    record = path.with_name(f"{name}.timings.json")  # what the constants were fitted to, for a refit or a review
    record.write_text(json.dumps({"date": date, "machine": measured.machine, "memory": measured.memory,
                                  "flops": measured.flops, "collectives": measured.collectives, "engine": rows,
                                  "wall_s": round(time.monotonic() - started, 1)}, indent=2) + "\n")
    print(f"wrote {path} in {(time.monotonic() - started) / 60:.1f} min; "
          f"`vllm-helix plan --hardware this ...` prices with it")
    return 0
