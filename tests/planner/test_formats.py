"""The formats a plan priced are the formats its command loads (vllm_helix/planner/formats.py, issue 27 item 4)."""

from __future__ import annotations

import json

import pytest

from vllm_helix.commands.cli import main
from vllm_helix.config import HelixConfigError
from vllm_helix.planner.formats import (checkpoint_placeholder, formats_text, kv_cache_flags, kv_cache_refusal,
                                        weight_flags)
from vllm_helix.planner.model_spec import load_model
from vllm_helix.planner.precision import Precision
from vllm_helix.serving_rules import Platform, check_kv_cache_dtype

CUDA, CPU = Platform.parse("cuda:9.0"), Platform.parse("cpu")


def test_the_kv_cache_is_priced_in_the_models_dtype_not_the_weights() -> None:
    r1 = load_model("deepseek-r1")  # fp8 weights, torch_dtype bfloat16: vLLM's auto KV cache is bf16
    assert (r1.dtype, r1.kv_cache_dtype) == ("fp8", "bf16")
    served = Precision("fp8", "bf16", "fp8")
    assert checkpoint_placeholder(r1, served, CUDA) is None and weight_flags(r1, served, CUDA) == ()
    assert kv_cache_flags(r1, served) == () and kv_cache_refusal(r1, served) is None
    assert "weights fp8 (the checkpoint's); KV cache bf16 (vLLM's auto" in formats_text(r1, served, CUDA)


@pytest.mark.parametrize("weights, platform, placeholder, flags", [
    ("bf16", CUDA, None, ()),
    ("fp8", CUDA, None, ("--quantization fp8",)),  # vLLM quantizes a 16-bit checkpoint at load on CUDA
    ("fp8", CPU, "FP8_CHECKPOINT", ()),
    ("fp4", CUDA, "FP4_CHECKPOINT", ()),  # no quantization to fp4 at load: a checkpoint in fp4 is needed
    ("nvfp4", CUDA, "NVFP4_CHECKPOINT", ()),
])
def test_weights_come_from_the_checkpoint_or_a_flag(weights: str, platform: Platform, placeholder: str | None,
                                                    flags: tuple[str, ...]) -> None:
    llama = load_model("llama-3.1-70b")
    precision = Precision(weights, "bf16", weights)
    assert checkpoint_placeholder(llama, precision, platform) == placeholder
    assert weight_flags(llama, precision, platform) == flags
    if placeholder:
        assert f"({placeholder}: a checkpoint of the model in {weights};" in formats_text(llama, precision, platform)


def test_baselines_quantize_the_kv_cache_helix_does_not() -> None:
    llama = load_model("llama-3.1-70b")
    fp8_kv, fp4_kv = Precision("bf16", "fp8", "bf16"), Precision("bf16", "fp4", "bf16")
    assert kv_cache_flags(llama, fp8_kv) == ("--kv-cache-dtype fp8",) and kv_cache_refusal(llama, fp8_kv) is None
    assert "vLLM 0.32 has no fp4 KV cache" in (kv_cache_refusal(llama, fp4_kv) or "")
    check_kv_cache_dtype(None)
    check_kv_cache_dtype("auto")
    check_kv_cache_dtype("bf16", "bf16")  # the model's own dtype, named
    for requested, own in (("fp8", "bf16"), ("fp8", None), ("bfloat16", None)):
        with pytest.raises(HelixConfigError, match=f"--kv-cache-dtype {requested} is not supported with Helix"):
            check_kv_cache_dtype(requested, own)


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = main(["plan", *args, "--json", "--top", "30"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_a_quantized_kv_plan_recommends_baselines_that_carry_it(capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(capsys, "--model", "deepseek-r1", "--hardware", "h200", "--gpus", "16", "--context", "128K",
                 "--kv-dtype", "fp8")
    assert any("Helix serves only the model's bf16" in w for w in plan["warnings"])
    for point in [plan["best"], *plan["ranked"]]:
        assert point["strategy"] != "helix" and "--kv-cache-dtype fp8" in point["command"]
    code = main(["plan", "--model", "deepseek-r1", "--hardware", "h200", "--context", "128K", "--kv-dtype", "fp8",
                 "--helix", "kvp=8,tpa=1"])
    _, err = capsys.readouterr()
    assert code == 2 and "--kv-cache-dtype fp8 is not supported with Helix" in err and err.count("\n") == 1


def test_default_plans_price_and_print_what_serve_loads(capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(capsys, "--model", "deepseek-r1", "--hardware", "h200", "--gpus", "16", "--context", "128K")
    assert plan["precision"]["kv"] == "bf16" and plan["formats"].startswith("weights fp8 (the checkpoint's)")
    assert "deepseek-ai/DeepSeek-R1 " in plan["best"]["command"] and "--kv-cache-dtype" not in plan["best"]["command"]
