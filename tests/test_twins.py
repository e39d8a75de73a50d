"""Offline twins: deterministic, the promised architecture, loadable by transformers and vLLM."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open

from vllm_helix.commands.cli import main as cli_main
from vllm_helix.twins import TwinError, make_tiny_model

# Head sizes vLLM 0.32's CPU_ATTN backend accepts (CPUAttentionBackend.get_supported_head_sizes);
# copied rather than imported so the fast tests do not pay for importing vLLM.
CPU_ATTN_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ds"), "deepseek_v3")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built through the CLI verb, so the wiring in cli.py is covered too."""
    out = tmp_path_factory.mktemp("llama")
    assert cli_main(["make-tiny-model", str(out), "--arch", "llama"]) == 0
    return out


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _weights(path: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: (list(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}


def _file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_arguments_give_the_same_bytes(deepseek: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", "deepseek_v3")
    assert _file_bytes(again) == _file_bytes(deepseek)


def test_seed_changes_the_weights_but_not_the_tokenizer(llama: Path, tmp_path: Path) -> None:
    other = _file_bytes(make_tiny_model(tmp_path / "seed1", "llama", seed=1))
    reference = _file_bytes(llama)
    assert other["model.safetensors"] != reference["model.safetensors"]
    assert other["tokenizer.json"] == reference["tokenizer.json"]
    assert other["config.json"] == reference["config.json"]


def test_deepseek_twin_has_mla_moe_shared_expert_and_a_dense_first_layer(deepseek: Path) -> None:
    cfg = _config(deepseek)
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    # MLA: the latent sizes vLLM's CPU MLA backend requires (512 + 64 = 576), with q LoRA.
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (512, 64)
    assert cfg["q_lora_rank"] and cfg["q_lora_rank"] < cfg["hidden_size"]
    # MoE routing as in DeepSeek-V3: grouped, sigmoid scores, bias-corrected top-k.
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_shared_experts"]) == (8, 2, 1)
    assert cfg["n_routed_experts"] % cfg["n_group"] == 0
    assert cfg["topk_group"] * cfg["n_routed_experts"] // cfg["n_group"] >= cfg["num_experts_per_tok"]
    assert (cfg["topk_method"], cfg["scoring_func"]) == ("noaux_tc", "sigmoid")
    assert cfg["first_k_dense_replace"] == 1 and cfg["num_nextn_predict_layers"] == 0
    weights = _weights(deepseek)
    assert "model.layers.0.mlp.gate_proj.weight" in weights
    assert not any(k.startswith("model.layers.0.mlp.experts.") for k in weights)
    for e in range(8):
        assert weights[f"model.layers.1.mlp.experts.{e}.down_proj.weight"][0] == [256, 128]
    assert weights["model.layers.1.mlp.shared_experts.gate_proj.weight"][0] == [128, 256]
    assert weights["model.layers.1.mlp.gate.e_score_correction_bias"][0] == [8]
    assert weights["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"][0] == [512 + 64, 256]


def test_llama_twin_is_gqa_with_a_cpu_supported_head_size(llama: Path) -> None:
    cfg = _config(llama)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_attention_heads"] == 8 and cfg["num_key_value_heads"] == 2
    assert cfg["head_dim"] in CPU_ATTN_HEAD_SIZES
    assert _weights(llama)["model.layers.0.self_attn.k_proj.weight"][0] == [2 * cfg["head_dim"], cfg["hidden_size"]]


def test_llama_kv_heads_option_sets_the_gqa_ratio(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "mqa", "llama", kv_heads=1)
    cfg = _config(model)
    assert cfg["num_key_value_heads"] == 1
    assert _weights(model)["model.layers.0.self_attn.k_proj.weight"][0] == [cfg["head_dim"], cfg["hidden_size"]]


def test_bfloat16_twin_keeps_the_router_bias_in_float32(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "bf16", "deepseek_v3", dtype="bfloat16", layers=3)
    weights = _weights(path)
    assert _config(path)["dtype"] == "bfloat16" and _config(path)["num_hidden_layers"] == 3
    assert weights["model.layers.2.mlp.experts.0.up_proj.weight"][1] == torch.bfloat16
    assert weights["model.layers.2.mlp.gate.e_score_correction_bias"][1] == torch.float32


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama"])
def test_transformers_loads_the_twin_and_greedy_output_is_not_degenerate(
    arch: str, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue("deepseek" if arch == "deepseek_v3" else "llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)("the model of attention", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert torch.isfinite(logits).all()
    # A peaked next-token distribution (the output head is scaled for it), not a flat one.
    assert logits[0, -1].softmax(-1).max() > 0.05
    assert len(set(generated[0, ids.shape[1]:].tolist())) >= 8


def test_tokenizer_adds_bos_round_trips_and_has_a_chat_template(llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama)
    text = "Helix shards the KV cache over 4 ranks, ünïcode too!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == _config(llama)["bos_token_id"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token_id == _config(llama)["eos_token_id"]
    assert len(tok) <= _config(llama)["vocab_size"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|bos|><|user|>\nhi<|eos|>\n<|assistant|>\n"
    assert tok.convert_tokens_to_ids("<|assistant|>") in tok(chat, add_special_tokens=False).input_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "x"}, "arch 'x' not supported; choose deepseek_v3 or llama"),
        ({"arch": "llama", "dtype": "float16"}, "dtype 'float16' not supported"),
        ({"arch": "llama", "layers": 0}, "layers must be >= 1"),
        ({"arch": "deepseek_v3", "layers": 1}, "deepseek_v3 needs layers >= 2"),
        ({"arch": "llama", "kv_heads": 3}, "kv_heads=3 must divide the 8 query heads"),
        ({"arch": "deepseek_v3", "kv_heads": 1}, "--kv-heads applies to the llama twin only"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(TwinError, match=re.escape(message)):
        make_tiny_model(tmp_path / "out", **kwargs)
    assert issubclass(TwinError, ValueError)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["make-tiny-model", str(tmp_path), "--arch", "deepseek_v3", "--layers", "1"]) == 2
    assert "deepseek_v3 needs layers >= 2" in capsys.readouterr().out


# --- real vLLM (slow): each twin loads and generates in the session's plain engine ----------------
# (TP=1; TP=2 sharding of the twins is exercised by every Helix engine, whose FFN is TP over its
# workers, and which the equality tests hold to this same plain engine)

# vLLM's CPU rotary kernel mis-indexes the 3-D strided q/k tensors MLA hands it
# (see docs/cpu-determinism.md); PyTorch's rotary is exact, so compare with it on.


def _transformers_logprobs(hf: torch.nn.Module, prompt: list[int], ids: list[int]) -> torch.Tensor:
    """Teacher-forced float32 logprobs of the generated tokens."""
    full = torch.tensor([prompt + ids])
    with torch.no_grad():
        logprobs = hf(full, use_cache=False).logits[0].log_softmax(-1)
    return logprobs[len(prompt) - 1:-1].gather(1, full[0, len(prompt):, None])[:, 0]


@pytest.mark.slow
@pytest.mark.parametrize("twin", ["deepseek", "llama2"])
def test_vllm_loads_the_twin_and_agrees_with_transformers(twin: str, twins: dict[str, Path],
                                                          plain: Callable[..., dict[str, Any]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = twins[twin]
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer("the model of attention")["input_ids"], tokenizer("Hello world")["input_ids"]]
    sequences = plain(twin, prompts, 16)["results"]  # the engine the other equality tests use
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for prompt, seq in zip(prompts, sequences):
        assert len(seq["ids"]) == 16 and len(set(seq["ids"])) > 1
        # Same architecture semantics in both frameworks: vLLM's logprobs of its own greedy
        # tokens match transformers' float32 forward pass of the same sequence.
        expected = _transformers_logprobs(hf, prompt, seq["ids"])
        assert torch.allclose(torch.tensor(seq["logprobs"]), expected, atol=1e-4), (seq, expected)


def test_benchmark_twins_are_built_once_and_reused(tmp_path: Path) -> None:
    from vllm_helix.twins import BENCHMARK_TWINS, benchmark_twin

    assert set(BENCHMARK_TWINS) == {"deepseek_v3", "llama_kv1"}
    path = benchmark_twin("llama_kv1", tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert path == tmp_path / "llama_kv1" and config["num_key_value_heads"] == 1
    stamp = (path / "config.json").stat().st_mtime_ns
    assert benchmark_twin("llama_kv1", tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_a_deeper_benchmark_twin_lives_beside_the_default_one(tmp_path: Path) -> None:
    from vllm_helix.twins import benchmark_twin

    path = benchmark_twin("llama_kv1", tmp_path, layers=4)
    config = json.loads((path / "config.json").read_text())
    assert path == tmp_path / "llama_kv1-4l"
    assert config["num_hidden_layers"] == 4 and config["num_key_value_heads"] == 1
