"""Helix attention across spawned gloo ranks against single-device full attention.

Each world runs many cases in one spawn (process start-up dominates on 2 cores):
every (kvp, tpa) layout the issue names, GQA ratios 1/2/8 and MLA (512+64),
float32/bf16/float64, uneven lengths 1..2000 with some shorter than kvp (empty
shards), striping by blocks and by single tokens, HOP-B on and off, and the
exchange as all-to-all or as all-gather (the CPU shared-memory route). Seeds are
fresh per run and printed.
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_helix.attention.synthetic import (
    HelixCase,
    ProblemSpec,
    assemble_heads,
    make_problem,
    reference_attention,
    run_helix_cases,
)
from vllm_helix.harness.spawn import run_ranks

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
GQA_SHAPES = [(8, 8), (8, 4), (16, 2)]  # (query heads, KV heads): ratios 1, 2, 8


def _lengths(rng: random.Random, kvp: int) -> tuple[int, ...]:
    batch = rng.randint(1, 8)
    lengths = [rng.randint(1, 2000) for _ in range(batch)]
    lengths[rng.randrange(batch)] = rng.randint(1, max(1, kvp - 1))  # empty shards
    return tuple(lengths)


def _cases(seed: int, layouts: list[tuple[int, int]]) -> list[HelixCase]:
    rng = random.Random(seed)
    cases = []
    for kvp, tpa in layouts:
        shapes = [(h, kv, False) for h, kv in GQA_SHAPES if kv % tpa == 0]
        if tpa == 1:
            shapes.append((8, 1, True))
        for heads, kv_heads, mla in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                spec = ProblemSpec(
                    rng.randrange(2**31), _lengths(rng, kvp), heads, kv_heads, 64, mla, dtype
                )
                stripe = rng.choice([None, 1, 4])
                for hopb, gathered in ((1, False), (3, False), (2, True)):
                    cases.append(HelixCase(spec, kvp, tpa, hopb, stripe, gathered))
        spec = ProblemSpec(rng.randrange(2**31), _lengths(rng, kvp), 8, 4 if tpa > 1 else 2, 32, dtype=torch.float64)
        cases.append(HelixCase(spec, kvp, tpa, hopb=2))
    return cases


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def _check_world(world: int, layouts: list[tuple[int, int]], seed: int) -> None:
    cases = _cases(seed, layouts)
    per_rank = run_ranks(run_helix_cases, world, (cases,), timeout_s=600)
    outputs: dict[tuple, torch.Tensor] = {}
    for index, case in enumerate(cases):
        out = assemble_heads([results[index][0] for results in per_rank])
        lse = assemble_heads([results[index][1] for results in per_rank])
        ref_out, ref_lse = reference_attention(make_problem(case.spec))
        where = f"case {index}: {case} (seed {seed})"
        assert out.dtype == case.spec.dtype, where
        assert not torch.isnan(out).any(), where
        assert _relative_error(out, ref_out) <= TOLERANCE[case.spec.dtype], where
        assert _relative_error(lse, ref_lse) <= TOLERANCE[case.spec.dtype], where
        # HOP-B on and off, all-to-all or all-gather: the same numbers, not merely both close
        first = outputs.setdefault((case.spec, case.kvp, case.tpa, case.stripe), out)
        assert torch.equal(out, first), where


@pytest.mark.slow
def test_world_2_kvp2(fresh_seed):
    _check_world(2, [(2, 1)], fresh_seed)


@pytest.mark.slow
def test_world_4_kvp4_and_kvp2_tpa2(fresh_seed):
    _check_world(4, [(4, 1), (2, 2)], fresh_seed)
