"""Shared pytest set-up: fresh random seeds that are printed, so a failure can be replayed."""

from __future__ import annotations

import os
import random

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
