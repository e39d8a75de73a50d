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
"""

from __future__ import annotations

import os
from typing import Any

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
        if not hasattr(torch.ops._C, "init_shm_manager") or "VLLM_DIST_IDENT" not in os.environ:
            return None  # a vLLM CPU build without the shared-memory ops: gloo stays
        communicator.dist_module = shm(communicator)

    def all_gather(output: torch.Tensor, local: torch.Tensor) -> None:
        communicator.dist_module.all_gather_into_tensor(output, local)

    return all_gather
