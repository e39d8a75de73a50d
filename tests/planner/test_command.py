"""`vllm-helix plan` end to end: tables, JSON, commands, plots and clean errors."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from vllm_helix.commands.cli import main
from vllm_helix.planner.command import parse_tokens
from vllm_helix.planner.errors import PlannerError
from vllm_helix.planner.strategies import Layout

HELIX_COMMAND = re.compile(r"^(VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 )?vllm-helix serve \S+ "
                           r"--helix kvp=\d+,tpa=\d+,tpf=\d+,ep=\d+,hopb=\d+ --max-model-len \d+( --\S+ \S+)*$")


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_tokens() -> None:
    assert parse_tokens("1M") == 1048576 and parse_tokens("128K") == 131072 and parse_tokens("4096") == 4096
    assert parse_tokens("1.5k") == 1536
    for bad in ("1x", "0", "-4", "0.5"):
        with pytest.raises(PlannerError):
            parse_tokens(bad)


def test_serve_commands() -> None:
    helix = Layout("helix", kvp=4, tpa=2, tpf=8, ep=1, hopb=True)
    assert helix.serve_command("m", 2) == "vllm-helix serve m --helix kvp=4,tpa=2,tpf=8,ep=1,hopb=2"
    assert Layout("tp", tpa=8, tpf=8).serve_command("m") == "vllm serve m --tensor-parallel-size 8"
    assert (Layout("tp_pp", tpa=4, pp=2, tpf=1, ep=4).serve_command("m")
            == "vllm serve m --tensor-parallel-size 4 --pipeline-parallel-size 2 --enable-expert-parallel")
    assert (Layout("dp_ep", dpa=8, tpf=1, ep=8).serve_command("m")
            == "vllm serve m --data-parallel-size 8 --enable-expert-parallel")
    assert (Layout("dp_ep", dpa=4, tpa=2, tpf=1, ep=8).serve_command("m")
            == "vllm serve m --data-parallel-size 4 --tensor-parallel-size 2 --enable-expert-parallel")
    assert Layout("kvp", kvp=2, tpa=4, tpf=4).serve_command("m") is None
    with pytest.raises(PlannerError, match="tpf\\*ep=4 must cover 8 GPUs"):
        Layout("helix", kvp=4, tpa=2, tpf=4)


def test_paper_setting_recommends_helix(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, "--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--weight-dtype",
                         "fp4", "--ttl-ms", "15", "--json")
    assert code == 0
    plan = json.loads(out)
    best = plan["best"]
    # GB200 is CUDA: HOP-B runs only in the plugin's CPU backends, so the recommendation is Helix without it
    assert best["family"] in ("Helix", "Helix (no HOP-B)") and best["ttl_ms"] <= 15
    # priced in fp4, which DeepSeek-R1's fp8 checkpoint is not: the command names the checkpoint it needs
    assert HELIX_COMMAND.match(best["command"]) and " serve FP4_CHECKPOINT --helix" in best["command"]
    assert plan["formats"].startswith("weights fp4 (FP4_CHECKPOINT: a checkpoint of the model in fp4")
    assert "hopb=1 " in best["command"] and best["command"].endswith("--max-model-len 1048576")
    # 1M is past DeepSeek-R1's 163,840 positions: vLLM starts it only when told to (the warning says at what risk)
    assert best["command"].startswith("VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 vllm-helix serve ")
    assert plan["points_priced"] > 10_000
    assert abs(sum(best["breakdown_ms"].values()) - best["ttl_ms"]) < 1e-9
    assert {"Helix", "TP", "DP attn + EP"} <= set(plan["best_per_strategy"])


def test_table_output_for_a_users_config_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model_dir = tmp_path / "my-gqa-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256}))
    code, out, _ = _plan(capsys, "--model", str(model_dir), "--hardware", "h100-sxm", "--context", "128K",
                         "--ttl-ms", "20")
    assert code == 0
    assert "Best point per strategy" in out and "Top " in out and "Recommended:" in out
    serve = [line for line in out.splitlines() if line.strip().startswith("serve:")]
    assert serve and str(model_dir) in serve[0]


def test_tiny_twin_presets_plan(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("tiny-llama", "tiny-deepseek-v3"):
        code, out, _ = _plan(capsys, "--model", name, "--hardware", "h100-sxm", "--gpus", "4", "--context", "4K",
                             "--json")
        assert code == 0 and json.loads(out)["best"]["command"]


def test_single_helix_layout(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, "--model", "llama-3.1-405b", "--context", "1M", "--weight-dtype", "fp4",
                         "--helix", "kvp=8,tpa=8", "--json")
    assert code == 0
    best = json.loads(out)["best"]
    assert best["layout"]["kvp"] == 8 and best["layout"]["tpa"] == 8 and best["gpus"] == 64
    # the layout is checked by serve's rules for the hardware's platform: no HOP-B on CUDA, tpa = KV heads
    for layout, rule in (("kvp=8,tpa=8,hopb=4", "hopb=4: HOP-B runs in the plugin's CPU backends"),
                         ("kvp=16,tpa=4", "tpa=4 is below the model's 8 KV heads")):
        code, _, err = _plan(capsys, "--model", "llama-3.1-405b", "--context", "1M", "--weight-dtype", "fp4",
                             "--helix", layout)
        assert code == 2 and rule in err


def test_no_point_vllm_would_refuse_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    """Every ranked point fits in vLLM's --gpu-memory-utilization share; its command says what it assumed."""
    for utilization in ("0.9", "0.95"):
        code, out, _ = _plan(capsys, "--model", "llama-3.1-70b", "--hardware", "h100-sxm", "--context", "128K",
                             "--gpu-memory-utilization", utilization, "--top", "50", "--json")
        assert code == 0
        plan = json.loads(out)
        assert all(p["memory_per_gpu_gb"] <= 80 * float(utilization) for p in plan["ranked"])
        flag = f"--gpu-memory-utilization {utilization}"
        assert (flag in plan["best"]["command"]) == (utilization != "0.9")
    code, out, _ = _plan(capsys, "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--context", "512",
                         "--batch", "2048", "--json")
    assert code == 0 and json.loads(out)["best"]["command"].endswith(" --max-num-seqs 2048")


def test_every_plan_shows_its_headline_against_the_message_latency(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, "--model", "deepseek-r1", "--context", "1M", "--gpus", "64", "--weight-dtype",
                         "fp4", "--ttl-ms", "15", "--json")
    plan = json.loads(out)
    rows = plan["latency_sensitivity"]
    assert code == 0 and [r["latency_us"] for r in rows] == pytest.approx([0.5, 1.0, 5.0])
    at_profile = rows[1]
    assert at_profile["helix"]["layout"] == plan["best"]["layout"]  # the same search as the plan's own
    assert at_profile["ratio"] == pytest.approx(at_profile["helix"]["tokens_per_s_per_gpu"]
                                                / at_profile["baseline"]["tokens_per_s_per_gpu"])
    assert at_profile["baseline"]["strategy"] in ("tp", "tp_pp", "dp_ep")
    assert rows[0]["ratio"] >= rows[2]["ratio"]  # slower messages never help Helix more than faster ones
    code, out, _ = _plan(capsys, "--model", "llama-3.1-405b", "--context", "1M", "--weight-dtype", "fp4",
                         "--helix", "kvp=8,tpa=8", "--json")
    assert code == 0 and json.loads(out)["latency_sensitivity"] == []


def test_default_latency_budget_is_stated_and_falls_back_out_loud(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--context", "32K")
    assert code == 0 and "TTL budget 50 ms" in out and "warning" not in out
    code, out, _ = _plan(capsys, "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--context", "32K",
                         "--ttl-ms", "fastest", "--json")
    assert code == 0 and json.loads(out)["ttl_budget_ms"] is None
    code, out, _ = _plan(capsys, "--model", "tiny-llama", "--hardware", "cpu-epyc-2core", "--context", "32K",
                         "--batch", "64", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["ttl_budget_ms"] is None and plan["best"]["ttl_ms"] > 50
    assert plan["warnings"] == [f"no layout meets the default 50 ms budget; the fastest layout is shown "
                                f"({plan['best']['ttl_ms']:.3g} ms); pass --ttl-ms to set a budget"]


def test_a_context_past_the_models_positions_is_priced_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--context", "256K",
                         "--json")
    assert code == 0
    assert json.loads(out)["warnings"] == [
        "context 262,144 exceeds llama-3.1-8b's max_position_embeddings 131,072: vLLM refuses --max-model-len "
        "262144 unless the model's rope scaling allows it or VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 is set (at the "
        "model's own risk); priced anyway"]
    code, out, _ = _plan(capsys, "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--context", "128K")
    assert code == 0 and "warning" not in out
    code, out, _ = _plan(capsys, "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--context", "256K")
    assert code == 0 and "  warning: context 262,144 exceeds llama-3.1-8b's max_position_embeddings" in out


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "model 'nope' not found"),
    (["--model", "llama-3.1-405b", "--helix", "kvp=4,tpa=16"], "tpa=16 exceeds the model's 8 KV heads"),
    (["--model", "llama-3.1-405b", "--helix", "kvp=3,tpa=1"], "128 query heads must split evenly"),
    (["--model", "llama-3.1-405b", "--hardware", "h100-sxm", "--context", "16M"], "fits on no layout"),
    (["--model", "llama-3.1-405b", "--hardware", "h100-sxm", "--weight-dtype", "fp4"], "no fp4 FLOP rate"),
    (["--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--ttl-ms", "0.01"], "no layout reaches TTL"),
    (["--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--gpus", "0"], "GPU range 1..0 is empty"),
    (["--model", "llama-3.1-8b", "--context", "1 token"], "cannot read token count"),
    (["--model", "llama-3.1-8b", "--isl", "1K"], "needs all of --isl, --osl and --rate, and a latency budget"),
    (["--model", "llama-3.1-8b", "--ttl-ms", "soon"], "--ttl-ms 'soon' must be a number of milliseconds or"),
    (["--model", "llama-3.1-405b", "--helix", "kvp=8,tpa=8", "--gpus", "8"], "needs 64 GPUs but --gpus is 8"),
    (["--model", "llama-3.1-8b", "--batch", "1,x"], "must be comma-separated integers"),
    (["--model", "llama-3.1-8b", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5 must be in"),
])
def test_bad_input_exits_2_with_one_clear_line(capsys: pytest.CaptureFixture[str], args: list[str],
                                               message: str) -> None:
    code, out, err = _plan(capsys, *args)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and err.startswith("vllm-helix plan: error:")


def test_plot_is_written(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "frontier.png"
    code, out, _ = _plan(capsys, "--model", "llama-3.1-70b", "--hardware", "h200", "--context", "128K",
                         "--ttl-ms", "30", "--plot", str(png))
    assert code == 0 and f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = _plan(capsys, "--model", "tiny-llama", "--hardware", "h100-sxm", "--gpus", "2",
                         "--plot", str(tmp_path / "x.png"))
    assert code == 2 and "pip install vllm-helix[plot]" in err


def test_disaggregation_section(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, "--model", "llama-3.1-70b", "--hardware", "h200", "--weight-dtype", "fp8",
                         "--context", "16K", "--ttl-ms", "30", "--isl", "16K", "--osl", "2K", "--rate", "5")
    assert code == 0
    assert "Disaggregated serving of ISL 16384 / OSL 2048 at 5 req/s" in out and "prefill:decode =" in out
    prefill = re.search(r"prefill: TP=(\d+)", out).group(1)
    # no path: both servers use the store's per-user default directory
    connector = '{{"kv_connector":"HelixConnector","kv_role":"{}","kv_connector_extra_config":{{}}}}'
    assert (f"  prefill server: vllm serve meta-llama/Llama-3.1-70B-Instruct --tensor-parallel-size {prefill} "
            f"--kv-transfer-config '{connector.format('kv_producer')}'") in out
    decode = re.search(r"  decode server: (.*) --kv-transfer-config '(.*)'$", out, re.M)
    assert decode.group(1).startswith(("vllm serve ", "vllm-helix serve "))
    assert json.loads(decode.group(2)) == {"kv_connector": "HelixConnector", "kv_role": "kv_consumer",
                                           "kv_connector_extra_config": {}}


def test_the_split_serves_a_helix_decode_pool_with_the_consumer_connector(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, "--model", "deepseek-r1", "--hardware", "h200", "--context", "128K", "--gpus", "16",
                         "--ttl-ms", "50", "--isl", "16K", "--osl", "2K", "--rate", "5", "--strategies", "tp,helix",
                         "--json")
    split = json.loads(out)["disaggregation"]
    assert split["commands"]["decode"].startswith("vllm-helix serve deepseek-ai/DeepSeek-R1 --helix kvp=")
    assert split["commands"]["decode"].endswith('"kv_role":"kv_consumer","kv_connector_extra_config":{}}\'')
    assert '"kv_role":"kv_producer"' in split["commands"]["prefill"]
    router = split["commands"]["router"]
    assert router.startswith("vllm-router --vllm-pd-disaggregation --prefill http://PREFILL_1:8000")
    prefill_servers = math.ceil(split["prefill_gpus"] / split["prefill_tp"] - 1e-9)
    decode_servers = math.ceil(split["decode_gpus"] / split["decode"]["gpus"] - 1e-9)
    assert (router.count("--prefill "), router.count("--decode ")) == (prefill_servers, decode_servers)


def test_a_calibrated_profile_warns_when_it_prices_a_layout_it_did_not_measure(capsys: pytest.CaptureFixture[str]) -> None:
    common = ("--model", "tiny-llama-kv1", "--hardware", "cpu-xeon-2core", "--context", "256K", "--batch", "1",
              "--json")
    code, out, _ = _plan(capsys, *common, "--gpus", "1")
    plan = json.loads(out)
    assert code == 0 and plan["best"]["gpus"] == 1  # one worker, priced with two workers' constants
    assert any("an extrapolation its validation does not cover" in w for w in plan["warnings"])
    code, out, _ = _plan(capsys, *common, "--helix", "kvp=2,tpa=1")
    assert code == 0 and not any("extrapolation" in w for w in json.loads(out)["warnings"])


def test_gpus_a_layout_leaves_idle_count_against_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Llama-70B on 8 H200 at 1.5K: TP=2 x PP=3 (6 GPUs, 2 idle) has the highest tokens/s per busy GPU,
    but two 4-GPU replicas of TP=2 x PP=2 serve more per GPU of the budget."""
    code, out, _ = _plan(capsys, "--model", "llama-3.1-70b", "--hardware", "h200", "--context", "1.5K",
                         "--top", "50", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["best"]["gpus"] == 4 and plan["best"]["replicas"] == 2
    six = next(p for p in plan["ranked"] if p["gpus"] == 6)
    assert six["tokens_per_s_per_gpu"] > plan["best"]["tokens_per_s_per_gpu"]  # per busy GPU it was ahead
    assert six["tokens_per_s_per_gpu"] * 6 / 8 < plan["best"]["tokens_per_s_per_gpu"]
