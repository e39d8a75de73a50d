"""Every command the planner recommends passes `vllm-helix serve`'s layout rules on the platform it was planned
for: every model preset on every hardware profile, at 128K and 1M tokens (issue 27)."""

from __future__ import annotations

import re

import pytest

from vllm_helix.config import HelixConfig, HelixConfigError
from vllm_helix.commands.cli import main
from vllm_helix.planner.hardware_spec import load_hardware, preset_names as hardware_presets
from vllm_helix.planner.strategies import helix_shape
from vllm_helix.planner.model_spec import load_model, preset_names as model_presets
from vllm_helix.serving_rules import Platform, check_kv_cache_dtype, check_layout

HELIX = re.compile(r"--helix (\S+)")
KV_CACHE = re.compile(r"--kv-cache-dtype (\S+)")


@pytest.mark.parametrize("hardware", hardware_presets())
@pytest.mark.parametrize("model", model_presets())
def test_every_recommended_and_ranked_command_is_one_serve_accepts(model: str, hardware: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import json

    platform = load_hardware(hardware).platform
    shape = helix_shape(load_model(model))
    checked = plans = 0
    for context in ("128K", "1M"):
        code = main(["plan", "--model", model, "--hardware", hardware, "--context", context, "--top", "20",
                     "--json"])
        out, err = capsys.readouterr()
        if code != 0:  # e.g. the model does not fit: a one-line refusal, never a command
            assert code == 2 and "error: " in err and err.count("\n") == 1, err
            continue
        plan = json.loads(out)
        plans += 1
        for point in [plan["best"], *plan["ranked"]]:
            found = HELIX.search(point["command"] or "")
            if found:
                check_layout(HelixConfig.parse(found.group(1)), shape, platform)  # raises if serve would refuse
                kv = KV_CACHE.search(point["command"])
                check_kv_cache_dtype(kv and kv.group(1))  # the one KV format rule serve applies
                checked += 1
    if platform.kind == "cuda" and shape.is_mla and plans:
        assert checked > 0  # an MLA model that fits has Helix layouts among the ranked: the check ran


def test_the_rules_refuse_what_serve_refuses() -> None:
    llama = helix_shape(load_model("llama-3.1-405b"))
    cuda, cpu = Platform.parse("cuda:9.0"), Platform.parse("cpu")
    check_layout(HelixConfig(kvp=2, tpa=8), llama, cuda)
    check_layout(HelixConfig(kvp=2, tpa=8, hopb=2), llama, cpu)  # HOP-B runs on the plugin's CPU backends
    for config, platform, rule in ((HelixConfig(kvp=2, tpa=8, hopb=2), cuda, "HOP-B runs in the plugin's CPU"),
                                   (HelixConfig(kvp=4, tpa=4), cpu, "tpa=4 is below the model's 8 KV heads"),
                                   (HelixConfig(kvp=2, tpa=16), cpu, "tpa=16 exceeds the model's 8 KV heads")):
        with pytest.raises(HelixConfigError, match=rule):
            check_layout(config, llama, platform)
    deepseek = helix_shape(load_model("deepseek-r1"))
    with pytest.raises(HelixConfigError, match="ep=2: the MoE TPF x EP grid"):
        check_layout(HelixConfig(kvp=8, tpa=1, tpf=4, ep=2), deepseek, cuda)
