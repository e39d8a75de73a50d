"""This machine's rates as a planner profile needs them: memory bandwidth, matmul FLOP rates, and the
collective the served workers use between each other.

Shared by ``vllm-helix calibrate`` and ``benchmarks/measure_hardware.py``. Every rate is the best of
several timed calls (the machine is shared; the least-disturbed run is the best estimate of what
the hardware does). The collective is vLLM's CPU shared-memory ``shm_allreduce`` where its build
has it (what a served TP or Helix group uses between CPU workers); its AVX2 build has none, and
the workers then all-reduce over gloo, which is timed instead (the record names the transport).
The ops come from ``patches_free_hooks`` (every touch of vLLM), handed in by the caller.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vllm_helix.harness.spawn import run_ranks

SMALL_MESSAGE, LARGE_MESSAGE = 1024, 8 * 2**20  # bytes: the latency and the bandwidth point


def best_seconds(fn: Callable[[], Any], repeats: int, min_total_s: float = 1.5, max_calls: int = 300) -> float:
    """Shortest wall time of ``fn()`` after one warm-up call, over at least ``repeats`` calls
    and at least ``min_total_s`` seconds of calls (at most ``max_calls``)."""
    fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - started < min_total_s and len(samples) < max_calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def memory_total_bytes() -> float:
    """MemTotal from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return float(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def measure_memory(repeats: int) -> dict[str, float]:
    """A 256 MiB tensor copy, counted STREAM-style (read + write bytes), and a streaming read."""
    src = torch.rand(64 * 2**20)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    copy = best_seconds(lambda: dst.copy_(src), repeats)
    read = best_seconds(lambda: src.sum(), repeats)
    return {"copy_bytes_per_s": 2 * nbytes / copy, "read_bytes_per_s": nbytes / read}


def measure_matmul(dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of a square matmul."""
    a, b = torch.rand(size, size, dtype=dtype), torch.rand(size, size, dtype=dtype)
    return 2 * size**3 / best_seconds(lambda: a @ b, repeats)


Collectives = Callable[[str, int, int], tuple[Callable[..., Any], Callable[..., Any], str]]


def _collective_rank(rank: int, world: int, repeats: int, collectives: Collectives) -> dict[str, Any]:
    """Rank entry point: best seconds of the all-reduce and all-gather ``collectives`` gives, small and large."""
    import torch.distributed as dist

    reduce_op, gather_op, transport = collectives(f"helix-measure-{os.getppid()}-cpushm", world, rank)
    dist.barrier()
    out: dict[str, Any] = {"all_reduce": [], "all_gather": [], "transport": transport}
    for size in (SMALL_MESSAGE, LARGE_MESSAGE):
        data = torch.ones(size // 4)
        gathered = torch.empty(world * data.numel())
        dist.barrier()
        out["all_reduce"].append(best_seconds(lambda: reduce_op(data), repeats, min_total_s=0.0))
        dist.barrier()
        out["all_gather"].append(best_seconds(lambda: gather_op(gathered, data), repeats, min_total_s=0.0))
    dist.barrier()
    return out


def measure_collectives(collectives: Collectives, repeats: int) -> dict[str, Any]:
    """Latency (1 KiB message) and bandwidth (8 MiB) of all-reduce and all-gather between two processes
    on this machine, slowest rank, and the transport that carried them. ``collectives`` builds the ops
    in each rank: ``patches_free_hooks.cpu_collectives.measured_collectives``, vLLM's own (the harness
    does not import vLLM; its caller hands them in)."""
    per_rank = run_ranks(_collective_rank, 2, (repeats, collectives), timeout_s=300)
    out: dict[str, Any] = {"transport": per_rank[0]["transport"]}
    for op in ("all_reduce", "all_gather"):
        small, large = (max(r[op][i] for r in per_rank) for i in (0, 1))
        out[op] = {"latency_s": small, "bandwidth_bytes_per_s": LARGE_MESSAGE / max(large - small, 1e-9)}
    return out
