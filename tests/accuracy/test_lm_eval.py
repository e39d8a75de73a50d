"""Accuracy through lm-eval against vLLM's OpenAI server: Helix against Helix off.

Opt-in: it needs real weights and local copies of the datasets (nothing is
downloaded). It runs when these are set, and skips saying exactly what is missing:

* ``HELIX_ACCURACY_MODEL``: a local model directory (e.g. DeepSeek-V3-Lite weights);
* ``HELIX_ACCURACY_DATASETS``: a Hugging Face datasets cache holding ``gsm8k`` and
  ``cais/mmlu`` (made once where the hub is reachable with
  ``HF_DATASETS_CACHE=DIR python -c "import datasets; datasets.load_dataset('gsm8k', 'main'); datasets.load_dataset('cais/mmlu', 'all')"``);
* ``lm-eval`` installed (``pip install 'vllm-helix[accuracy]'``).

Optional: ``HELIX_ACCURACY_HELIX`` (layout, default ``kvp=2,tpa=1``),
``HELIX_ACCURACY_LIMIT`` (examples per task, default 250),
``HELIX_ACCURACY_DTYPE`` (``--dtype`` of both servers, default ``bfloat16``; the Helix-off
server's attention backend follows it, e.g. vLLM's ``AMX_MLA`` for bf16 MLA on an AMX CPU),
``HELIX_ACCURACY_SERVE_ARGS`` (extra ``vllm serve`` arguments, e.g. ``--max-model-len 4096``).

For each task the Helix score must be within the combined standard error of the
two runs, ``sqrt(se_helix**2 + se_off**2)``: Helix is exact, so any larger gap is a bug.
The offline-twin equality tests (tests/patches_free_hooks/test_generation.py) are the
always-on check.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_helix.config import HelixConfig
from vllm_helix.harness.server import Server, baseline_serve_args, cpu_env, vllm_command, vllm_helix_command

# task -> (lm-eval metric key, its standard-error key)
TASKS = {
    "gsm8k": ("exact_match,strict-match", "exact_match_stderr,strict-match"),
    "mmlu": ("acc,none", "acc_stderr,none"),
}


def _requirements() -> tuple[Path, Path]:
    missing = []
    model = os.environ.get("HELIX_ACCURACY_MODEL")
    datasets = os.environ.get("HELIX_ACCURACY_DATASETS")
    if not model or not (Path(model) / "config.json").exists():
        missing.append("HELIX_ACCURACY_MODEL=<local model dir with config.json and weights>")
    if not datasets or not Path(datasets).is_dir():
        missing.append("HELIX_ACCURACY_DATASETS=<HF datasets cache with gsm8k and cais/mmlu>")
    if importlib.util.find_spec("lm_eval") is None:
        missing.append("lm-eval (pip install 'vllm-helix[accuracy]')")
    if importlib.util.find_spec("vllm") is None:
        missing.append("vLLM (pip install 'vllm-helix[cpu]' or '[gpu]')")
    if missing:
        pytest.skip("accuracy run needs: " + "; ".join(missing))
    return Path(model), Path(datasets)


def _lm_eval(server: Server, model: Path, datasets: Path, out: Path, limit: int) -> dict[str, dict[str, float]]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"model={model},base_url={server.url}/v1/completions,num_concurrent=8,tokenized_requests=False,"
               f"tokenizer={model}", "--tasks", ",".join(TASKS), "--limit", str(limit), "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_CACHE": str(datasets), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=6 * 3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(max(out.rglob("results*.json"), key=lambda p: p.stat().st_mtime).read_text())["results"]
    return {task: {"score": results[task][metric], "stderr": results[task][stderr]}
            for task, (metric, stderr) in TASKS.items()}


@pytest.mark.slow
def test_helix_matches_helix_off_within_standard_error(tmp_path: Path) -> None:
    model, datasets = _requirements()
    helix = HelixConfig.parse(os.environ.get("HELIX_ACCURACY_HELIX", "kvp=2,tpa=1"))
    limit = int(os.environ.get("HELIX_ACCURACY_LIMIT", "250"))
    extra = shlex.split(os.environ.get("HELIX_ACCURACY_SERVE_ARGS", ""))
    dtype = os.environ.get("HELIX_ACCURACY_DTYPE", "bfloat16")
    scores = {}
    for name, command in (
        ("off", [*vllm_command(), "serve", str(model), *baseline_serve_args(model, dtype),
                 "--tensor-parallel-size", str(helix.world_size), *extra]),
        ("helix", [*vllm_helix_command(), "serve", str(model), "--dtype", dtype, "--helix", helix.to_cli(), *extra]),
    ):
        with Server(command, tmp_path / f"{name}.log", env=cpu_env(helix.world_size), start_timeout_s=3600) as server:
            scores[name] = _lm_eval(server, model, datasets, tmp_path / name, limit)
    print(json.dumps(scores, indent=2))
    for task in TASKS:
        on, off = scores["helix"][task], scores["off"][task]
        allowed = math.hypot(on["stderr"], off["stderr"])
        assert abs(on["score"] - off["score"]) <= allowed, (task, on, off)
