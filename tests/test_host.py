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
    # vLLM loads another kernel library per vector ISA: an AVX2 EPYC is not an AVX-512 BF16 one
    assert not host.same_cpu_kind("AMD EPYC", False, "AMD EPYC", False, "AVX2", "AVX-512 BF16")
    assert host.same_cpu_kind("AMD EPYC", False, "AMD EPYC", False, None, "AVX-512 BF16")  # ISA not recorded


def test_each_machine_kind_has_its_own_profile_name() -> None:
    assert host.profile_name("Intel(R) Xeon(R) Processor", 2) == "cpu-xeon-2core"
    assert host.profile_name("AMD EPYC 7B13 64-Core Processor", 2) == "cpu-epyc-2core"
    assert host.profile_name("Apple M2", 8) == "cpu-apple-m2-8core"
    assert host.profile_name("AMD EPYC", 2, "AVX-512 BF16") == "cpu-epyc-2core"
    assert host.profile_name("AMD EPYC", 2, "AVX2") == "cpu-epyc-avx2-2core"  # vLLM's AVX2 build: its own kind
