"""`vllm-helix demo` (the README's main job) end to end, small: exact and 2x the KV capacity."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_helix.commands.cli import main

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")


@pytest.mark.slow
def test_demo_serves_the_twin_with_helix_and_agrees_with_helix_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--model-dir", str(tmp_path / "twin"), "--log-dir", str(tmp_path / "logs"),
                 "--prompts", "3", "--min-len", "20", "--max-len", "120", "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "agreement: 3/3 prompts with identical greedy tokens" in out
    capacity = next(line for line in out.splitlines() if line.startswith("KV cache capacity"))
    assert capacity.rstrip().endswith("2.00x")


def test_demo_refuses_a_bad_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--helix", "kvp=2,tpa=x"]) == 2
    assert "tpa='x' must be a positive integer in plain decimal digits" in capsys.readouterr().out
