"""The baseline's attention backend: one decision, right for the dtype and the CPU (no vLLM needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vllm_helix.harness import machine
from vllm_helix.harness.server import baseline_attention_backend, baseline_engine_kwargs, baseline_serve_args, engine_flags


def _model(tmp_path: Path, name: str, config: dict) -> Path:
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    return tmp_path / name


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {
        "mla": _model(tmp_path, "mla", {"model_type": "deepseek_v3", "kv_lora_rank": 512}),
        "gqa": _model(tmp_path, "gqa", {"model_type": "llama", "num_key_value_heads": 1}),
        "wrapped_mla": _model(tmp_path, "wrapped", {"text_config": {"kv_lora_rank": 512}}),
        "mla_off": _model(tmp_path, "mla_off", {"model_type": "deepseek_v2", "kv_lora_rank": None}),
    }


@pytest.fixture(params=[True, False], ids=["amx", "no_amx"])
def amx(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both kinds of CPU, whichever this machine is (as vLLM's platform asks: torch's AMX probe)."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: request.param)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return request.param


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mla_baseline_runs_cpu_mla_in_float32_and_amx_mla_in_half_precision_on_amx(
        models: dict[str, Path], amx: bool, dtype: str) -> None:
    # AMX_MLA refuses float32 weights; vLLM picks it for every MLA model on AMX unless told otherwise.
    expected = "AMX_MLA" if amx and dtype != "float32" else "CPU_MLA"
    assert machine.cpu_has_amx() is amx
    for name in ("mla", "wrapped_mla"):
        assert baseline_attention_backend(models[name], dtype) == expected
        assert baseline_engine_kwargs(models[name], dtype) == {"dtype": dtype, "attention_backend": expected}
        assert baseline_serve_args(models[name], dtype) == ["--dtype", dtype, "--attention-backend", expected]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gqa_and_non_mla_baselines_keep_vllms_choice(models: dict[str, Path], amx: bool, dtype: str) -> None:
    for name in ("gqa", "mla_off"):
        assert baseline_attention_backend(models[name], dtype) is None
        assert baseline_serve_args(models[name], dtype) == ["--dtype", dtype]


def test_on_cuda_the_baseline_is_vllms_choice(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert baseline_attention_backend(models["mla"], "bfloat16") is None


def test_the_dtype_must_be_named(models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="name the engine's dtype explicitly"):
        baseline_attention_backend(models["mla"], "auto")


def test_engine_flags_spell_engine_keywords_as_cli_flags() -> None:
    assert engine_flags({"dtype": "bfloat16", "attention_backend": "AMX_MLA"}) == [
        "--dtype", "bfloat16", "--attention-backend", "AMX_MLA"]


def test_machine_records_amx(amx: bool) -> None:
    described = machine.describe_machine()
    assert described["amx"] is amx
    isa = described["isa"]
    assert isa in ("AVX-512 BF16", "AVX-512", "AVX2", "no AVX2", None)
    assert (f"({'AMX' if amx else 'no AMX'}{', ' + isa if isa else ''})") in machine.machine_line(described)
    assert "(AMX not recorded), 2 cores" in machine.machine_line({"cpu": "x", "cores": 2})  # records before the ISA
    commit = machine.source_commit()  # this checkout's: results pages name the code that produced them
    assert commit is None or re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", commit)
    assert described["commit"] == commit
    assert machine.machine_sentence(described, "2026-01-01").endswith(f"Date 2026-01-01, commit {commit}.")



def test_vllm_logs_give_capacity_and_the_real_failure() -> None:
    from vllm_helix.harness.server import kv_cache_tokens, vllm_failure

    assert kv_cache_tokens("INFO CPU KV cache size: 1,042,479 tokens, Maximum concurrency") == 1042479
    assert kv_cache_tokens("no report") is None
    log = ("(EngineCore) WARNING ValueError: ignored\n(EngineCore) RuntimeError: Engine core initialization failed\n"
           "ValueError: To serve at least one request ...\nlast line")
    assert vllm_failure(log) == "To serve at least one request ..."
    assert vllm_failure("Worker proc VllmWorker-0 died unexpectedly\nRuntimeError: cancelled").startswith(
        "a worker process died")
    assert vllm_failure("only this\nlast") == "last" and vllm_failure("") == "no output"
