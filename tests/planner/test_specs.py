"""Model and hardware specs: presets, Hugging Face config.json reading, precisions, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.hardware_spec import hardware_from_dict, load_hardware, preset_names as hardware_presets
from vllm_helix.planner.model_spec import load_model, preset_names, spec_from_hf_config
from vllm_helix.planner.precision import Precision, bytes_per_element

# What transformers 5.19 writes for the tiny DeepSeek-V3 twin (vllm_helix/twins.py dimensions):
# note the MLA config also carries num_key_value_heads and a head_dim that must be ignored.
TWIN_DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "dtype": "float32",
    "first_k_dense_replace": 1, "head_dim": 64, "hidden_size": 256, "intermediate_size": 512,
    "kv_lora_rank": 512, "moe_intermediate_size": 128, "n_group": 4, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_attention_heads": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2,
    "num_key_value_heads": 8, "num_nextn_predict_layers": 0, "q_lora_rank": 128, "qk_head_dim": 128,
    "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "tie_word_embeddings": False, "topk_group": 2,
    "v_head_dim": 64, "vocab_size": 2048,
}
TWIN_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
    "head_dim": 64, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "tie_word_embeddings": False, "vocab_size": 2048,
}


def test_every_preset_loads_and_describes_itself() -> None:
    names = preset_names()
    for required in ("deepseek-r1", "deepseek-v3-lite", "llama-3.1-405b", "llama-3.1-70b",
                     "tiny-deepseek-v3", "tiny-llama"):
        assert required in names
    for name in names:
        assert name in load_model(name).describe()


@pytest.mark.parametrize("name, total_b, active_b", [
    ("deepseek-r1", 671.0, 37.0),   # DeepSeek-V3 report: 671B total, 37B activated
    ("deepseek-v3-lite", 15.7, 2.4),  # DeepSeek-V2-Lite: 15.7B total, 2.4B activated
    ("llama-3.1-405b", 405.8, None),
    ("llama-3.1-70b", 70.6, None),
    ("llama-3.1-8b", 8.0, None),
])
def test_parameter_counts_match_published_sizes(name: str, total_b: float, active_b: float | None) -> None:
    model = load_model(name)
    assert model.total_params / 1e9 == pytest.approx(total_b, rel=0.01)
    if active_b is not None:
        assert model.active_params_per_token / 1e9 == pytest.approx(active_b, rel=0.03)


def test_deepseek_r1_shape_is_the_papers() -> None:
    r1 = load_model("deepseek-r1")
    assert (r1.is_mla, r1.num_kv_heads, r1.num_q_heads) == (True, 1, 128)
    assert r1.kv_elements_per_token == 512 + 64
    assert r1.partial_output_elements == 512  # MLA exchanges the latent-space output
    assert (r1.num_experts, r1.experts_per_token, r1.shared_expert_intermediate_size) == (256, 8, 2048)
    assert (r1.num_dense_layers, r1.num_moe_layers) == (3, 58)
    assert r1.dtype == "fp8"  # quantization_config wins over torch_dtype
    llama = load_model("llama-3.1-405b")
    assert (llama.num_q_heads, llama.num_kv_heads, llama.head_dim) == (128, 8, 128)
    assert llama.kv_elements_per_token == 2 * 8 * 128


def test_twin_configs_read_like_their_presets() -> None:
    twin = spec_from_hf_config(TWIN_DEEPSEEK_V3_CONFIG, "twin")
    preset = load_model("tiny-deepseek-v3")
    for field in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "kv_lora_rank", "num_experts",
                  "experts_per_token", "first_dense_layers", "shared_expert_intermediate_size", "dtype"):
        assert getattr(twin, field) == getattr(preset, field), field
    assert twin.head_dim == 64 + 64  # nope + rope, not the config's head_dim
    llama = spec_from_hf_config(TWIN_LLAMA_CONFIG, "twin")
    assert (llama.num_kv_heads, llama.head_dim, llama.dtype) == (2, 64, "fp32")
    assert llama.total_params == load_model("tiny-llama").total_params


@pytest.mark.parametrize("twin, preset", [("llama_kv1", "tiny-llama-kv1"), ("deepseek_v3", "tiny-deepseek-v3")])
def test_benchmark_twins_read_like_their_presets(twin: str, preset: str) -> None:
    """The calibration and its validation price the benchmark twins through these presets."""
    import dataclasses

    from vllm_helix.twins import BENCHMARK_TWINS, twin_config

    config = {**twin_config(**BENCHMARK_TWINS[twin]).to_dict(), "torch_dtype": "float32"}  # what benchmarks build
    generated = spec_from_hf_config(config, "twin")
    expected = load_model(preset)
    for field in dataclasses.fields(expected):
        if field.name not in ("name", "source", "max_position_embeddings"):
            assert getattr(generated, field.name) == getattr(expected, field.name), field.name


def test_config_json_file_and_directory(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TWIN_LLAMA_CONFIG))
    by_dir, by_file = load_model(str(model_dir)), load_model(str(model_dir / "config.json"))
    assert by_dir == by_file
    assert by_dir.source == str(model_dir)  # what `vllm-helix serve` is pointed at


def test_mixtral_and_text_config_layouts() -> None:
    mixtral = spec_from_hf_config({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                                   "num_hidden_layers": 32, "vocab_size": 32000, "intermediate_size": 14336,
                                   "num_local_experts": 8, "num_experts_per_tok": 2}, "mixtral")
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.num_dense_layers) == (8, 14336, 0)
    assert mixtral.total_params / 1e9 == pytest.approx(46.7, rel=0.01)  # Mixtral-8x7B
    wrapped = spec_from_hf_config({"model_type": "llava", "text_config": TWIN_LLAMA_CONFIG}, "wrapped")
    assert wrapped.num_kv_heads == 2


def test_unknown_model_lists_presets() -> None:
    with pytest.raises(PlannerError, match=r"model 'gpt-17' not found.*known presets: deepseek-r1"):
        load_model("gpt-17")


def test_heads_not_divisible_is_refused() -> None:
    config = dict(TWIN_LLAMA_CONFIG, num_attention_heads=10, num_key_value_heads=4)
    with pytest.raises(PlannerError, match="10 query heads are not divisible by 4 KV heads"):
        spec_from_hf_config(config, "bad")


def test_missing_field_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PlannerError, match="no 'num_attention_heads'"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PlannerError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_precisions() -> None:
    assert bytes_per_element("fp4") == 0.5  # nominal, as the paper prices FP4
    assert bytes_per_element("mxfp4") == 4.25 / 8  # 4 bits + one 8-bit scale per 32
    assert bytes_per_element("NVFP4") == 4.5 / 8  # 4 bits + one 8-bit scale per 16
    assert bytes_per_element("bfloat16") == 2.0
    assert Precision.uniform("fp8").kv_bytes == 1.0
    with pytest.raises(PlannerError, match="unknown number format 'int3'"):
        Precision.uniform("int3")


def test_a_hardware_profile_typo_is_refused(tmp_path) -> None:
    profile = tmp_path / "typo.yaml"
    profile.write_text("base: h100-sxm\nmemory:\n  bandwith_gb_s: 3000\n")
    with pytest.raises(PlannerError, match=r"unknown key\(s\) \['memory.bandwith_gb_s'\], which would be ignored"):
        load_hardware(str(profile))
    profile.write_text("base: h100-sxm\nnvlink: fast\n")
    with pytest.raises(PlannerError, match=r"unknown key\(s\) \['nvlink'\]"):
        load_hardware(str(profile))
    for name in hardware_presets():
        load_hardware(name)  # every shipped profile passes


def test_hardware_presets_and_inheritance() -> None:
    for name in ("gb200-nvl72", "b200", "h200", "h100-sxm"):
        assert name in hardware_presets()
    gb200 = load_hardware("gb200-nvl72")
    assert (gb200.memory_bandwidth, gb200.gpus_per_domain, gb200.flops["fp4"]) == (8000e9, 72, 10000e12)
    assert gb200.scale_up.bandwidth == 900e9
    measured = load_hardware("h100-sxm-measured")
    base = load_hardware("h100-sxm")
    assert measured.measured and not base.measured
    assert measured.memory_bandwidth == 3000e9 and measured.memory_capacity == base.memory_capacity
    with pytest.raises(PlannerError, match="no fp4 FLOP rate"):
        base.flop_rate("fp4")
    with pytest.raises(PlannerError, match="no fp4 FLOP rate"):
        base.flop_rate("mxfp4")
    assert gb200.flop_rate("mxfp4") == gb200.flop_rate("nvfp4") == gb200.flop_rate("fp4")
    with pytest.raises(PlannerError, match="hardware 'tpu9' not found; known presets"):
        load_hardware("tpu9")


def test_hardware_profile_errors() -> None:
    good = {"memory": {"capacity_gb": 1, "bandwidth_gb_s": 1}, "compute_tflops": {"bf16": 1},
            "scale_up": {"bandwidth_gb_s": 1, "latency_us": 1, "gpus_per_domain": 2}, "power": {"tdp_w": 1}}
    assert hardware_from_dict(good, "x").scale_out is None
    with pytest.raises(PlannerError, match="lacks the 'power' section"):
        hardware_from_dict({k: v for k, v in good.items() if k != "power"}, "x")
    with pytest.raises(PlannerError, match="bandwidth_gb_s must be a positive number"):
        hardware_from_dict(dict(good, memory={"capacity_gb": 1, "bandwidth_gb_s": 0}), "x")
    with pytest.raises(PlannerError, match="at most 2 GPUs"):
        hardware_from_dict(good, "x").link_between_domains()


def test_model_preset_keys_outside_config_are_refused_not_ignored(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("name: mine\nconfig:\n  hidden_size: 8\nnum_hidden_layers: 4\n")
    with pytest.raises(PlannerError, match=r"unknown key\(s\) \['num_hidden_layers'\].*go under 'config:'"):
        load_model(str(preset))


def test_a_cpu_profile_measured_on_another_machine_kind_is_named_in_one_warning(monkeypatch) -> None:
    from vllm_helix.planner import hardware_spec

    xeon, epyc = load_hardware("cpu-xeon-2core"), load_hardware("cpu-epyc-2core")
    assert xeon.machine == {"cpu": "Intel(R) Xeon(R) Processor", "amx": True, "cores": 2}
    assert hardware_spec.machine_warning(load_hardware("h200")) is None  # GPU profiles record no host
    monkeypatch.setattr(hardware_spec, "cpu_model", lambda: "AMD EPYC 7B13")
    monkeypatch.setattr(hardware_spec, "cpu_flags_have_amx", lambda: False)
    monkeypatch.setattr(hardware_spec, "cpu_vector_isa", lambda: epyc.machine.get("isa"))
    warning = hardware_spec.machine_warning(xeon)
    assert warning.startswith("cpu-xeon-2core was measured on Intel(R) Xeon(R) Processor (AMX), this machine is "
                              "AMD EPYC 7B13 (no AMX)") and "\n" not in warning
    assert hardware_spec.machine_warning(epyc) is None
    monkeypatch.setattr(hardware_spec, "cpu_model", lambda: "Intel(R) Xeon(R) Processor")
    monkeypatch.setattr(hardware_spec, "cpu_flags_have_amx", lambda: True)
    assert hardware_spec.machine_warning(xeon) is None and "AMD EPYC" in hardware_spec.machine_warning(epyc)


def test_the_position_limit_applies_rope_scaling_as_vllm_does() -> None:
    from vllm_helix.planner.model_spec import position_limit

    base = {"model_type": "llama", "max_position_embeddings": 32768}
    assert position_limit(base) == 32768
    assert position_limit({**base, "rope_scaling": {"type": "linear", "factor": 4.0}}) == 131072
    assert position_limit({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2}}) == 65536
    # YaRN, llama3 and longrope configs already state the scaled length: vLLM 0.32 does not multiply again
    for kind in ("yarn", "llama3", "longrope"):
        assert position_limit({**base, "rope_scaling": {"rope_type": kind, "factor": 4.0}}) == 32768
    assert position_limit({**base, "model_type": "gemma3", "rope_scaling": {"type": "linear", "factor": 8}}) == 32768
    assert position_limit({"model_type": "llama"}) == 0
