"""What ``vllm-helix serve`` accepts, per platform: the one place for the layout rules that start-up
enforces and the planner enumerates with.

The plugin's start-up check (``patches_free_hooks.engine_config.apply_helix``) and the
planner's recommendation (``vllm_helix.planner.recommend``) both call :func:`check_layout`,
so a command the planner prints passes serve's layout check on the platform it was
planned for (``tests/planner/test_servable.py`` prices every model preset on every
hardware profile and runs each recommendation through it). What needs vLLM's own
objects (the attention backend for a CUDA capability, vLLM's arguments) stays in
``patches_free_hooks``; everything decided by the layout, the model's shape and the
platform is here. Pure Python: nothing here imports vLLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vllm_helix.config import HelixConfig, HelixConfigError, ModelShape


@dataclass(frozen=True)
class Platform:
    """Where a layout is to run: vLLM's CPU platform, or CUDA of one compute capability."""

    kind: str  # "cpu" | "cuda"
    capability: tuple[int, int] | None = None  # CUDA compute capability
    cores: int | None = None  # CPU cores (None: not known here)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``cpu``, ``cpu:CORES`` or ``cuda:MAJOR.MINOR`` (``cuda:9.0`` for H100/H200, ``cuda:10.0`` for B200)."""
        match = re.fullmatch(r"cpu(?::([1-9][0-9]*))?|cuda:([0-9]+)\.([0-9]+)", str(text).strip().lower())
        if match is None:
            raise HelixConfigError(f"platform {text!r}: name it as cpu, cpu:CORES or cuda:MAJOR.MINOR "
                                   "(e.g. cuda:9.0 for H100, cuda:10.0 for B200)")
        if match.group(2) is None:
            return cls("cpu", cores=int(match.group(1)) if match.group(1) else None)
        return cls("cuda", capability=(int(match.group(2)), int(match.group(3))))

    def describe(self) -> str:
        if self.kind == "cuda" and self.capability is not None:
            return f"CUDA compute capability {self.capability[0]}.{self.capability[1]}"
        return f"CPU with {self.cores} cores" if self.cores else "CPU"


def check_layout(helix: HelixConfig, shape: ModelShape, platform: Platform, max_workers: int | None = None) -> None:
    """Raise :class:`HelixConfigError` for the first rule ``helix`` breaks on ``platform``.

    ``max_workers`` bounds the alternatives suggested (a CPU machine's cores), so every
    suggested layout can start.
    """
    helix.validate(helix.world_size, shape, max_world_size=max_workers)
    if not shape.is_mla and helix.kvp > 1 and helix.tpa != shape.num_kv_heads:
        kvp = max(1, helix.world_size // shape.num_kv_heads)
        needed = kvp * shape.num_kv_heads
        fix = (f"use kvp={kvp},tpa={shape.num_kv_heads} on {needed} workers"
               if max_workers is None or needed <= max_workers else
               f"a kvp>1 layout needs at least {2 * shape.num_kv_heads} workers (kvp=2,tpa={shape.num_kv_heads}) "
               f"and this machine has {max_workers} cores: serve it without Helix or on a larger machine")
        raise HelixConfigError(
            f"tpa={helix.tpa} is below the model's {shape.num_kv_heads} KV heads: vllm-helix "
            f"keeps one KV head per TPA slice (tpa = KV heads), so {fix}"
        )
    check_platform(helix, platform)


def workers_per_node(world: int, nodes: int) -> int:
    """Workers each node runs when ``world`` workers span ``nodes`` nodes: vLLM's multi-node
    multiprocessing executor puts ``world / nodes`` consecutive ranks on each, so ``nodes`` must
    divide ``world`` (serve's start-up checks it; the planner picks node counts by it)."""
    if nodes < 1 or world % nodes:
        raise HelixConfigError(f"{world} workers cannot be split evenly over {nodes} nodes; use a layout whose "
                               f"kvp*tpa is a multiple of {nodes}, or a node count that divides {world}")
    return world // nodes


def nodes_for(world: int, per_node: int) -> int:
    """The fewest nodes of ``per_node`` workers each that hold ``world`` workers split evenly
    (:func:`workers_per_node`); ``per_node`` 0: one host holds any layout."""
    if not per_node or world <= per_node:
        return 1
    nodes = -(-world // per_node)
    while world % nodes:
        nodes += 1
    return nodes


def check_kv_cache_dtype(kv_cache_dtype: str | None, model_dtype: str | None = None) -> None:
    """Helix serves the KV cache in the model's own dtype, vLLM's ``--kv-cache-dtype auto``.

    Why not fp8: the plugin's CPU backends, the only Helix path that has run, store the cache in
    the model's dtype, and Helix on CUDA (vLLM's own LSE-returning backends under decode context
    parallelism) has never run with a quantized cache, so its exactness there is unchecked. The
    planner therefore prices Helix with this format (``ModelSpec.kv_cache_dtype``, bf16 for
    DeepSeek-R1's fp8 checkpoint) and serve refuses any other. ``model_dtype``, where known,
    also lets the model's own dtype be named explicitly.
    """
    if kv_cache_dtype in (None, "auto") or (model_dtype is not None and kv_cache_dtype == model_dtype):
        return
    own = f" ({model_dtype})" if model_dtype else ""
    raise HelixConfigError(
        f"--kv-cache-dtype {kv_cache_dtype} is not supported with Helix: it stores the KV cache in the model's "
        f"dtype{own}, vLLM's auto; drop it, or serve without Helix for a quantized KV cache")


def check_platform(helix: HelixConfig, platform: Platform) -> None:
    """The rules of ``platform`` alone (on CUDA Helix runs on vLLM's backends and exchange, not the plugin's)."""
    if platform.kind == "cuda":
        if helix.hopb > 1:
            raise HelixConfigError(
                f"hopb={helix.hopb}: HOP-B runs in the plugin's CPU backends; on CUDA Helix uses vLLM's "
                "own LSE-returning backends, whose exchange is not overlapped: use hopb=1"
            )
        if helix.ep > 1:
            raise HelixConfigError(
                f"helix ep={helix.ep}: the MoE TPF x EP grid is built on vLLM's CPU experts only and has not "
                f"run on CUDA; use ep=1,tpf={helix.world_size} (experts tensor-parallel over all ranks)"
            )
