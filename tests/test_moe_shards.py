"""The TPF x EP grid arithmetic, and its exactness on real gloo ranks (no vLLM).

Every rank of a ``tpf x ep`` grid holds one EP group's experts and one TPF slice
of their intermediate dimension; summing the ranks' partial outputs (the one
all-reduce over N that TP = N already does) must give the full MoE output.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from vllm_helix.moe_shards import GridShard, moe_reference
from vllm_helix.harness.spawn import run_ranks

E, H, I, TOP_K = 8, 64, 128, 2
LAYOUTS = [(2, 1), (1, 2), (4, 1), (2, 2), (1, 4)]  # (tpf, ep) at N = 2 and N = 4


def _problem(seed: int, tokens: int = 7) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen, dtype=torch.float64)
    w13 = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) / H**0.5
    w2 = torch.randn(E, H, I, generator=gen, dtype=torch.float64) / I**0.5
    ids = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(tokens)]).int()
    weights = torch.rand(tokens, TOP_K, generator=gen, dtype=torch.float64)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize(("tpf", "ep"), LAYOUTS)
def test_every_expert_slice_lives_on_exactly_one_rank(tpf: int, ep: int) -> None:
    owners = torch.zeros(E, I, dtype=torch.int64)
    for rank in range(tpf * ep):
        shard = GridShard(rank, tpf, ep, E, I)
        assert (shard.tpf_rank, shard.ep_rank) == (rank % tpf, rank // tpf)
        owners[shard.experts.start:shard.experts.stop, shard.intermediate] += 1
        assert int((shard.expert_map() >= 0).sum()) == E // ep
    assert torch.all(owners == 1)


@pytest.mark.parametrize(("tpf", "ep"), LAYOUTS)
def test_each_rank_holds_one_nth_of_the_routed_expert_weights(tpf: int, ep: int) -> None:
    w13, w2 = torch.empty(E, 2 * I, H), torch.empty(E, H, I)
    total = (w13.numel() + w2.numel()) * w13.element_size()
    for rank in range(tpf * ep):
        shard = GridShard(rank, tpf, ep, E, I)
        a, b = shard.take(w13, w2)
        held = (a.numel() + b.numel()) * a.element_size()
        assert held == shard.weight_bytes(H, a.element_size()) == total // (tpf * ep)


def _grid_rank(rank: int, world: int, tpf: int, ep: int, seed: int) -> torch.Tensor:
    x, w13, w2, weights, ids = _problem(seed)
    shard = GridShard(rank, tpf, ep, E, I)
    partial = moe_reference(x, *shard.take(w13, w2), weights, ids, shard.expert_map())
    dist.all_reduce(partial)  # the TP = N all-reduce that completes the layer
    return partial


@pytest.mark.parametrize(("tpf", "ep"), [(2, 1), (1, 2), (2, 2), (1, 4), (4, 1)])
def test_grid_all_reduced_equals_the_single_process_moe(tpf: int, ep: int, fresh_seed: int) -> None:
    x, w13, w2, weights, ids = _problem(fresh_seed)
    full = moe_reference(x, w13, w2, weights, ids)
    outputs = run_ranks(_grid_rank, tpf * ep, (tpf, ep, fresh_seed), timeout_s=120)
    for rank, out in enumerate(outputs):
        assert torch.allclose(out, full, rtol=1e-12, atol=1e-12), f"rank {rank}: max error {(out - full).abs().max()}"


@pytest.mark.parametrize(
    ("args", "message"),
    [((4, 2, 2, E, I), "outside a tpf=2 x ep=2 grid"), ((0, 1, 3, E, I), "ep=3 must divide the 8 experts"),
     ((0, 3, 1, E, I), "tpf=3 must divide the intermediate size 128")],
)
def test_impossible_grids_are_refused(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GridShard(*args)
