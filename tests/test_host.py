"""This machine's CPU as the planner and the results files see it."""

from __future__ import annotations

from vllm_helix import host


def test_cpu_model_and_amx_are_read_from_cpuinfo() -> None:
    assert host.cpu_model() and host.cpu_model() != "unknown"
    assert host.cpu_flags_have_amx() in (True, False)


def test_machine_kinds_are_vendor_family_and_amx() -> None:
    xeon = "Intel(R) Xeon(R) Processor"
    assert host.same_cpu_kind(xeon, True, "Intel(R) Xeon(R) Platinum 8480+", True)
    assert not host.same_cpu_kind(xeon, True, "Intel(R) Xeon(R) Gold 6338", False)  # no AMX: another kind
    assert not host.same_cpu_kind(xeon, True, "AMD EPYC 9654", False)
    assert host.same_cpu_kind("AMD EPYC", False, "AMD EPYC 7763 64-Core Processor", False)
    assert host.same_cpu_kind("AMD EPYC", None, "AMD EPYC", True)  # AMX not recorded: the vendor decides
