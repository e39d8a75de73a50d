"""`vllm-helix serve` argument translation (no vLLM needed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vllm_helix.commands.cli import main as cli_main
from vllm_helix.config import HelixConfigError
from vllm_helix.commands.serve import vllm_serve_argv

REPO = Path(__file__).resolve().parents[2]


def _additional(argv: list[str]) -> dict:
    return json.loads(argv[argv.index("--additional-config") + 1])


def test_helix_string_becomes_additional_config_and_other_args_pass_through() -> None:
    argv = vllm_serve_argv("MODEL", ["--port", "8001", "--helix", "kvp=2,tpa=1,hopb=2", "--max-model-len", "4096"])
    assert argv[:2] == ["serve", "MODEL"]
    assert argv[2:6] == ["--port", "8001", "--max-model-len", "4096"]
    assert _additional(argv) == {"helix": {"kvp": 2, "tpa": 1, "tpf": 2, "ep": 1, "hopb": 2}}


def test_equals_spelling_and_merge_with_users_additional_config() -> None:
    argv = vllm_serve_argv("M", ["--helix=kvp=4,tpa=1", "--additional-config", '{"other": 1}'])
    assert _additional(argv) == {"other": 1, "helix": {"kvp": 4, "tpa": 1, "tpf": 4, "ep": 1, "hopb": 1}}


def test_helix_off_is_plain_vllm_serve_with_the_users_own_additional_config() -> None:
    assert vllm_serve_argv("M", ["--helix", "off", "--port", "8100"]) == ["serve", "M", "--port", "8100"]
    argv = vllm_serve_argv("M", ["--helix=off", "--additional-config", '{"other": 1}'])
    assert argv == ["serve", "M", "--additional-config", '{"other": 1}']


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads_names_its_platform_and_passes_serves_rules_there(preset: Path) -> None:
    from vllm_helix.config import load_preset
    from vllm_helix.planner.strategies import helix_shape
    from vllm_helix.planner.model_spec import load_model
    from vllm_helix.serving_rules import Platform, check_layout

    argv = vllm_serve_argv("M", ["--helix-config", str(preset)])
    assert _additional(argv)["helix"]["kvp"] >= 1
    helix, platform = load_preset(preset)
    assert platform is not None, f"{preset.name} does not say where it runs (platform: cpu:2, cuda:9.0, ...)"
    # the model a preset is for: the planner preset of the same name (tiny-llama.yaml is for the twin made
    # with --kv-heads 1, as its comment says); the rules are serve's own
    shape = helix_shape(load_model(preset.stem))
    if preset.stem == "tiny-llama":
        shape = dataclasses.replace(shape, num_kv_heads=1)
    check_layout(helix, shape, Platform.parse(platform))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], r"needs a layout: --helix kvp=2,tpa=1 or --helix-config .* \(or --helix off for plain vLLM\)"),
        (["--helix", "kvp=2", "--helix-config", "x.yaml"], "--helix or --helix-config, not both"),
        (["--helix"], "--helix needs a value"),
        (["--helix", "kvp=2", "--helix", "kvp=4"], "--helix is given twice"),
        (["--helix", "kvp=2", "--additional-config", "{bad"], "--additional-config is not valid JSON"),
        (["--helix", "kvp=2", "--additional-config", '{"helix": {}}'], "remove 'helix' from --additional-config"),
        (["--helix-config", "missing.yaml"], "'missing.yaml' does not exist"),
        (["--helix", "off", "--helix-config", "x.yaml"], "--helix off serves without a layout"),
        (["--helix", "off", "--additional-config", "{bad"], "--additional-config is not valid JSON"),
        (["--helix", "off", "--additional-config", '{"helix": {}}'],
         "--helix off serves without a layout; remove 'helix' from --additional-config"),
        (["--helix", "kvp=2", "--additional-config", "null"], "--additional-config must be a JSON object"),
        (["--helix", "kvp=2", "--additional-config", '"abc"'], "--additional-config must be a JSON object"),
        (["--helix", "kvp=2", "--additional-config", "[1]"], "--additional-config must be a JSON object"),
        # vLLM's parser takes the underscore spelling too: it must not slip past the layout check
        (["--helix", "kvp=2", "--additional_config", '{"helix": {}}'], "remove 'helix' from --additional-config"),
        (["--helix", "kvp=2_0"], "plain decimal digits"),
        (["--helix", ""], "--helix needs a layout"),
    ],
)
def test_bad_serve_arguments_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(HelixConfigError, match=message):
        vllm_serve_argv("M", argv)


def test_cli_exits_2_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["serve", "M", "--helix", "kvp=0"]) == 2
    assert "kvp=0 must be a positive integer" in capsys.readouterr().err


def test_version_and_serve_help_answer_like_vllms_own_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("vllm-helix ")
    for argv in (["serve", "MODEL", "--help"], ["serve", "MODEL", "--helix", "kvp=2", "-h"]):
        assert cli_main(argv) == 0
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
        assert "--helix" in out and "--check" in out and "python -m patches_free_hooks.vllm_cli serve --help" in out


def test_a_missing_model_path_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["serve", str(tmp_path / "nowhere"), "--helix", "kvp=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
