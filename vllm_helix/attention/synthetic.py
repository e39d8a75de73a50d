"""Random decode problems, their Helix shards, and the single-device reference.

Used by the tests, the CPU demo and the benchmarks, so all three check the same
thing: a decode step's queries and full (unsharded) KV history are drawn from a
seed; every Helix rank regenerates them from the seed (nothing large is
pickled between processes), keeps its TPA head slice, writes the tokens it owns
into a paged cache through the striped slot mapping, and decodes. The reference
is plain dense softmax attention over the whole history, in float64.

Cache slots a rank does not own are filled with NaN: if any kernel ever read a
slot outside its shard, the result would be NaN and every comparison would fail.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vllm_helix.attention.exchange import KVPExchange
from vllm_helix.attention.hopb import helix_decode
from vllm_helix.attention.kernel_choice import Kernel
from vllm_helix.attention.paged_decode import paged_decode, paged_decode_mla
from vllm_helix.rank_grid import HelixGroups, HelixLayout, build_helix_groups
from vllm_helix.striping import KVStriping

MLA_KV_LORA_RANK = 512
MLA_ROPE_DIM = 64


@dataclass(frozen=True)
class ProblemSpec:
    """Shape and seed of one random decode step (picklable, a few bytes)."""

    seed: int
    seq_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mla: bool = False
    dtype: torch.dtype = torch.float32
    block_size: int = 16

    @property
    def key_dim(self) -> int:
        return MLA_KV_LORA_RANK + MLA_ROPE_DIM if self.mla else self.head_dim

    @property
    def value_dim(self) -> int:
        return MLA_KV_LORA_RANK if self.mla else self.head_dim

    @property
    def scale(self) -> float:
        # MLA's softmax scale comes from the unabsorbed head dim (qk_nope + qk_rope = 192).
        return 1.0 / math.sqrt(192 if self.mla else self.head_dim)


@dataclass
class DecodeProblem:
    """The full inputs of a decode step: what a single device would hold."""

    spec: ProblemSpec
    query: torch.Tensor  # [B, H, key_dim]
    keys: list[torch.Tensor]  # per sequence [L, kv_heads, key_dim]
    values: list[torch.Tensor]  # per sequence [L, kv_heads, value_dim]


def make_problem(spec: ProblemSpec) -> DecodeProblem:
    """Draw the problem from ``spec.seed`` (identical in every process)."""
    gen = torch.Generator().manual_seed(spec.seed)
    kv_heads = 1 if spec.mla else spec.num_kv_heads
    query = torch.randn(len(spec.seq_lens), spec.num_heads, spec.key_dim, generator=gen)
    keys, values = [], []
    for length in spec.seq_lens:
        k = torch.randn(length, kv_heads, spec.key_dim, generator=gen)
        # Wider key spread than N(0,1) makes softmaxes peaky: a harder combine.
        k = k * (1.0 + 2.0 * torch.rand(length, 1, 1, generator=gen))
        keys.append(k.to(spec.dtype))
        values.append(
            k[..., : spec.value_dim].to(spec.dtype)
            if spec.mla
            else torch.randn(length, kv_heads, spec.value_dim, generator=gen).to(spec.dtype)
        )
    return DecodeProblem(spec, query.to(spec.dtype), keys, values)


def reference_attention(problem: DecodeProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense single-device attention in float64: ``(out [B, H, Dv], lse [B, H])``."""
    spec = problem.spec
    outs, lses = [], []
    for b, (k, v) in enumerate(zip(problem.keys, problem.values)):
        group = spec.num_heads // k.shape[1]
        q = problem.query[b].double()  # [H, Dk]
        k64 = k.double().repeat_interleave(group, dim=1)  # [L, H, Dk]
        v64 = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q, k64) * spec.scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", torch.exp(scores - lse[:, None]), v64))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


@dataclass
class RankShard:
    """What one Helix rank holds for a decode step."""

    query: torch.Tensor  # [B, H/TPA, key_dim]: this rank's TPA head slice
    key_cache: torch.Tensor  # [num_blocks, block_size, kv_heads/TPA, key_dim] (MLA: latent)
    value_cache: torch.Tensor | None  # None for MLA (values are latent dims)
    block_table: torch.Tensor  # [B, max_blocks], shared by all ranks
    seq_lens: torch.Tensor  # [B] tokens stored on this rank


def global_block_table(spec: ProblemSpec, striping: KVStriping) -> tuple[torch.Tensor, int]:
    """A vLLM-style block table (each entry covers block_size*kvp tokens) as a server has them.

    Block ids come in runs of consecutive ids (1 to 12 blocks, as a prompt or a
    prefill chunk is allocated at once) in shuffled order, so kernels meet both
    contiguous runs and scattered blocks.
    """
    gen = torch.Generator().manual_seed(spec.seed + 1)
    blocks = striping.blocks_needed(torch.tensor(spec.seq_lens, dtype=torch.int64))
    width = max(1, int(blocks.max()) if len(blocks) else 1)
    total = int(blocks.sum())
    # Two spare blocks so padding entries point at real (NaN) blocks too.
    num_blocks = total + 2
    runs, start = [], 0
    while start < num_blocks:
        length = int(torch.randint(1, 13, (1,), generator=gen))
        runs.append(torch.arange(start, min(num_blocks, start + length)))
        start += length
    ids = torch.cat([runs[i] for i in torch.randperm(len(runs), generator=gen).tolist()])
    table = torch.full((len(spec.seq_lens), width), -1, dtype=torch.int32)
    start = 0
    for row, count in enumerate(blocks.tolist()):
        table[row, :count] = ids[start : start + count].to(torch.int32)
        start += count
    return table, num_blocks


def shard_for_rank(problem: DecodeProblem, layout: HelixLayout, rank: int, stripe: int) -> RankShard:
    """Slice heads for ``rank``'s TPA slice and page in the KV tokens it owns."""
    spec = problem.spec
    coords = layout.coords(rank)
    striping = KVStriping(layout.kvp, stripe, spec.block_size)
    table, num_blocks = global_block_table(spec, striping)
    heads = layout.query_heads(rank, spec.num_heads)
    kv_slice = layout.kv_heads(rank, 1 if spec.mla else spec.num_kv_heads)

    def paged(dim: int) -> torch.Tensor:
        shape = (num_blocks * spec.block_size, len(kv_slice), dim)
        return torch.full(shape, float("nan"), dtype=spec.dtype)

    k_flat, v_flat = paged(spec.key_dim), paged(spec.value_dim)
    for row, (k, v) in enumerate(zip(problem.keys, problem.values)):
        positions = torch.arange(k.shape[0])
        slots = striping.slot_mapping(positions, table, torch.full_like(positions, row), coords.kvp_index)
        mine = slots >= 0
        k_flat[slots[mine]] = k[mine][:, kv_slice.start : kv_slice.stop]
        v_flat[slots[mine]] = v[mine][:, kv_slice.start : kv_slice.stop]
    local = striping.local_lengths(torch.tensor(spec.seq_lens, dtype=torch.int64))[coords.kvp_index]
    k_cache = k_flat.view(num_blocks, spec.block_size, len(kv_slice), spec.key_dim)
    return RankShard(
        query=problem.query[:, heads.start : heads.stop].contiguous(),
        # MLA: the latent cache [num_blocks, block_size, 576]; values are its first 512 dims.
        key_cache=k_cache[:, :, 0] if spec.mla else k_cache,
        value_cache=None
        if spec.mla
        else v_flat.view(num_blocks, spec.block_size, len(kv_slice), spec.value_dim),
        block_table=table,
        seq_lens=local,
    )


def shard_decoder(shard: RankShard, spec: ProblemSpec, kernel: Kernel = "auto"):
    """The torch per-shard decode bound to this shard's caches (a ``ShardDecode``)."""
    if spec.mla:
        return lambda q, table, lens: paged_decode_mla(
            q, shard.key_cache, table, lens, spec.scale, MLA_KV_LORA_RANK, kernel
        )
    return lambda q, table, lens: paged_decode(
        q, shard.key_cache, shard.value_cache, table, lens, spec.scale, kernel
    )


@dataclass(frozen=True)
class HelixCase:
    """One decode step to run across a Helix world: problem, layout and options."""

    spec: ProblemSpec
    kvp: int
    tpa: int = 1
    hopb: int = 1
    stripe: int | None = None  # None: the block size
    gathered: bool = False  # exchange through an all-gather (as over vLLM's CPU shared memory)

    @property
    def layout(self) -> HelixLayout:
        return HelixLayout(kvp=self.kvp, tpa=self.tpa)


def run_helix_cases(
    rank: int, world_size: int, cases: list[HelixCase]
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Rank entry point (for :func:`vllm_helix.harness.spawn.run_ranks`).

    Returns, per case, this rank's exact ``out [B, H/N, Dv]``, ``lse [B, H/N]``
    and the wall time of the Helix decode (local attention + exchange + combine).
    Every rank must receive the same cases: group creation is collective.
    """
    groups: dict[HelixLayout, HelixGroups] = {}
    results = []
    for case in cases:
        layout = case.layout
        if layout not in groups:
            groups[layout] = build_helix_groups(layout, list(range(world_size)))
        shard = shard_for_rank(
            make_problem(case.spec), layout, rank, case.stripe or case.spec.block_size
        )
        kvp_group = groups[layout].kvp_group
        all_gather = None
        if case.gathered:
            def all_gather(output: torch.Tensor, local: torch.Tensor, group=kvp_group) -> None:
                dist.all_gather_into_tensor(output, local, group=group)
        exchange = KVPExchange(kvp_group, case.kvp, all_gather)
        start = time.perf_counter()
        out, lse = helix_decode(
            shard_decoder(shard, case.spec), shard.query, shard.block_table,
            shard.seq_lens, exchange, case.hopb,
        )
        results.append((out, lse, time.perf_counter() - start))
    return results


def assemble_heads(per_rank: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ranks' ``[B, H/N, ...]`` outputs: rank r holds heads [r*H/N, (r+1)*H/N)."""
    return torch.cat(per_rank, dim=1)
