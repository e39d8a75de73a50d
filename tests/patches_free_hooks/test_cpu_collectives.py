"""The KVP group gets shared memory only where every rank can open the same segments.

Each case runs on two real gloo ranks (spawned processes): the ranks must agree, and a
rank that cannot use shared memory must not leave the other waiting in a collective.
The two nodes of a multi-node engine on one host have different ``VLLM_DIST_IDENT``
(vLLM names the segments after it): they keep gloo.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch.distributed as dist

from patches_free_hooks import cpu_collectives
from vllm_helix.harness.spawn import run_ranks


class _NamedLikeVllm:
    """Stands in for vLLM's ``_CPUSHMDistributed``: the segment name from ``VLLM_DIST_IDENT`` and the group."""

    @staticmethod
    def make_group_name(communicator: SimpleNamespace) -> str:
        return f"{os.environ['VLLM_DIST_IDENT']}-{communicator.unique_name}-cpushm"


CASES = {  # VLLM_DIST_IDENT, shared-memory ops, host per rank -> shared memory?
    "one node": (["a", "a"], [True, True], ["h", "h"], True),  # vLLM's own TP group would use it too
    "loopback nodes": (["a", "b"], [True, True], ["h", "h"], False),  # two nodes on one host: names differ
    "two hosts": (["a", "a"], [True, True], ["h", "g"], False),
    "mixed builds": (["a", "a"], [True, False], ["h", "h"], False),  # one node's vLLM has no shm ops
}


def _decide_each_case(rank: int, world: int) -> dict[str, bool]:
    decided = {}
    for name, (idents, capable, hosts, _) in CASES.items():
        os.environ["VLLM_DIST_IDENT"] = idents[rank]
        cpu_collectives._has_shm_ops = lambda: capable[rank]
        cpu_collectives._node_identity = lambda: hosts[rank]
        communicator = SimpleNamespace(world_size=world, device_group=dist.group.WORLD, unique_name="dcp:0")
        decided[name] = cpu_collectives._all_ranks_share_memory(communicator, _NamedLikeVllm)
    return decided


def test_shared_memory_only_where_every_rank_can_open_the_same_segments() -> None:
    expected = {name: case[-1] for name, case in CASES.items()}
    assert run_ranks(_decide_each_case, 2, timeout_s=120) == [expected, expected]
