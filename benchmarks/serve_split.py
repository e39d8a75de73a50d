"""The served prefill/decode split on this machine: plain prefill, Helix decode, vllm-router in front.

For each benchmark twin (the Llama twin with one KV head, GQA; the DeepSeek-V3 twin,
MLA), three processes as the README starts them (:mod:`vllm_helix.harness.split`): a
plain vLLM prefill server (``HelixConnector`` producer), a Helix ``kvp=2`` decode
server (consumer), and the vLLM project's ``vllm-router --vllm-pd-disaggregation``.
Checked: greedy tokens and logprobs through the router against one engine (the
prefill server asked directly) for prompts that are and are not multiples of
``block_size * kvp``; the decode server's log shows the load of every prompt; then
``vllm bench serve`` through the router, which must complete with zero failures.

Writes ``benchmarks/results/serve_split.{json,md}``. Needs ``vllm-router``
(``pip install 'vllm-helix[disagg]'``; ``scripts/setup.sh`` installs it).

    .venv/bin/python -m benchmarks.serve_split        # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

from vllm_helix.twins import benchmark_twin
from vllm_helix.config import HelixConfig
from vllm_helix.harness.machine import machine_sentence
from vllm_helix.harness.server import EXACT_ROPE_FLAGS
from vllm_helix.harness.results_page import stamped, write_page
from vllm_helix.harness.split import check_split

RESULTS = Path(__file__).resolve().parent / "results"
TWINS = ("llama_kv1", "deepseek_v3")
# 512 and 1024 are multiples of block_size * kvp for both twins (128 * 2 and 16 * 2); 600 and 777 of neither
PROMPT_LENGTHS = (512, 600, 777, 1024)


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 2000) for _ in range(n)] for n in PROMPT_LENGTHS]


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Served prefill/decode split: plain prefill, Helix decode, vllm-router",
        "",
        f"{machine_sentence(payload['machine'], payload['date'])} Commands: `{payload['commands']['prefill']}`; "
        f"`{payload['commands']['decode']}`; `{payload['commands']['router']}` "
        "(the model, store and ports filled in per twin; the harness adds `--dtype float32`, the baseline "
        "attention backend, `--enforce-eager`, `--max-model-len 2048` and PyTorch's rotary).",
        "",
        "| twin | Helix decode | prompts (tokens) | identical greedy tokens | max abs logprob diff | "
        "loads seen (tokens of prompt) | bench: completed / failed | loads during bench | TTFT mean (ms) | "
        "TPOT mean (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["records"]:
        b = r["bench"]
        loads = ", ".join(f"{a}/{p}" for a, p in r["loads_for_checked_prompts"])
        lines.append(
            f"| {r['model']} | {r['helix']} | {', '.join(map(str, r['prompt_lengths']))} | "
            f"{r['identical_tokens']}/{r['prompts']} ({r['max_tokens']} each) | {r['max_logprob_diff']:.1e} | "
            f"{loads} | {b['completed']} / {b['failed']} | {r['loads_during_bench']} | "
            f"{b['mean_ttft_ms']:.0f} | {b['mean_tpot_ms']:.1f} |")
    lines += [
        "",
        "The reference is one plain engine doing prefill and decode (the prefill server asked directly, before "
        "any routed request). Routed requests go prefill (max_tokens=1) then decode; the decode server loads "
        "all but the last prompt token from the store and computes the last one itself. `vllm bench serve` "
        f"used random prompts of {payload['records'][0]['bench']['input_len']} tokens, 16 output tokens, "
        f"concurrency {payload['records'][0]['bench']['concurrency']}, through the router. Times on two shared "
        "CPU cores measure the plumbing (three engines on two cores), not Helix's long-context win.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", default=",".join(TWINS))
    parser.add_argument("--helix", default="kvp=2,tpa=1")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--bench-prompts", type=int, default=8)
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/serve-split"))
    args = parser.parse_args()
    helix = HelixConfig.parse(args.helix)
    engine_args = ["--enforce-eager", "--max-model-len", "2048", *EXACT_ROPE_FLAGS]
    records = []
    for name in args.twins.split(","):
        model = benchmark_twin(name)
        with tempfile.TemporaryDirectory(prefix="helix-kv-") as store:
            print(f"[{name}] prefill -> Helix {helix.to_cli()} decode behind vllm-router ...", flush=True)
            record = check_split(model, prompts(), args.max_tokens, helix, args.log_dir / name, Path(store),
                                 engine_args, bench_prompts=args.bench_prompts)
        record.pop("single"), record.pop("routed")
        print(f"  identical {record['identical_tokens']}/{record['prompts']}, max logprob diff "
              f"{record['max_logprob_diff']:.1e}, bench failed {record['bench']['failed']}", flush=True)
        records.append(record)
    payload = {
        "commands": {"prefill": "vllm-helix serve MODEL --helix off --kv-transfer-config PRODUCER_JSON",
                     "decode": f"vllm-helix serve MODEL --helix {helix.to_cli()} --kv-transfer-config CONSUMER_JSON",
                     "router": "vllm-router --vllm-pd-disaggregation --prefill PREFILL_URL --decode DECODE_URL"},
        "records": records,
    }
    print(write_page(RESULTS, "serve_split", stamped(payload), markdown))


if __name__ == "__main__":
    main()
