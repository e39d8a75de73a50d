"""Run a function on N local processes joined by a torch.distributed gloo group.

For the CPU demo, the benchmarks and the multi-process tests. It must never
hang: the rendezvous and every collective have a timeout, the parent waits with
a deadline, a failing rank's traceback is re-raised in the parent, and every
child is terminated (then killed) on the way out, whatever happened.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence


class RankFailure(RuntimeError):
    """A rank raised, died or timed out; the message carries its traceback."""


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: Sequence[Any],
    results: "mp.Queue[tuple[int, bool, Any]]",
    timeout_s: float,
    threads: int,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            # Plain pickle copies tensor data into the message; a tensor put on the
            # queue as-is would travel as a shared-memory handle that dies with us.
            results.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))


def _dead_without_result(procs: Sequence[Any], reported: set[int], grace_s: float = 0.0) -> str | None:
    """Which ranks exited without reporting (waiting up to ``grace_s`` for one to finish exiting)."""
    give_up = time.monotonic() + grace_s
    while True:
        dead = [r for r in range(len(procs)) if r not in reported and procs[r].exitcode is not None]
        if dead or time.monotonic() >= give_up:
            break
        time.sleep(0.05)
    if not dead:
        return None
    return f"ranks {dead} exited with codes {[procs[r].exitcode for r in dead]} without a result"


def _check_progress(
    procs: Sequence[Any], collected: dict[int, Any], deadline: float, timeout_s: float
) -> None:
    """Raise if a rank died without reporting, or the deadline passed."""
    dead = _dead_without_result(procs, set(collected))
    if dead:
        raise RankFailure(dead)
    missing = [r for r in range(len(procs)) if r not in collected]
    if time.monotonic() > deadline:
        raise RankFailure(f"ranks {missing} gave no result within {timeout_s:.0f} s")


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 300.0,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    ``fn`` must be importable (a module-level function) and its arguments and
    result picklable. Returns the results ordered by rank. Each rank gets an even
    share of the machine's cores as torch threads, so ranks do not oversubscribe.
    """
    ctx = mp.get_context("spawn")
    results: "mp.Queue[tuple[int, bool, Any]]" = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, tuple(args), results, timeout_s, threads),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    collected: dict[int, Any] = {}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout_s
        while len(collected) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                _check_progress(procs, collected, deadline, timeout_s)
                continue
            if not ok:
                # A rank that died often makes its peers fail in the collective they shared with it
                # (connection reset): name the dead rank first, it is the cause.
                dead = _dead_without_result(procs, set(collected) | {rank}, grace_s=1.0)
                cause = f"{dead}; then " if dead else ""
                raise RankFailure(f"{cause}rank {rank} of {world_size} failed:\n{value}")
            collected[rank] = pickle.loads(value)
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
    return [collected[rank] for rank in range(world_size)]
