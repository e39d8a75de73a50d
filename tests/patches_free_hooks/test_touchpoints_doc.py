"""docs/vllm-touchpoints.md names the tests that guard each touch-point; every one must exist.

A catalogue entry whose test was renamed or deleted would still read as guarded.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `file.py::test_name` or, continuing the previous file, `::test_name`
REFERENCE = re.compile(r"`(?:[\w/]*?(test_\w+\.py))?::(test_\w+)")


def _references(text: str) -> list[tuple[str, str]]:
    found, current = [], None
    for match in REFERENCE.finditer(text):
        current = match.group(1) or current
        assert current is not None, f"::{match.group(2)} follows no test file"
        found.append((current, match.group(2)))
    return found


def test_every_test_the_catalogue_names_exists() -> None:
    references = _references((ROOT / "docs" / "vllm-touchpoints.md").read_text())
    assert len(references) > 30
    files: dict[str, list[Path]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):  # a basename may exist in two folders
        files.setdefault(path.name, []).append(path)
    missing = [f"{name}::{test}" for name, test in references
               if not any(re.search(rf"^(async )?def {test}\b", path.read_text(), re.M)
                          for path in files.get(name, []))]
    assert not missing, missing


def test_a_bare_reference_continues_the_previous_file() -> None:
    assert _references("`a/test_x.py::test_one`, `::test_two`, `test_y.py::test_three`") == [
        ("test_x.py", "test_one"), ("test_x.py", "test_two"), ("test_y.py", "test_three")]
