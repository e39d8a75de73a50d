"""Rules serve's start-up and the planner share (vllm_helix/serving_rules.py); the layout rules' tests are
tests/planner/test_servable.py (every preset x profile) and tests/patches_free_hooks/test_engine_config.py."""

from __future__ import annotations

import pytest

from vllm_helix.config import HelixConfigError
from vllm_helix.serving_rules import nodes_for, workers_per_node


def test_nodes_split_the_workers_evenly_as_vllm_places_them() -> None:
    assert workers_per_node(8, 2) == 4 and workers_per_node(64, 16) == 4 and workers_per_node(2, 1) == 2
    for world, nodes in ((2, 3), (6, 4), (8, 0)):
        with pytest.raises(HelixConfigError, match=f"{world} workers cannot be split evenly over {nodes} nodes"):
            workers_per_node(world, nodes)


def test_the_planner_takes_the_fewest_nodes_that_hold_a_layout_evenly() -> None:
    assert nodes_for(8, 0) == 1 and nodes_for(8, 8) == 1 and nodes_for(64, 4) == 16
    assert nodes_for(12, 8) == 2 and nodes_for(10, 4) == 5  # 3 nodes would hold 10 GPUs, but not evenly
    for world in range(1, 80):
        for per_node in (1, 4, 8):
            nodes = nodes_for(world, per_node)
            assert workers_per_node(world, nodes) <= per_node  # what serve accepts, on hosts that hold it
