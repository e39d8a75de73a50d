"""HelixConfig: three spellings, one object; every constraint has a named error."""

from __future__ import annotations

import pytest

from vllm_helix.config import HelixConfig, HelixConfigError, ModelShape

LLAMA_405B = ModelShape(num_q_heads=128, num_kv_heads=8, block_size=16)
DEEPSEEK_R1 = ModelShape(
    num_q_heads=128, num_kv_heads=1, is_mla=True, num_experts=256,
    moe_intermediate_size=2048, block_size=64,
)


def test_string_yaml_and_dict_give_the_same_object(tmp_path):
    from_string = HelixConfig.parse("kvp=4,tpa=2,tpf=8,ep=1,hopb=2")
    yaml_file = tmp_path / "helix.yaml"
    yaml_file.write_text("helix:\n  kvp: 4\n  tpa: 2\n  tpf: 8\n  ep: 1\n  hopb: 2\n")
    from_yaml = HelixConfig.from_yaml(yaml_file)
    from_dict = HelixConfig.from_dict({"kvp": 4, "tpa": 2, "tpf": 8, "ep": 1, "hopb": 2})
    assert from_string == from_yaml == from_dict
    assert from_string == HelixConfig(kvp=4, tpa=2, tpf=8, ep=1, hopb=2)


def test_top_level_yaml_and_round_trips(tmp_path):
    yaml_file = tmp_path / "flat.yaml"
    yaml_file.write_text("kvp: 2\nstripe: 4\n")
    config = HelixConfig.from_yaml(yaml_file)
    assert config == HelixConfig(kvp=2, stripe=4)
    assert HelixConfig.parse(config.to_cli()) == config
    assert HelixConfig.from_dict(config.to_dict()) == config


def test_defaults_fill_the_ffn_grid():
    config = HelixConfig.parse("kvp=4,tpa=2")
    assert (config.tpf, config.ep, config.hopb, config.stripe) == (8, 1, 1, None)
    assert HelixConfig.parse("kvp=4,ep=2").tpf == 2
    assert config.world_size == 8
    assert config.stripe_for(16) == 16 and HelixConfig(stripe=4).stripe_for(16) == 4


def test_valid_layouts_pass_validation():
    HelixConfig.parse("kvp=8,tpa=8,tpf=64,ep=1").validate(64, LLAMA_405B)
    HelixConfig.parse("kvp=32,tpa=1,tpf=4,ep=8,hopb=4").validate(32, DEEPSEEK_R1)


@pytest.mark.parametrize(
    "text, world, model, expected",
    [
        ("kvp=4,tpa=2", 4, LLAMA_405B, r"kvp\*tpa must equal the number of workers.*8.*4 workers; e\.g\. kvp=2,tpa=2"),
        ("kvp=1,tpa=16", 16, LLAMA_405B, r"tpa=16 exceeds the model's 8 KV heads.*kvp=2,tpa=8"),
        ("kvp=1,tpa=3", 3, ModelShape(num_q_heads=12, num_kv_heads=4), r"tpa=3 does not divide the model's 4 KV heads"),
        ("kvp=1,tpa=2", 2, DEEPSEEK_R1, r"MLA models have one latent KV head, so tpa must be 1.*kvp=2,tpa=1"),
        ("kvp=3", 3, LLAMA_405B, r"128 query heads must split evenly over kvp\*tpa=3"),
        ("kvp=8,ep=8,tpf=1", 8, ModelShape(num_q_heads=8, num_kv_heads=1, is_mla=True, num_experts=12), r"ep=8 does not divide the model's 12 experts"),
        ("kvp=4,ep=1", 4, ModelShape(num_q_heads=8, num_kv_heads=1, is_mla=True, num_experts=8, moe_intermediate_size=6), r"tpf=4 does not divide the expert intermediate size 6"),
        ("kvp=2,ep=2", 2, LLAMA_405B, r"ep=2 needs a mixture-of-experts model.*ep=1,tpf=2"),
        ("kvp=2,stripe=5", 2, LLAMA_405B, r"stripe=5 must divide the KV block size 16"),
    ],
)
def test_each_violation_names_constraint_and_fix(text, world, model, expected):
    with pytest.raises(HelixConfigError, match=expected):
        HelixConfig.parse(text).validate(world, model)


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: HelixConfig.parse("kvp=0"), r"kvp=0 must be a positive integer"),
        (lambda: HelixConfig.parse("kvp=two"), r"kvp='two' must be a positive integer in plain decimal digits"),
        (lambda: HelixConfig.parse("kvp"), r"expected key=value"),
        (lambda: HelixConfig.parse("kvp=2,kvp=4"), r"'kvp' is given twice"),
        (lambda: HelixConfig.parse("kvp=2,dcp=2"), r"unknown helix option\(s\) \['dcp'\]; valid options are kvp"),
        (lambda: HelixConfig.from_dict({"kvp": True}), r"kvp=True must be a positive integer"),
        (lambda: HelixConfig.from_dict([1, 2]), r"must be a mapping"),
        (lambda: HelixConfig(kvp=4, tpa=1, tpf=3, ep=1), r"tpf\*ep must equal kvp\*tpa.*tpf=3 \* ep=1 = 3.*= 4"),
        (lambda: HelixConfig(kvp=4, ep=3), r"ep=3 does not divide kvp\*tpa=4.*\[1, 2, 4\]"),
        (lambda: HelixConfig(hopb=-1), r"hopb=-1 must be a positive integer"),
    ],
)
def test_malformed_options_are_refused(build, expected):
    with pytest.raises(HelixConfigError, match=expected):
        build()


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(HelixConfigError, match="does not exist"):
        HelixConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kvp: [1,\n")
    with pytest.raises(HelixConfigError, match="is not valid YAML"):
        HelixConfig.from_yaml(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("helix:\n  kvp: 2\nhopb: 2\n", r"key\(s\) \['hopb'\] beside 'helix:'.*belong under 'helix:' \(e.g. helix: \{hopb: 2\}\)"),
        ("helix:\n  kvp: 2\nmodel: x\n", r"key\(s\) \['model'\] beside 'helix:'.*valid keys are 'helix'"),
    ],
)
def test_yaml_keys_beside_helix_are_refused_not_ignored(tmp_path, text, expected):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    with pytest.raises(HelixConfigError, match=expected):
        HelixConfig.from_yaml(preset)


def test_suggested_world_sizes_fit_the_machine():
    shape = ModelShape(num_q_heads=12, num_kv_heads=1, is_mla=True, block_size=16)
    with pytest.raises(HelixConfigError, match=r"use a world size in \[2, 3, 4, 6, 12\]"):
        HelixConfig(kvp=8).validate(8, shape)
    with pytest.raises(HelixConfigError, match=r"use a world size in \[2, 3\]"):
        HelixConfig(kvp=8).validate(8, shape, max_world_size=3)


def test_the_layout_is_read_from_vllms_additional_config_in_every_spelling() -> None:
    from vllm_helix.config import from_additional_config

    expected = HelixConfig(kvp=2, tpa=1)
    assert from_additional_config({"helix": {"kvp": 2, "tpa": 1}}) == expected
    assert from_additional_config('{"helix": "kvp=2,tpa=1"}') == expected  # JSON string, CLI spelling inside
    assert from_additional_config({"helix": "kvp=2,tpa=1", "other": 1}) == expected
    for absent in (None, {}, "", {"other": {"kvp": 2}}):
        assert from_additional_config(absent) is None
    with pytest.raises(HelixConfigError):
        from_additional_config({"helix": {"kvp": 0}})


@pytest.mark.parametrize(("text", "expected"), [
    ("kvp=2_0", r"kvp='2_0' must be a positive integer in plain decimal digits"),  # int() reads 20
    ("kvp=\u0662", r"plain decimal digits"),  # Arabic-Indic two: int() reads 2
    ("kvp=02", r"no leading zero"),
    ("kvp=+2", r"no leading zero, sign"),
    ("", r"--helix needs a layout such as kvp=2,tpa=1"),  # once read as the default layout
    ("  ", r"--helix needs a layout"),
    ("kvp=2 tpa=1", r"options are separated by commas"),
    ("kvp=2,,tpa=1", r"expected key=value"),
    ("hopb=1000000", r"hopb=1000000 is above its limit 256"),
    ("kvp=100000", r"kvp=100000 is above its limit"),
])
def test_layout_strings_are_read_strictly(text: str, expected: str) -> None:
    with pytest.raises(HelixConfigError, match=expected):
        HelixConfig.parse(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("kvp: 010\n", r"kvp='010' must be a positive integer"),  # YAML 1.1: octal 8
    ("stripe: 1:04\n", r"stripe='1:04' must be a positive integer"),  # YAML 1.1: sexagesimal 64
    ("kvp: 0x2\n", r"kvp='0x2'"),
    ("kvp: 2\nkvp: 4\n", r"key 'kvp' is given twice \(line 2\)"),  # once: the last one silently won
    ("helix:\n  kvp: 2\n  tpa: 1\n  kvp: 4\n", r"key 'kvp' is given twice"),
])
def test_presets_are_read_without_yaml_1_1_surprises(tmp_path, text: str, expected: str) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    with pytest.raises(HelixConfigError, match=expected):
        HelixConfig.from_yaml(preset)
    preset.write_text("helix:\n  kvp: 2\n  tpa: 1\n  stripe: 16\n")
    assert HelixConfig.from_yaml(preset) == HelixConfig(kvp=2, tpa=1, stripe=16)


@pytest.mark.parametrize("value", ["null", '"abc"', "[1]", "3"])
def test_additional_config_that_is_not_an_object_is_refused(value: str) -> None:
    from vllm_helix.config import from_additional_config

    with pytest.raises(HelixConfigError, match="must be a JSON object"):
        from_additional_config(value)


def test_a_near_miss_of_the_helix_key_is_recognised_for_a_warning() -> None:
    from vllm_helix.config import near_miss_key

    assert near_miss_key({"Helix": {"kvp": 2}}) == "Helix"
    assert near_miss_key({"helx": {"kvp": 2}}) == "helx"
    assert near_miss_key({"other_plugin": 1, "hello": 2}) is None
