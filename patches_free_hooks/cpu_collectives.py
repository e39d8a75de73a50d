"""Shared-memory collectives for the KVP group on vLLM's CPU platform.

vLLM gives its C++ shared-memory collectives (``_C::shm_all_gather``...) only to
the ``tp`` and ``pp`` groups; every other group, the decode-context-parallel
group that Helix's KVP group *is* included, falls back to gloo over TCP. Between
two processes on this project's 2-core machines a 2 KB gloo all-gather costs
about 0.5 ms against about 10 us over shared memory, and Helix runs two such
collectives per attention layer (the query all-gather, the exchange): at 4K
tokens that was a third of a decode step (``benchmarks/results/decode_step_profile.md``).

:func:`enable_shared_memory_all_gather` gives the DCP group the same shared-memory
backend vLLM builds for TP (its own ``_CPUSHMDistributed``, not a copy), so vLLM's
``get_dcp_group().all_gather`` (the query all-gather, also MLA's own) runs over
shared memory, and returns the float32 all-gather the Helix exchange uses.

Only where every rank of the group can open the same segments: the same vLLM
build with the shared-memory ops, the same host, and the same segment name
(vLLM names it after ``VLLM_DIST_IDENT``, which differs between the nodes of a
multi-node engine even on one host). A KVP group across nodes keeps gloo over TCP,
as vLLM's own TP group does there (its ``CpuCommunicator`` makes the same name check).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch

from vllm_helix.attention.exchange import AllGather

from patches_free_hooks.compat import internal


def enable_shared_memory_all_gather(group: Any) -> AllGather | None:
    """Shared memory for ``group`` (a vLLM ``GroupCoordinator`` on CPU); ``None`` where vLLM has none.

    Collective: every rank of ``group`` must call it at the same point (the plugin
    does, when each worker builds its Helix runtime before its first layer).
    """
    communicator = group.device_communicator
    cpu_communicator = internal("vllm.distributed.device_communicators.cpu_communicator:CpuCommunicator")
    shm = internal("vllm.distributed.device_communicators.cpu_communicator:_CPUSHMDistributed")
    if not isinstance(communicator, cpu_communicator):
        return None  # CUDA: NCCL is already the fast path
    if not isinstance(communicator.dist_module, shm):
        if not _all_ranks_share_memory(communicator, shm):
            return None  # gloo stays
        communicator.dist_module = shm(communicator)

    def all_gather(output: torch.Tensor, local: torch.Tensor) -> None:
        communicator.dist_module.all_gather_into_tensor(output, local)

    return all_gather


def _has_shm_ops() -> bool:
    """vLLM's CPU build registers its shared-memory ops (its AVX2 build does not)."""
    return hasattr(torch.ops._C, "init_shm_manager")


def _node_identity() -> str:
    """This host as its kernel knows it: the host name and this boot's id."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _all_ranks_share_memory(communicator: Any, shm: Any) -> bool:
    """Whether every rank has vLLM's shared-memory ops, is on this host and names the segments alike.

    Collective over the group's gloo group (one small object gather at start-up), so every
    rank takes the same decision even where the nodes' vLLM builds differ.
    """
    capable = _has_shm_ops() and "VLLM_DIST_IDENT" in os.environ
    mine = (capable, _node_identity(), shm.make_group_name(communicator) if capable else "")
    everyone: list[Any] = [None] * communicator.world_size
    torch.distributed.all_gather_object(everyone, mine, group=communicator.device_group)
    return all(theirs == mine for theirs in everyone) and capable


def measured_collectives(name: str, world: int, rank: int) -> tuple[Callable[..., Any], Callable[..., Any], str]:
    """(all-reduce, all-gather, transport) as vLLM's CPU workers run them between processes of one host,
    for ``vllm-helix calibrate`` to time (called in each rank after ``torch.distributed`` is up on gloo).

    vLLM's shared-memory ops where its build has them (the set-up calls of its ``_CPUSHMDistributed``),
    else gloo, which its workers then fall back to. The kernels are loaded as vLLM's platform loads
    them: importing ``vllm._C`` directly loads the AVX-512 BF16 build, which dies of SIGILL on an
    AVX2-only CPU.
    """
    import torch.distributed as dist
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # Platform.import_kernels: the build this CPU runs
    if not _has_shm_ops():
        return (lambda data: dist.all_reduce(data),
                lambda out, data: dist.all_gather_into_tensor(out, data), "gloo")
    handle = torch.ops._C.init_shm_manager(name, world, rank, torch.get_num_threads())
    dist.barrier()
    torch.ops._C.join_shm_manager(handle, name)
    return (lambda data: torch.ops._C.shm_allreduce(handle, data),
            lambda out, data: torch.ops._C.shm_all_gather(handle, data, out), "vLLM shm")
