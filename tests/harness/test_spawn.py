"""run_ranks never hangs: failures, deaths and stalls surface as RankFailure."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from vllm_helix.harness.spawn import RankFailure, run_ranks


def _sum_ranks(rank: int, world: int) -> torch.Tensor:
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return value


def _raise_on_rank_1(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _exit_on_rank_0(rank: int, world: int) -> int:
    if rank == 0:
        os._exit(3)
    time.sleep(60)
    return rank


def _stall(rank: int, world: int) -> int:
    time.sleep(60)
    return rank


@pytest.mark.slow
def test_results_come_back_in_rank_order():
    assert [float(t) for t in run_ranks(_sum_ranks, 2, timeout_s=60)] == [1.0, 1.0]


@pytest.mark.slow
def test_a_rank_exception_carries_its_traceback():
    with pytest.raises(RankFailure, match=r"(?s)rank 1 of 2 failed.*ValueError: boom on rank 1"):
        run_ranks(_raise_on_rank_1, 2, timeout_s=60)


@pytest.mark.slow
def test_a_dead_rank_is_reported_not_waited_for():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"ranks \[0\] exited with codes \[3\]"):
        run_ranks(_exit_on_rank_0, 2, timeout_s=50)
    assert time.monotonic() - start < 45  # did not sit out the other rank's sleep


@pytest.mark.slow
def test_a_stalled_world_times_out():
    with pytest.raises(RankFailure, match=r"ranks \[0, 1\] gave no result within 3 s"):
        run_ranks(_stall, 2, timeout_s=3)
