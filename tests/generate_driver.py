"""Run greedy generation in vllm.LLM in a fresh process; write tokens and logprobs as JSON.

Used by the end-to-end tests as ``python generate_driver.py SPEC_JSON`` so every
engine lives in its own killable process. SPEC keys: model, out, prompts
(token-id lists), max_tokens, llm_kwargs (passed to vllm.LLM, e.g.
additional_config={"helix": {...}}), repeat (generate the same prompts a second
time: prefix-cache hits), rounds (more prompt lists, generated one after another
in the same engine; their results follow the first round's). The JSON also carries
vLLM's preemption counter and the HelixConnector's counters (``vllm:helix_kv_*``).

``python generate_driver.py --serve SPEC_JSON`` keeps one engine (SPEC: model,
llm_kwargs) and answers requests read from stdin, one JSON line each (prompts,
max_tokens, out), until stdin closes: the session's shared reference engines
(``reference`` fixture). Each answer is written to a temporary file, then renamed
to ``out``, so the reader never sees half a file.
"""

import json
import os
import sys
import time


def _engine(spec):
    from vllm import LLM

    kwargs = dict(model=spec["model"], dtype="float32", enforce_eager=True, seed=0,
                  max_model_len=spec.get("max_model_len", 2048), max_num_seqs=16, disable_log_stats=False)
    kwargs.update(spec.get("llm_kwargs", {}))
    return LLM(**kwargs)


def serve(spec) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _engine(spec)
    print("reference engine ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, logprobs=1)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], params,
                               use_tqdm=False)
        partial = request["out"] + ".partial"
        with open(partial, "w") as f:
            json.dump({"results": _results(outputs)}, f)
        os.replace(partial, request["out"])


def main() -> None:
    if sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
        return
    spec = json.loads(sys.argv[1])
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.time()
    llm = _engine(spec)
    load_s = time.time() - started
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=1)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    started = time.time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for more in spec.get("rounds", []):
        outputs += llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in more], params, use_tqdm=False)
    generate_s = time.time() - started
    report = {"results": _results(outputs), "load_s": load_s, "generate_s": generate_s}
    if spec.get("repeat"):
        again = llm.generate(prompts, params, use_tqdm=False)
        report["repeat"] = _results(again)
        report["repeat_cached_tokens"] = [o.num_cached_tokens or 0 for o in again]
    metrics = llm.get_metrics()
    report["preemptions"] = sum(m.value for m in metrics if m.name == "vllm:num_preemptions")
    report["connector"] = {m.name: m.value for m in metrics if m.name.startswith("vllm:helix_kv_")}
    with open(spec["out"], "w") as f:
        json.dump(report, f)


def _results(outputs):
    results = []
    for output in outputs:
        completion = output.outputs[0]
        results.append({
            "ids": list(completion.token_ids),
            "logprobs": [step[token].logprob for step, token in zip(completion.logprobs or [], completion.token_ids)],
            "finish_reason": completion.finish_reason,
        })
    return results


if __name__ == "__main__":
    main()
