"""Measure the run-to-run noise of vLLM's CPU path on the offline twins.

Helix-vs-baseline tests compare greedy logprobs with a 1e-3 tolerance, which
only means something if the baseline agrees with itself far below that. This
script answers "does it, and under which settings?" reproducibly:

* each *run* is a fresh process (``--worker`` mode) that loads the twin in
  ``vllm.LLM`` with one *setting* (env vars + LLM kwargs, see ``SETTINGS``),
  generates greedily for a fixed prompt batch ``--repeats`` times in the same
  engine, then once more prompt-by-prompt (batch size 1);
* the parent compares the logprobs of the chosen tokens across repeats in one
  engine (``within_engine``), across processes (``across_processes``), between
  batched and one-at-a-time generation (``batch_vs_single``), and against
  transformers' float32 forward pass of the same sequences (``vs_transformers``,
  the reference: a setting can be perfectly repeatable and still wrong).

Results go to stdout as one JSON document; vLLM's logs go to stderr.

    .venv/bin/python scripts/noise_probe.py --arch deepseek_v3 --tp 1 --runs 3 \
        --settings stock native_rope > /tmp/noise.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vllm_helix.harness.server import baseline_engine_kwargs

# Env vars every run needs on the 2-core CPU machines (see /work/shared/NOTES-vllm.md).
BASE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
TP2_THREADS_BIND = "0|1"

# Each setting: extra env vars and extra vllm.LLM kwargs, and why it is tried.
SETTINGS: dict[str, dict[str, Any]] = {
    "stock": {"env": {}, "llm": {}, "why": "vLLM defaults (enforce_eager, float32)"},
    "native_rope": {
        "env": {},
        "llm": {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}},
        "why": "rotary embedding in PyTorch instead of the CPU C++ kernel "
               "(which mis-indexes 3-D/strided query and key tensors, as MLA passes them)",
    },
    "two_threads": {
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
        "llm": {},
        "why": "TP=1 worker with 2 OpenMP threads (default binds it to 1 core)",
    },
    "two_threads_native_rope": {
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
        "llm": {"compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}},
        "why": "both of the above",
    },
    "inproc_engine": {
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "llm": {"distributed_executor_backend": "mp"},
        "why": "engine core in the caller's process: generate() queues every prompt before the first "
               "step, so the batch composition no longer depends on IPC timing (workers stay mp)",
    },
    "deterministic": {
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "llm": {"distributed_executor_backend": "mp",
                "compilation_config": {"custom_ops": ["all", "-rotary_embedding"]}},
        "why": "native_rope + inproc_engine",
    },
    "no_split_kv": {
        "env": {"VLLM_CPU_ATTN_SPLIT_KV": "0"},
        "llm": {},
        "why": "CPU_ATTN without split-KV decode (thread-count dependent reduction)",
    },
}

PROMPTS = (
    "Hello world, Helix decode",
    "the model of attention is parallel",
    "1234 tokens in the cache;",
    "Zan dor ith su: a layer of experts, and the head of the batch.",
    "rank",
    "the prefill of the shard and the tensor of the rank with 42 heads",
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    model = Path(args.model) if args.model else _default_twin(args.arch)
    report: dict[str, Any] = {
        "model": str(model), "arch": args.arch, "tp": args.tp, "runs": args.runs,
        "repeats_per_engine": args.repeats, "max_tokens": args.max_tokens,
        "prompts": list(PROMPTS), "settings": {},
    }
    reference_cache: dict[str, Any] = {}
    for name in args.settings:
        runs = [_launch(model, name, args) for _ in range(args.runs)]
        report["settings"][name] = _summarise(name, runs, model, reference_cache)
        print(f"[noise_probe] {name}: {json.dumps(report['settings'][name]['summary'])}", file=sys.stderr)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("deepseek_v3", "llama"), default="deepseek_v3")
    parser.add_argument("--model", help="model directory (default: a float32 twin built under /tmp)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2, help="fresh processes per setting")
    parser.add_argument("--repeats", type=int, default=2, help="batched generate() calls per engine")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=420, help="seconds per run before it is killed")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["stock", "native_rope"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _default_twin(arch: str) -> Path:
    """Build (once) the float32 seed-0 twin; twins are deterministic, so reuse is safe."""
    from vllm_helix.twins import make_tiny_model

    path = Path(tempfile.gettempdir()) / f"helix-noise-twin-{arch}-f32"
    if not (path / "model.safetensors").exists():
        make_tiny_model(path, arch, dtype="float32")
    return path


def _launch(model: Path, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run in a fresh process group, killed as a whole on timeout (vLLM spawns workers)."""
    env = {**os.environ, **BASE_ENV, **SETTINGS[setting]["env"]}
    if args.tp > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", TP2_THREADS_BIND)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    spec = {"model": str(model), "setting": setting, "tp": args.tp, "repeats": args.repeats,
            "max_tokens": args.max_tokens, "out": str(out)}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                            stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    try:
        code = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"error": f"timed out after {args.timeout}s"}
    if code != 0 or out.stat().st_size == 0:
        return {"error": f"worker exited with {code}"}
    result = json.loads(out.read_text())
    out.unlink()
    result["wall_s"] = round(time.monotonic() - start, 1)
    return result


def _worker(spec: dict[str, Any]) -> None:
    """Runs inside the fresh process: load, generate, write JSON to spec['out']."""
    from vllm import LLM, SamplingParams

    start = time.monotonic()
    llm = LLM(model=spec["model"], **baseline_engine_kwargs(spec["model"], "float32"), enforce_eager=True,
              max_model_len=512, tensor_parallel_size=spec["tp"], seed=0, disable_log_stats=False,
              **SETTINGS[spec["setting"]]["llm"])
    load_s = time.monotonic() - start
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=1)
    start = time.monotonic()
    batched = [_sequences(llm.generate(list(PROMPTS), params, use_tqdm=False)) for _ in range(spec["repeats"])]
    generate_s = (time.monotonic() - start) / spec["repeats"]
    single = [_sequences(llm.generate([p], params, use_tqdm=False))[0] for p in PROMPTS]
    result = {"load_s": round(load_s, 1), "generate_s": round(generate_s, 2), "batched": batched, "single": single}
    Path(spec["out"]).write_text(json.dumps(result))


def _sequences(outputs: list[Any]) -> list[dict[str, Any]]:
    """Tokens and chosen-token logprobs, plus the engine step that first scheduled each request.

    ``scheduled_ts`` is the engine core's timestamp of the step that first
    scheduled the request: prompts with equal values were prefilled together.
    """
    return [
        {
            "prompt_ids": list(o.prompt_token_ids),
            "ids": list(o.outputs[0].token_ids),
            "logprobs": [step[tok].logprob for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
            "scheduled_ts": o.metrics.scheduled_ts if o.metrics is not None else None,
        }
        for o in outputs
    ]


def _compare(a: list[dict[str, list]], b: list[dict[str, list]]) -> dict[str, Any]:
    """Max |logprob| difference over the common prefix of each prompt's greedy tokens."""
    max_diff, same_tokens = 0.0, True
    for x, y in zip(a, b):
        common = next((i for i, (s, t) in enumerate(zip(x["ids"], y["ids"])) if s != t), len(x["ids"]))
        same_tokens &= common == len(x["ids"]) == len(y["ids"])
        diffs = [abs(p - q) for p, q in zip(x["logprobs"][:common], y["logprobs"][:common])]
        max_diff = max([max_diff, *diffs])
    return {"max_abs_logprob_diff": max_diff, "same_tokens": same_tokens}


def _worst(comparisons: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not comparisons:
        return None
    return {"max_abs_logprob_diff": max(c["max_abs_logprob_diff"] for c in comparisons),
            "same_tokens": all(c["same_tokens"] for c in comparisons), "pairs": len(comparisons)}


def _summarise(name: str, runs: list[dict[str, Any]], model: Path, cache: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    within = [_compare(r["batched"][0], again) for r in ok for again in r["batched"][1:]]
    across = [_compare(a["batched"][0], b["batched"][0]) for a, b in itertools.combinations(ok, 2)]
    batch = [_compare(r["batched"][0], r["single"]) for r in ok]
    reference = [_compare(r["batched"][0], _transformers_logprobs(model, r["batched"][0], cache)) for r in ok]
    return {
        "why": SETTINGS[name]["why"], "env": SETTINGS[name]["env"], "llm_kwargs": SETTINGS[name]["llm"],
        "errors": [r["error"] for r in runs if "error" in r],
        "timings": [{"load_s": r["load_s"], "generate_s": r["generate_s"], "wall_s": r["wall_s"]} for r in ok],
        # Per run, per batched generate(): how many engine steps the prompts' prefills were spread over.
        "prefill_steps": [[_prefill_steps(batch) for batch in r["batched"]] for r in ok],
        "summary": {"within_engine": _worst(within), "across_processes": _worst(across),
                    "batch_vs_single": _worst(batch), "vs_transformers": _worst(reference)},
        "first_run_tokens": ok[0]["batched"][0] if ok else None,
    }


def _prefill_steps(batch: list[dict[str, Any]]) -> int | None:
    stamps = {seq["scheduled_ts"] for seq in batch}
    return None if None in stamps else len(stamps)


def _transformers_logprobs(model: Path, seqs: list[dict[str, list]], cache: dict[str, Any]) -> list[dict[str, list]]:
    """Teacher-forced float32 logprobs of the same tokens from transformers (no KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    if "model" not in cache:
        cache["model"] = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    for seq in seqs:
        full = torch.tensor([seq["prompt_ids"] + seq["ids"]])
        with torch.no_grad():
            logprobs = cache["model"](full, use_cache=False).logits[0].float().log_softmax(-1)
        n = len(seq["prompt_ids"])
        picked = logprobs[n - 1:-1].gather(1, full[0, n:, None])[:, 0]
        out.append({"ids": seq["ids"], "logprobs": picked.tolist()})
    return out


if __name__ == "__main__":
    sys.exit(main())
