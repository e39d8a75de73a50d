"""Hardware specs: what one accelerator can read, compute and send, from ``configs/hardware``.

A profile is a YAML file in human units (GB, GB/s, TFLOP/s, microseconds, watts;
1 GB = 1e9 bytes) with its sources in comments. ``base: <other profile>`` inherits
every field not given, which is how measured profiles (``measured: true``)
override only what was measured on a real machine.

The fabric has two levels: a scale-up domain (NVLink through NVSwitch: every GPU
reaches every other at the full per-GPU bandwidth) of ``gpus_per_domain`` GPUs,
and a scale-out network (InfiniBand/Ethernet) between domains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from vllm_helix.config import HelixConfigError
from vllm_helix.host import cpu_flags_have_amx, cpu_model, cpu_vector_isa, same_cpu_kind, this_machine_profile_name
from vllm_helix.planner.calibration import Calibration
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.model_spec import CONFIG_ROOT
from vllm_helix.planner.precision import canonical_dtype, flop_rate_key
from vllm_helix.serving_rules import Platform

HARDWARE_PRESET_DIR = CONFIG_ROOT / "hardware"
DEFAULT_RUNTIME_RESERVE_GB = 2.0


@dataclass(frozen=True)
class Link:
    """One level of the fabric, per GPU and per direction."""

    bandwidth: float  # bytes/s one GPU can send (and receive) at once
    latency: float  # seconds of fixed cost per message phase (launch + flag + hop)


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator and the fabric around it, in SI units (bytes, bytes/s, FLOP/s, s, W)."""

    name: str
    memory_capacity: float
    memory_bandwidth: float
    flops: Mapping[str, float]
    scale_up: Link
    gpus_per_domain: int
    scale_out: Link | None
    tdp_watts: float
    measured: bool = False
    description: str = ""
    # Device memory vLLM's profile run does not see as activations but the GPU holds anyway (CUDA
    # context, NCCL and cuBLAS workspaces, CUDA graphs): an estimate, overridable per profile.
    runtime_reserve: float = DEFAULT_RUNTIME_RESERVE_GB * 1e9
    # Engine costs fitted on this machine (measured profiles of machines that run vLLM); None: roofline only.
    calibration: Calibration | None = None
    # Where its layouts run: the serve rules of this platform (vllm_helix.serving_rules) decide what is servable.
    platform: Platform = Platform("cuda")
    # The machine a CPU profile was measured on ({"cpu": name, "amx": bool, "cores": n}); None for GPUs.
    machine: Mapping[str, Any] | None = None
    # Accelerators per host (an HGX board: 8; a GB200 NVL72 compute tray: 4); 0: the whole scale-up domain.
    # A layout on more GPUs than this spans hosts, and its command is one per node (vLLM's multi-node flags).
    gpus_per_node: int = 0

    @property
    def node_gpus(self) -> int:
        """GPUs one host holds (the domain where the profile names no node size)."""
        return self.gpus_per_node or self.gpus_per_domain

    def flop_rate(self, dtype: str) -> float:
        """Dense tensor-core FLOP/s for ``dtype``; raises if the chip has no such rate."""
        key = flop_rate_key(dtype)
        if key not in self.flops:
            raise PlannerError(
                f"hardware {self.name!r} has no {key} FLOP rate (it supports "
                f"{', '.join(sorted(self.flops))}); pick --compute-dtype among those"
            )
        return self.flops[key]

    def link_between_domains(self) -> Link:
        """The scale-out link; raises for a profile that describes a single domain."""
        if self.scale_out is None:
            raise PlannerError(
                f"hardware {self.name!r} has no scale_out network, so at most "
                f"{self.gpus_per_domain} GPUs can work together; use --gpus <= {self.gpus_per_domain}"
            )
        return self.scale_out

    def describe(self) -> str:
        kind = " (measured, calibrated on vLLM engine runs)" if self.calibration else (
            " (measured)" if self.measured else "")
        return (f"{self.name}{kind}: "
                f"{self.memory_capacity / 1e9:.0f} GB at {self.memory_bandwidth / 1e12:.2f} TB/s, "
                + ", ".join(f"{k} {_figure(v / 1e12)} TFLOP/s" for k, v in sorted(self.flops.items()))
                + f", {self.scale_up.bandwidth / 1e9:.0f} GB/s scale-up x {self.gpus_per_domain} GPUs, "
                f"TDP {self.tdp_watts:.0f} W")


def _figure(value: float) -> str:
    """Whole numbers for GPU-scale figures, three significant digits below 10 (a CPU's 0.287 TFLOP/s)."""
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def preset_names() -> list[str]:
    return sorted(path.stem for path in HARDWARE_PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PlannerError(f"hardware profile {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PlannerError(f"hardware profile {str(path)!r} must be a mapping")
    return data


def user_profile_dir() -> Path:
    """Where ``vllm-helix calibrate`` writes this machine's profile: ``$VLLM_HELIX_PROFILE_DIR``, else
    ``$XDG_CONFIG_HOME/vllm-helix/hardware``, else ``~/.config/vllm-helix/hardware``."""
    explicit = os.environ.get("VLLM_HELIX_PROFILE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "vllm-helix" / "hardware"


THIS_MACHINE = "this"  # --hardware this: the profile of this machine kind


def _resolve(ref: str) -> Path:
    """A YAML path, ``this`` (this machine kind's profile), or a name: the user's calibrated profile of that
    name first (one profile per machine kind: a calibration here replaces the preset), then the presets."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    name = this_machine_profile_name() if ref == THIS_MACHINE else ref
    for directory in (user_profile_dir(), HARDWARE_PRESET_DIR):
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    if ref == THIS_MACHINE:
        raise PlannerError(f"no profile of this machine kind ({name}) in {user_profile_dir()} or the presets; "
                           "measure it with `vllm-helix calibrate` (~17 min)")
    raise PlannerError(f"hardware {ref!r} not found; known presets: {', '.join(preset_names())} "
                       f"(or pass a profile YAML path, or 'this' for this machine's calibrated profile)")


def _merged(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The profile's fields with its ``base:`` chain filled in (sections merged key by key)."""
    if path in seen:
        raise PlannerError(f"hardware profile {str(path)!r} inherits from itself via 'base'")
    data = _read_yaml(path)
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data
    merged = _merged(_resolve(str(base_ref)), seen + (path,))
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _number(section: Mapping[str, Any], key: str, where: str) -> float:
    value = section.get(key)
    if not isinstance(value, (int, float)) or value <= 0:
        raise PlannerError(f"hardware profile {where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _non_negative(section: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = section.get(key, default)
    if not isinstance(value, (int, float)) or value < 0:
        raise PlannerError(f"hardware profile {where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


# Every key a profile may hold; anything else is a typo that would silently be ignored.
PROFILE_KEYS: dict[str, tuple[str, ...]] = {
    "memory": ("capacity_gb", "bandwidth_gb_s", "runtime_reserve_gb"),
    "compute_tflops": (),  # any number format the precision module knows
    "scale_up": ("bandwidth_gb_s", "latency_us", "gpus_per_domain"),
    "scale_out": ("bandwidth_gb_s", "latency_us"),
    "power": ("tdp_w",),
    "machine": ("cpu", "amx", "isa", "cores"),  # CPU profiles: the machine they were measured on
}
_TOP_LEVEL_KEYS = ("name", "description", "measured", "platform", "gpus_per_node", *PROFILE_KEYS, "calibration")


def _check_keys(data: Mapping[str, Any], where: str) -> None:
    unknown = sorted(str(key) for key in data if key not in _TOP_LEVEL_KEYS)
    for section, keys in PROFILE_KEYS.items():
        if keys and isinstance(data.get(section), Mapping):
            unknown += sorted(f"{section}.{key}" for key in data[section] if key not in keys)
    if unknown:
        raise PlannerError(
            f"hardware profile {where} has unknown key(s) {unknown}, which would be ignored; valid keys: "
            + "; ".join(f"{section}: {', '.join(keys) or 'a number format per key'}"
                        for section, keys in PROFILE_KEYS.items())
            + f"; top level: {', '.join(_TOP_LEVEL_KEYS[:3])}, calibration, base"
        )


def hardware_from_dict(data: Mapping[str, Any], name: str) -> HardwareSpec:
    """Build a spec from the YAML fields (units as written in the files); unknown keys are refused."""
    where = repr(name)
    _check_keys(data, where)
    try:
        memory, compute, up = data["memory"], data["compute_tflops"], data["scale_up"]
        power = data["power"]
    except KeyError as err:
        raise PlannerError(f"hardware profile {where} lacks the {err.args[0]!r} section") from None
    out = data.get("scale_out")
    return HardwareSpec(
        name=str(data.get("name", name)),
        memory_capacity=_number(memory, "capacity_gb", where) * 1e9,
        memory_bandwidth=_number(memory, "bandwidth_gb_s", where) * 1e9,
        flops={canonical_dtype(k): _number(compute, k, where) * 1e12 for k in compute},
        scale_up=Link(_number(up, "bandwidth_gb_s", where) * 1e9, _number(up, "latency_us", where) * 1e-6),
        gpus_per_domain=int(_number(up, "gpus_per_domain", where)),
        scale_out=(Link(_number(out, "bandwidth_gb_s", where) * 1e9, _number(out, "latency_us", where) * 1e-6)
                   if out else None),
        tdp_watts=_number(power, "tdp_w", where),
        measured=bool(data.get("measured", False)),
        description=str(data.get("description", "")),
        runtime_reserve=_non_negative(memory, "runtime_reserve_gb", where, DEFAULT_RUNTIME_RESERVE_GB) * 1e9,
        calibration=Calibration.from_yaml(data["calibration"], where) if "calibration" in data else None,
        platform=_platform(data, where),
        machine=dict(data["machine"]) if isinstance(data.get("machine"), Mapping) else None,
        gpus_per_node=int(_number(data, "gpus_per_node", where)) if "gpus_per_node" in data else 0,
    )


def _platform(data: Mapping[str, Any], where: str) -> Platform:
    """``platform:`` (``cuda:MAJOR.MINOR``, ``cpu`` or ``cpu:CORES``); a GPU (CUDA) profile when not given."""
    if "platform" not in data:
        return Platform("cuda")
    try:
        return Platform.parse(str(data["platform"]))
    except HelixConfigError as err:
        raise PlannerError(f"hardware profile {where}: {err}") from None


def machine_warning(hardware: HardwareSpec) -> str | None:
    """One line when a CPU profile was measured on another machine kind than this one (None otherwise)."""
    if hardware.machine is None:
        return None
    recorded, recorded_amx = str(hardware.machine.get("cpu", "?")), hardware.machine.get("amx")
    recorded_isa = hardware.machine.get("isa")
    here, here_amx, here_isa = cpu_model(), cpu_flags_have_amx(), cpu_vector_isa()
    if same_cpu_kind(recorded, recorded_amx, here, here_amx, recorded_isa, here_isa):
        return None
    amx = {True: "AMX", False: "no AMX", None: "AMX unknown"}

    def kind(amx_flag: bool | None, isa: str | None) -> str:
        return amx[amx_flag] + (f", {isa}" if isa and recorded_isa else "")
    return (f"{hardware.name} was measured on {recorded} ({kind(recorded_amx, recorded_isa)}), this machine is "
            f"{here} ({kind(here_amx, here_isa)}): its times describe that machine kind; measure this one with "
            "`vllm-helix calibrate` and plan with --hardware this")


def load_hardware(ref: str) -> HardwareSpec:
    """Resolve ``--hardware``: a preset name under ``configs/hardware`` or a YAML path."""
    path = _resolve(ref)
    return hardware_from_dict(_merged(path), name=path.stem)
