"""`vllm-helix demo`: serve the offline DeepSeek-V3 twin with Helix and show what it buys.

The README's first command. It builds the twin (random weights, real
architecture: MLA + MoE + shared expert, no download), then runs vLLM's OpenAI
server twice on the same two CPU workers with the same memory each:

* **Helix** ``kvp=2,tpa=1`` (the latent KV cache split along the sequence), and
* **Helix off**: ``--tensor-parallel-size 2``, vLLM's default, which must
  duplicate the single latent KV head on both workers.

Both get the same prompts, each several KV blocks long, greedy, in one
concurrent burst. It prints the KV-cache capacity and maximum concurrency vLLM
reports, decode throughput, and whether the two servers produced the same
tokens (and how close their logprobs are). Exit code 0 only if they agree.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import sys
import time
from pathlib import Path
from typing import Any

from vllm_helix.config import HelixConfig, HelixConfigError
from vllm_helix.harness.server import (EXACT_ROPE_FLAGS, Server, ServerError, baseline_serve_args, cpu_env,
                                       vllm_command, vllm_helix_command)

HELP = "serve the DeepSeek-V3 twin with Helix through vLLM's OpenAI server; compare with Helix off"

_LOGPROB_TOLERANCE = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--helix", default="kvp=2,tpa=1,hopb=2", help="Helix layout to serve")
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/twins/deepseek_v3"),
                        help="where the twin is built (reused when present)")
    parser.add_argument("--prompts", type=int, default=8, help="concurrent requests")
    parser.add_argument("--min-len", type=int, default=48, help="shortest prompt, tokens")
    parser.add_argument("--max-len", type=int, default=600, help="longest prompt, tokens (16-token KV blocks)")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/demo-logs"), help="server logs")
    parser.add_argument("--seed", type=int, default=0)


def _twin(model_dir: Path) -> Path:
    if (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists():
        return model_dir
    from vllm_helix.twins import make_tiny_model

    print(f"building the DeepSeek-V3 twin in {model_dir} (random weights, local tokenizer) ...", flush=True)
    return make_tiny_model(model_dir, "deepseek_v3")


def _burst(server: Server, model: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[dict[str, Any]], float]:
    """All prompts at once (the batch a decode step sees); returns results and wall seconds."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: server.greedy_completion(model, p, max_tokens), prompts))
    return results, time.monotonic() - started


def _serve(label: str, command: list[str], log: Path, model: str, prompts: list[list[int]],
           max_tokens: int, workers: int) -> dict[str, Any]:
    print(f"starting {label} ...", flush=True)
    with Server(command, log, env=cpu_env(workers)) as server:
        print(f"  up in {server.start_s:.0f}s ({server.url}, log {log})", flush=True)
        _burst(server, model, prompts[:1], 2)  # warm-up
        results, seconds = _burst(server, model, prompts, max_tokens)
        return {"results": results, "seconds": seconds, "kv": server.kv_capacity()}


def _compare(helix: list[dict[str, Any]], off: list[dict[str, Any]]) -> tuple[int, float]:
    same = sum(h["ids"] == o["ids"] for h, o in zip(helix, off))
    worst = max(abs(a - b) for h, o in zip(helix, off) for a, b in zip(h["logprobs"], o["logprobs"]))
    return same, worst


def run(args: argparse.Namespace) -> int:
    try:
        helix = HelixConfig.parse(args.helix)
    except HelixConfigError as err:
        print(f"error: {err}")
        return 2
    model = str(_twin(args.model_dir))
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.prompts)]
    prompts = [[rng.randrange(5, 2000) for _ in range(n)] for n in lengths]
    common = [model, "--enforce-eager", "--max-model-len", str(args.max_model_len), *EXACT_ROPE_FLAGS]
    workers = helix.world_size
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
          f"({min(lengths) // 16}-{max(lengths) // 16} KV blocks of 16), {args.max_tokens} greedy tokens each")
    try:
        on = _serve(f"Helix {helix.to_cli()} on {workers} CPU workers",
                    [*vllm_helix_command(), "serve", *common, "--dtype", "float32", "--helix", helix.to_cli()],
                    args.log_dir / "helix.log", model, prompts, args.max_tokens, workers)
        off = _serve(f"Helix off: vLLM TP={workers} (KV duplicated) on {workers} CPU workers",
                     [*vllm_command(), "serve", *common, *baseline_serve_args(model, "float32"),
                      "--tensor-parallel-size", str(workers)],
                     args.log_dir / "off.log", model, prompts, args.max_tokens, workers)
    except ServerError as err:
        print(f"error: {err}")
        return 1
    same, worst = _compare(on["results"], off["results"])
    tokens = args.prompts * args.max_tokens
    rows = [
        ("KV cache capacity (tokens)", f"{on['kv']['kv_cache_tokens']:,}", f"{off['kv']['kv_cache_tokens']:,}",
         on["kv"]["kv_cache_tokens"] / off["kv"]["kv_cache_tokens"]),
        (f"max concurrency at {args.max_model_len} tokens", f"{on['kv']['max_concurrency']:.1f}",
         f"{off['kv']['max_concurrency']:.1f}", on["kv"]["max_concurrency"] / off["kv"]["max_concurrency"]),
        ("output tokens/s (burst)", f"{tokens / on['seconds']:.1f}", f"{tokens / off['seconds']:.1f}",
         off["seconds"] / on["seconds"]),
    ]
    print()
    print(f"{'':34} {'Helix ' + helix.to_cli():>40} {'TP=' + str(workers) + ' (Helix off)':>18} {'ratio':>7}")
    for name, a, b, ratio in rows:
        print(f"{name:34} {a:>40} {b:>18} {ratio:>6.2f}x")
    agree = same == len(prompts) and worst <= _LOGPROB_TOLERANCE
    print()
    print(f"agreement: {same}/{len(prompts)} prompts with identical greedy tokens; "
          f"max |logprob difference| {worst:.2e} (tolerance {_LOGPROB_TOLERANCE:g})")
    print("Helix works: exact, and the same workers hold "
          f"{rows[0][3]:.2f}x the context." if agree else "MISMATCH: Helix and Helix off disagree")
    print("(tokens/s on a small CPU box measures the plumbing, not Helix's long-context win; "
          "see benchmarks/ and `vllm-helix plan`)")
    return 0 if agree else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=HELP)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
