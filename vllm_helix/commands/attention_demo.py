"""`vllm-helix attention-demo`: Helix attention across spawned CPU ranks, checked and timed.

Runs one decode step of a long-context batch with the KV cache sharded over
``kvp`` gloo processes (heads over ``tpa``), with and without HOP-B, next to the
same step on a single process holding the whole cache, and prints the error
against a float64 dense reference and the step time of each. No model, no vLLM:
this is the attention core that the vLLM backend runs inside each worker.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from vllm_helix.attention.synthetic import (
    HelixCase,
    ProblemSpec,
    assemble_heads,
    make_problem,
    reference_attention,
    run_helix_cases,
)
from vllm_helix.config import HelixConfig, HelixConfigError, ModelShape
from vllm_helix.harness.spawn import run_ranks

HELP = "run Helix attention across local CPU ranks and print exactness and timing"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--helix", default="kvp=2,tpa=1,hopb=2", help="layout, e.g. kvp=2,tpa=1,hopb=2")
    parser.add_argument("--attention", choices=["mla", "gqa"], default="mla",
                        help="mla: DeepSeek latent attention (512+64); gqa: Llama-style")
    parser.add_argument("--heads", type=int, default=16, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads (gqa only)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=8192, help="mean tokens of KV history")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median shown)")
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def run(args: argparse.Namespace) -> int:
    try:
        config = HelixConfig.parse(args.helix)
        shape = ModelShape(
            num_q_heads=args.heads,
            num_kv_heads=1 if args.attention == "mla" else args.kv_heads,
            is_mla=args.attention == "mla",
        )
        config.validate(config.world_size, shape)
    except HelixConfigError as err:
        print(f"error: {err}")
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    # Uneven lengths around the requested context, as in a real batch.
    lengths = tuple(max(1, int(args.context * rng.uniform(0.5, 1.5))) for _ in range(args.batch))
    spec = ProblemSpec(seed, lengths, args.heads, shape.num_kv_heads, 128, shape.is_mla, _DTYPES[args.dtype])
    layouts = {
        "single process (whole KV)": HelixCase(spec, kvp=1, tpa=1),
        f"helix kvp={config.kvp},tpa={config.tpa}": HelixCase(spec, config.kvp, config.tpa, 1, config.stripe),
    }
    if config.hopb > 1:
        layouts[f"  + HOP-B hopb={config.hopb}"] = HelixCase(
            spec, config.kvp, config.tpa, config.hopb, config.stripe
        )
    print(f"Helix attention demo (CPU, gloo): {args.attention.upper()}, {args.heads} query heads, "
          f"batch {args.batch}, KV lengths {list(lengths)}, {args.dtype}, seed {seed}")
    ref_out, ref_lse = reference_attention(make_problem(spec))
    rows = []
    for name, case in layouts.items():
        world = case.kvp * case.tpa
        per_rank = run_ranks(run_helix_cases, world, ([case] * (args.repeats + 1),), timeout_s=600)
        out = assemble_heads([results[0][0] for results in per_rank])
        # a step takes as long as its slowest rank; the first repetition is warm-up
        times = [max(results[i][2] for results in per_rank) for i in range(1, args.repeats + 1)]
        rows.append((name, world, _relative_error(out, ref_out), statistics.median(times) * 1e3))
    print(f"{'layout':32} {'ranks':>5} {'rel. error vs fp64':>19} {'step ms':>9} {'speed-up':>9}")
    for name, world, error, ms in rows:
        print(f"{name:32} {world:5d} {error:19.2e} {ms:9.2f} {rows[0][3] / ms:8.2f}x")
    tolerance = 1e-5 if spec.dtype == torch.float32 else 2e-2
    exact = all(error <= tolerance for _, _, error, _ in rows)
    print(f"exact: {'yes' if exact else 'NO'} (every layout within {tolerance:g} of the float64 "
          f"reference); each rank stores ~1/{config.kvp} of every sequence's KV")
    return 0 if exact else 1
