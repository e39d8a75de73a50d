"""`vllm-helix attention-demo` end to end (small sizes): exact, and bad layouts refused with a message."""

from __future__ import annotations

import pytest

from vllm_helix.commands.cli import main


@pytest.mark.slow
def test_demo_reports_exact_results(capsys):
    code = main(["attention-demo", "--helix", "kvp=2,hopb=2", "--context", "300", "--batch", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "helix kvp=2,tpa=1" in out and "HOP-B hopb=2" in out
    assert "exact: yes" in out


def test_demo_refuses_a_bad_layout_with_the_constraint(capsys):
    assert main(["attention-demo", "--helix", "kvp=1,tpa=2", "--attention", "mla"]) == 2
    assert "MLA models have one latent KV head, so tpa must be 1" in capsys.readouterr().out
