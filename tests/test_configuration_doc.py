"""docs/configuration.md names every option the code reads (layout, connector, profile keys, env vars)."""

from __future__ import annotations

import re
from pathlib import Path

from vllm_helix.config import _INT_FIELDS
from vllm_helix.kv_store import StoreConfig
from vllm_helix.planner.hardware_spec import PROFILE_KEYS, _TOP_LEVEL_KEYS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "configuration.md").read_text()


def test_every_option_and_key_is_documented() -> None:
    names = [*_INT_FIELDS, *StoreConfig.OPTIONS, *_TOP_LEVEL_KEYS, "base",
             *(key for keys in PROFILE_KEYS.values() for key in keys)]
    missing = [name for name in names if f"`{name}`" not in DOC]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    read = set()
    for path in [*ROOT.glob("vllm_helix/**/*.py"), *ROOT.glob("patches_free_hooks/**/*.py"), *ROOT.glob("tests/**/*.py")]:
        read |= set(re.findall(r"environ(?:\.get)?\(\s*\"([A-Z][A-Z0-9_]+)\"", path.read_text()))
        read |= set(re.findall(r"environ\[\"([A-Z][A-Z0-9_]+)\"\]", path.read_text()))
    read -= {"VLLM_DIST_IDENT"}  # vLLM's own worker identity, only probed
    missing = sorted(name for name in read if f"`{name}`" not in DOC)
    assert not missing, f"docs/configuration.md lacks {missing}"
