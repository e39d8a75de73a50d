"""This machine's CPU, read from ``/proc/cpuinfo``: for results files, and for a plan priced with a CPU
profile measured on another machine kind (the planner warns)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (falls back to ``platform``)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags_have_amx() -> bool | None:
    """Whether the kernel reports AMX tiles (``amx_tile``); None where /proc/cpuinfo has no flags."""
    flags = _cpuinfo_field("flags")
    return None if flags is None else "amx_tile" in flags.split()


def cpu_vector_isa() -> str | None:
    """The widest vector instruction set vLLM's CPU build picks a kernel library by: ``AVX-512 BF16``,
    ``AVX-512`` or ``AVX2`` (x86; None where /proc/cpuinfo has no flags)."""
    flags = _cpuinfo_field("flags")
    if flags is None:
        return None
    present = set(flags.split())
    if "avx512_bf16" in present:
        return "AVX-512 BF16"
    return "AVX-512" if "avx512f" in present else "AVX2" if "avx2" in present else "no AVX2"


def same_cpu_kind(recorded: str, recorded_amx: bool | None, here: str, here_amx: bool | None,
                  recorded_isa: str | None = None, here_isa: str | None = None) -> bool:
    """Whether two CPUs are the same machine kind for a cost profile: same vendor family (the name's
    first word after ``(R)`` marks are dropped: ``AMD``, ``Intel``), the same AMX answer and the same
    vector ISA (:func:`cpu_vector_isa`: vLLM loads another kernel library per ISA); what a profile did
    not record is not compared."""
    def family(name: str) -> str:
        return (name.replace("(R)", " ").replace("(TM)", " ").split() or ["?"])[0].lower()
    return (family(recorded) == family(here)
            and (recorded_amx is None or here_amx is None or recorded_amx == here_amx)
            and (recorded_isa is None or here_isa is None or recorded_isa == here_isa))


def profile_name(cpu: str, cores: int, isa: str | None = None) -> str:
    """``cpu-<family>[-avx2]-<cores>core``: the planner profile of a machine kind (one per kind; Xeon and EPYC
    machines serve differently, NOTES-vllm.md), as ``vllm-helix calibrate`` names what it writes. A CPU
    without AVX-512 is its own kind (vLLM's AVX2 kernel library, no shared-memory collectives, no fast
    bf16 matmul), marked in the name; the AVX-512 kinds keep the plain name."""
    model = cpu.lower()
    family = next((name for name in ("xeon", "epyc") if name in model), re.sub(r"[^a-z0-9]+", "-", model)[:20])
    marker = "-avx2" if isa == "AVX2" else ""
    return f"cpu-{family.strip('-')}{marker}-{cores}core"


def this_machine_profile_name() -> str:
    """:func:`profile_name` of this machine (its CPU, vector ISA and the cores this process may use)."""
    return profile_name(cpu_model(), len(os.sched_getaffinity(0)), cpu_vector_isa())
