"""Every twin starts in float32 and bfloat16, with Helix off and on, on whichever CPU runs the suite.

vLLM's CPU platform picks ``AMX_MLA`` for MLA models on CPUs with AMX tiles, and
``AMX_MLA`` refuses float32 weights; a baseline started without the backend that
:func:`vllm_helix.harness.server.baseline_attention_backend` decides failed on AMX machines
while passing on AMD ones. Here each engine must start, generate, and run on the
backend that decision names (Helix: the plugin's ``CPU_MLA`` / ``CPU_ATTN``
subclasses). The float32 pairs are the equality runs of ``test_generation.py``,
which assert the same about their backends; this file adds bfloat16, where the AMX
path is vLLM's fast baseline.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm_helix.harness.server import EXACT_ROPE_KWARGS  # noqa: E402
from vllm_helix.twins import make_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def bf16_twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16_twins")
    return {
        "deepseek": make_tiny_model(root / "deepseek", "deepseek_v3", dtype="bfloat16"),
        "llama1": make_tiny_model(root / "llama1", "llama", kv_heads=1, dtype="bfloat16"),
    }


@pytest.mark.parametrize("helix", [False, True], ids=["helix_off", "helix_on"])
@pytest.mark.parametrize("arch", ["deepseek", "llama1"])
def test_bf16_twins_start_and_generate_on_the_decided_backend(
        bf16_twins: dict[str, Path], generate: Callable[..., dict[str, Any]], arch: str, helix: bool,
        module_seed: int, assert_mla_backend: Callable[..., None]) -> None:
    rng = random.Random(module_seed)
    prompts = [[rng.randrange(5, 2000) for _ in range(n)] for n in (3, 40)]
    model = bf16_twins[arch]
    kwargs: dict[str, Any] = {"dtype": "bfloat16", **(EXACT_ROPE_KWARGS if arch == "deepseek" else {})}
    if helix:
        kwargs["additional_config"] = {"helix": {"kvp": 2, "tpa": 1}}
    run = generate(model, prompts, MAX_TOKENS, **kwargs)
    assert [len(r["ids"]) for r in run["results"]] == [MAX_TOKENS] * len(prompts)
    if arch == "deepseek":
        assert_mla_backend(run, model, "bfloat16", helix)
    if helix:
        assert "KVP rank 1 of 2" in run["log"]
