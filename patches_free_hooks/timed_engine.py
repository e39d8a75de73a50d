"""One vLLM engine timing decode at given points: the process ``vllm_helix.harness.engine_runs.run_engine``
starts (``python -m patches_free_hooks.timed_engine SPEC``).

It starts vLLM's offline ``LLM`` with the spec's arguments, warms up, and times every
(context, batch) point from vLLM's own request timestamps: TPOT = (last token - first token)
/ (generated - 1), so prefill is excluded. The JSON of the points done so far is rewritten
after each point, so a point that kills the engine leaves the earlier ones.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any


def time_points(spec: dict[str, Any]) -> None:
    """Inside the fresh process: start the engine, warm up, time every point, write JSON."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**spec["llm_kwargs"])
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=[rng.randrange(5, 2000) for _ in range(256)])], warm,
                 use_tqdm=False)
    points = []
    for context, batch in spec["points"]:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(5, 2000) for _ in range(context)])
                   for _ in range(batch)]
        started = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        tpots = []
        for output in outputs:
            metrics, generated = output.metrics, len(output.outputs[0].token_ids)
            tpots.append((metrics.last_token_ts - metrics.first_token_ts) / (generated - 1) * 1000.0)
        points.append({"context": context, "batch": batch, "tpot_ms": sum(tpots) / len(tpots),
                       "tpot_ms_per_request": tpots, "wall_s": round(time.monotonic() - started, 2)})
        Path(spec["out"]).write_text(json.dumps({"points": points}))  # kept if a later point kills the engine
        print(f"[long_context] {context} x {batch}: TPOT {points[-1]['tpot_ms']:.1f} ms", file=sys.stderr,
              flush=True)
    if spec.get("profile_steps"):  # decode_step_profile.py: the same request again, under vLLM's profiler
        context = spec["points"][-1][0]
        prompt = TokensPrompt(prompt_token_ids=[rng.randrange(5, 2000) for _ in range(context)])
        llm.start_profile()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=spec["profile_steps"] + 1,
                                              ignore_eos=True), use_tqdm=False)
        llm.stop_profile()
    Path(spec["out"]).write_text(json.dumps({"points": points}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m patches_free_hooks.timed_engine SPEC_JSON (started by run_engine)")
    time_points(json.loads(sys.argv[1]))
