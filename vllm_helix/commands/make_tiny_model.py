"""`vllm-helix make-tiny-model`: write a twin (:mod:`vllm_helix.twins`) into a directory."""

from __future__ import annotations

import argparse

from vllm_helix.twins import ARCHS, DTYPES, TwinError, make_tiny_model

HELP = "write a tiny random-weight DeepSeek-V3 or Llama model directory that stock vLLM loads (offline)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="DIR", help="directory to write the model into")
    parser.add_argument("--arch", choices=ARCHS, required=True,
                        help="deepseek_v3: MLA + MoE + shared expert, dense first layer; llama: GQA")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight storage dtype")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (deepseek_v3: >= 2)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    parser.add_argument("--kv-heads", type=int, default=2,
                        help="llama: KV heads for the 8 query heads (1, 2, 4, 8; kvp=2 on 2 ranks needs 1)")


def run(args: argparse.Namespace) -> int:
    try:
        out = make_tiny_model(args.out_dir, args.arch, args.dtype, args.layers, args.seed, args.kv_heads)
    except TwinError as err:
        print(f"error: {err}")
        return 2
    print(f"wrote {args.arch} twin ({args.layers} layers, {args.dtype}, seed {args.seed}) to {out}")
    return 0
