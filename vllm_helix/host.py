"""This machine's CPU, read from ``/proc/cpuinfo``: for results files, and for a plan priced with a CPU
profile measured on another machine kind (the planner warns)."""

from __future__ import annotations

import platform
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


def same_cpu_kind(recorded: str, recorded_amx: bool | None, here: str, here_amx: bool | None) -> bool:
    """Whether two CPUs are the same machine kind for a cost profile: same vendor family (the name's
    first word after ``(R)`` marks are dropped: ``AMD``, ``Intel``) and the same AMX answer."""
    def family(name: str) -> str:
        return (name.replace("(R)", " ").replace("(TM)", " ").split() or ["?"])[0].lower()
    return family(recorded) == family(here) and (recorded_amx is None or here_amx is None or recorded_amx == here_amx)
