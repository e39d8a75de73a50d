"""Helix's profiler ranges appear in a trace and cost nothing without one."""

from __future__ import annotations

import torch
from torch.profiler import profile

from vllm_helix.profiling import hop


def test_a_hop_is_a_named_range_under_the_profiler() -> None:
    with profile() as prof:
        with hop("helix/test_hop"):
            torch.ones(4).add_(1)
    assert "helix/test_hop" in {event.name for event in prof.events()}


def test_without_a_profiler_a_hop_is_no_range() -> None:
    with hop("helix/outside") as entered:
        pass
    assert entered is None  # the shared no-op context, not a record_function
