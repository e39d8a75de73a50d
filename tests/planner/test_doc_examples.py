"""The example plans in docs/planner.md are what `vllm-helix plan` prints today.

A block in the document sits between two markers that name the command's arguments::

    <!-- plan-example: --model deepseek-r1 --context 1M ... -->
    ```text
    (the output of `vllm-helix plan` with those arguments)
    ```
    <!-- /plan-example -->

The test fails when a block differs from the planner's current output (the pricing
time, which varies run to run, is written ``t``). After a deliberate change,
``HELIX_REGENERATE_DOCS=1 .venv/bin/python -m pytest tests/planner/test_doc_examples.py``
rewrites the blocks; review the diff.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

from vllm_helix.planner.command import add_arguments, make_plan, plan_text

DOC = Path(__file__).resolve().parents[2] / "docs" / "planner.md"
BLOCK = re.compile(r"(<!-- plan-example: (?P<args>.*?) -->\n```text\n)(?P<output>.*?)(```\n<!-- /plan-example -->)",
                   re.DOTALL)
SECONDS = re.compile(r"points in \d+\.\d+ s( \(\d+\.\d+ s with the latency re-pricing below\))?")


def plan_output(arguments: str) -> str:
    """What ``vllm-helix plan <arguments>`` prints, with the pricing time written as ``t``."""
    parser = argparse.ArgumentParser(prog="vllm-helix plan")
    add_arguments(parser)
    args = parser.parse_args(shlex.split(arguments))
    text = "\n".join(plan_text(make_plan(args), args)) + "\n"
    return SECONDS.sub(lambda m: "points in t s" + (" (t s with the latency re-pricing below)" if m.group(1) else ""),
                       text)


def regenerate(document: str) -> str:
    """``document`` with every example block's output replaced by the planner's current output."""
    return BLOCK.sub(lambda m: m.group(1) + plan_output(m.group("args")) + m.group(4), document)


def test_the_documented_plans_are_the_tools_output() -> None:
    document = DOC.read_text()
    assert len(BLOCK.findall(document)) >= 2, "docs/planner.md lost its plan examples"
    fresh = regenerate(document)
    if os.environ.get("HELIX_REGENERATE_DOCS") == "1":
        DOC.write_text(fresh)
        document = fresh
    assert fresh == document, ("docs/planner.md's example plans differ from `vllm-helix plan`'s output; "
                               "regenerate them (see this module's docstring) and review the diff")


def test_regenerate_replaces_only_the_marked_output() -> None:
    stale = ("intro\n<!-- plan-example: --model tiny-llama --hardware h100-sxm --gpus 2 --context 4K -->\n```text\n"
             "old output\n```\n<!-- /plan-example -->\noutro\n")
    fresh = regenerate(stale)
    assert fresh.startswith("intro\n<!-- plan-example:") and fresh.endswith("<!-- /plan-example -->\noutro\n")
    assert "old output" not in fresh and "Recommended:" in fresh and "points in t s" in fresh
