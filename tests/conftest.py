"""Shared pytest set-up: fresh random seeds that are printed, so a failure can be replayed; second
mount points of a directory (a shared file system seen from two hosts)."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def fresh_seed(request: pytest.FixtureRequest) -> int:
    """A new seed per run (HELIX_TEST_SEED=N replays one), reported on failure."""
    seed = int(os.environ.get("HELIX_TEST_SEED", random.SystemRandom().randrange(2**31)))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed} (replay with HELIX_TEST_SEED={seed})")
    return seed


@pytest.fixture(scope="module")
def module_seed() -> int:
    """Like ``fresh_seed``, for module-scoped fixtures (expensive runs shared by several tests)."""
    seed = int(os.environ.get("HELIX_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"module seed={seed} (replay with HELIX_TEST_SEED={seed})")
    return seed


@pytest.fixture
def bind_mount() -> Iterator[Callable[[Path, Path], None]]:
    """``bind_mount(source, target)``: ``target`` becomes a second mount point of ``source``, the way a
    decode host sees a store another host writes (skips where this user cannot mount: needs root, as
    in CI); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(source: Path, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"a second mount point needs mount rights ({done.stderr.strip()})")
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)
