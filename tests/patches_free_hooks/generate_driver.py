"""Run greedy generation in vllm.LLM in a fresh process; write tokens and logprobs as JSON.

Used by the end-to-end tests as ``python generate_driver.py SPEC_JSON`` so every
engine lives in its own killable process. SPEC keys: model, out, prompts
(token-id lists), max_tokens, llm_kwargs (passed to vllm.LLM, e.g.
additional_config={"helix": {...}}).
"""

import json
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=spec["model"], dtype="float32", enforce_eager=True, seed=0,
                  max_model_len=spec.get("max_model_len", 2048), max_num_seqs=16)
    kwargs.update(spec.get("llm_kwargs", {}))
    started = time.time()
    llm = LLM(**kwargs)
    load_s = time.time() - started
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=1)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    started = time.time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.time() - started
    results = []
    for output in outputs:
        completion = output.outputs[0]
        results.append({
            "ids": list(completion.token_ids),
            "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
        })
    cache = llm.llm_engine.vllm_config.cache_config
    with open(spec["out"], "w") as f:
        json.dump({"results": results, "load_s": load_s, "generate_s": generate_s,
                   "num_gpu_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}, f)


if __name__ == "__main__":
    main()
