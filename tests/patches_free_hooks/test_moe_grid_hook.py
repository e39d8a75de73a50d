"""The MoE TPF x EP grid inside stock vLLM (``patches_free_hooks/moe_grid_hook.py``).

Layer level: vLLM's MoE parallel config re-cut into the grid, and vLLM's own CPU
expert kernel run through the plugin's expert-map path on every rank's shard of
N = 2 and N = 4 grids, summed as the TP all-reduce sums it, against the same
kernel on the unsharded layer. Engine level (slow): greedy generation of the
DeepSeek-V3 twin with Helix attention and the grid equals single-rank vLLM, and
each worker holds 1/N of the routed-expert weights.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FUSED_MOE_UNQUANTIZED_CONFIG,
    FusedMoEConfig,
    FusedMoEParallelConfig,
    RoutingMethodType,
)
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
    CPUUnquantizedExperts,
    cpu_prepack_moe_weight,
)

from patches_free_hooks import moe_grid_hook
from patches_free_hooks.compat import HelixStartupError
from patches_free_hooks.engine_config import apply_helix
from vllm_helix.config import HelixConfig, HelixConfigError
from vllm_helix.harness.server import EXACT_ROPE_KWARGS
from vllm_helix.moe_shards import GridShard, moe_reference

E, H, I, TOP_K = 8, 256, 128, 2  # the DeepSeek-V3 twin's routed experts
MAX_TOKENS = 32
LOGPROB_TOL = 1e-3


# ------------------------------------------------------------------ parallel config
@pytest.mark.parametrize(("tpf", "ep"), [(1, 2), (2, 2), (1, 4)])
def test_tp_config_is_recut_into_the_grid(tpf: int, ep: int) -> None:
    helix = HelixConfig(kvp=tpf * ep, tpa=1, tpf=tpf, ep=ep)
    for rank in range(tpf * ep):
        tp = dataclasses.replace(FusedMoEParallelConfig.make_no_parallel(), tp_size=tpf * ep, tp_rank=rank)
        grid = moe_grid_hook.grid_parallel_config(tp, helix)
        assert (grid.tp_size, grid.tp_rank, grid.ep_size, grid.ep_rank) == (tpf, rank % tpf, ep, rank // tpf)
        assert grid.use_ep and not grid.use_all2all_kernels  # tokens stay put; one all-reduce over N


def test_a_grid_on_anything_but_plain_tp_is_refused() -> None:
    full_ep = dataclasses.replace(FusedMoEParallelConfig.make_no_parallel(), ep_size=2, use_ep=True)
    with pytest.raises(HelixStartupError, match="needs vLLM's plain TP=2 MoE"):
        moe_grid_hook.grid_parallel_config(full_ep, HelixConfig(kvp=2, tpa=1, tpf=1, ep=2))


def test_the_hooks_are_installed_once_and_are_inert_without_helix() -> None:
    from patches_free_hooks.plugin import register

    register()
    make = FusedMoEParallelConfig.make
    moe_grid_hook.install()
    assert moe_grid_hook.installed() and FusedMoEParallelConfig.make is make
    assert moe_grid_hook.helix_grid() is None  # no current vLLM config: vLLM's own make result


def test_the_out_of_tree_method_keeps_vllms_op_name() -> None:
    """register_oot renames the op to the class name; the plugin restores vLLM's, which
    ``--compilation-config custom_ops`` directives ("-unquantized_fused_moe") match on."""
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    from patches_free_hooks.plugin import register

    register()
    oot = op_registry_oot[moe_grid_hook._METHOD_NAME]
    assert issubclass(oot, UnquantizedFusedMoEMethod) and oot.__module__ == moe_grid_hook.__name__
    assert oot.name == UnquantizedFusedMoEMethod.name == "unquantized_fused_moe"


def test_a_method_another_plugin_replaced_is_not_replaced_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.model_executor.custom_op import op_registry_oot

    class OtherPluginsMethod:
        pass

    unwrapped = FusedMoEParallelConfig.make_no_parallel  # any callable without the install mark
    monkeypatch.setattr(FusedMoEParallelConfig, "make", staticmethod(lambda *a, **k: unwrapped()))
    monkeypatch.setitem(op_registry_oot, moe_grid_hook._METHOD_NAME, OtherPluginsMethod)
    with pytest.raises(HelixStartupError, match=r"another plugin already replaces vLLM's UnquantizedFusedMoEMethod "
                                                 rf"\({re.escape(__name__)}\); the Helix MoE grid cannot be installed"):
        moe_grid_hook.install()
    assert not moe_grid_hook.installed() and op_registry_oot[moe_grid_hook._METHOD_NAME] is OtherPluginsMethod


# ------------------------------------------------------------------ CPU experts with an expert map
def _experts(cls: type, intermediate: int) -> Any:
    config = FusedMoEConfig(
        num_experts=E, experts_per_token=TOP_K, hidden_dim=H, intermediate_size=intermediate,
        num_local_experts=E, num_logical_experts=E, activation=MoEActivation.SILU, device="cpu",
        routing_method=RoutingMethodType.DeepSeekV3, moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.float32,
    )
    return cls(config, FUSED_MOE_UNQUANTIZED_CONFIG)


def _run(experts: Any, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
         ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    out = torch.full_like(x, float("nan"))  # every row must be written
    experts.apply(out, x, cpu_prepack_moe_weight(w13, experts.isa), cpu_prepack_moe_weight(w2, experts.isa),
                  weights, ids, MoEActivation.SILU, E, expert_map, None, None, torch.empty(0), torch.empty(0),
                  None, False)
    return out


@pytest.mark.parametrize(("tpf", "ep"), [(2, 1), (1, 2), (4, 1), (2, 2), (1, 4)])
def test_cpu_kernel_on_the_grid_sums_to_the_unsharded_kernel(tpf: int, ep: int, fresh_seed: int) -> None:
    gen = torch.Generator().manual_seed(fresh_seed)
    tokens = 9
    x = torch.randn(tokens, H, generator=gen)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(E, H, I, generator=gen) / I**0.5
    ids = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(tokens)]).int()
    ids[0] = torch.tensor([0, 1])  # a token whose experts all live in EP group 0
    weights = torch.rand(tokens, TOP_K, generator=gen)
    full = _run(_experts(CPUUnquantizedExperts, I), x, w13, w2, weights, ids, None)
    local_cls = moe_grid_hook._local_experts_class(CPUUnquantizedExperts)
    total = torch.zeros_like(x)
    for rank in range(tpf * ep):
        shard = GridShard(rank, tpf, ep, E, I)
        part = _run(_experts(local_cls, I // tpf), x, *shard.take(w13, w2), weights, ids, shard.expert_map())
        torch.testing.assert_close(part, moe_reference(x, *shard.take(w13, w2), weights, ids, shard.expert_map()),
                                   rtol=1e-5, atol=1e-5)
        total += part
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ start-up checks
def _args(model: Path, helix: object, **kwargs: object) -> EngineArgs:
    return EngineArgs(model=str(model), dtype="float32", additional_config={"helix": helix}, **kwargs)


def test_an_ep_layout_on_a_moe_model_is_accepted(twins: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    moe_grid_hook.install()
    args = _args(twins["deepseek"], {"kvp": 2, "tpa": 1, "tpf": 1, "ep": 2})
    resolved = apply_helix(args)
    assert resolved is not None and (resolved.tpf, resolved.ep) == (1, 2)
    assert (args.tensor_parallel_size, args.enable_expert_parallel) == (2, False)


@pytest.mark.parametrize(
    ("model", "helix", "kwargs", "message"),
    [
        ("deepseek", {"kvp": 2, "tpa": 1, "tpf": 1, "ep": 2}, {"enable_expert_parallel": True},
         r"helix ep=2 places the experts itself.*drop --enable-expert-parallel"),
        ("deepseek", {"kvp": 2, "tpa": 1, "tpf": 1, "ep": 2}, {"quantization": "fp8"},
         r"unquantized experts only.*fp8-quantized; or use ep=1,tpf=2"),
        ("llama1", {"kvp": 2, "tpa": 1, "tpf": 1, "ep": 2}, {}, r"ep=2 needs a mixture-of-experts model"),
        ("deepseek", {"kvp": 2, "tpa": 1, "tpf": 1, "ep": 3}, {}, r"tpf\*ep must equal kvp\*tpa"),
    ],
)
def test_bad_grids_fail_before_anything_starts(twins: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                               model: str, helix: object, kwargs: dict, message: str) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    moe_grid_hook.install()
    with pytest.raises(HelixConfigError, match=message):
        apply_helix(_args(twins[model], helix, **kwargs))


# ------------------------------------------------------------------ engine (slow)
def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 2000) for _ in range(n)] for n in (1, 2, 15, 17, 48, 130, 5)]


@pytest.fixture(scope="module")
def grid_runs(twins: dict[str, Path], generate: Callable[..., dict[str, Any]], plain: Callable[..., dict[str, Any]],
              module_seed: int) -> dict[str, Any]:
    prompts = _prompts(module_seed)
    return {
        "ep2": generate(twins["deepseek"], prompts, MAX_TOKENS,
                        additional_config={"helix": {"kvp": 2, "tpa": 1, "tpf": 1, "ep": 2, "hopb": 2}},
                        **EXACT_ROPE_KWARGS),
        "off_tp1": plain("deepseek", prompts, MAX_TOKENS),
    }


def _assert_same_generation(run: dict[str, Any], off: dict[str, Any]) -> None:
    for i, (h, o) in enumerate(zip(run["results"], off["results"], strict=True)):
        assert len(h["ids"]) == MAX_TOKENS
        assert h["ids"] == o["ids"], f"prompt {i}: greedy tokens differ"
        worst = max(abs(a - b) for a, b in zip(h["logprobs"], o["logprobs"]))
        assert worst <= LOGPROB_TOL, f"prompt {i}: top logprob differs by {worst}"


@pytest.mark.slow
def test_grid_generation_equals_single_rank(grid_runs: dict[str, Any]) -> None:
    # (ep=1, experts TP over all ranks, is vLLM's own MoE: test_generation.py's MLA run checks it
    # stays untouched; the 2 x 2 grid on four ranks is in test_grid_shapes.py)
    _assert_same_generation(grid_runs["ep2"], grid_runs["off_tp1"])


@pytest.mark.slow
def test_ep_grid_is_active_and_each_worker_holds_half_the_routed_experts(grid_runs: dict[str, Any]) -> None:
    log = grid_runs["ep2"]["log"]
    for rank in range(2):
        assert f"rank {rank} is TPF rank 0 of EP group {rank}" in log
    held = [int(n) for n in re.findall(r"Helix MoE grid weights: .*?, (\d+) bytes of routed experts", log)]
    full = 3 * E * I * H * 4  # float32 w13 + w2 of one layer
    assert held == [full // 2, full // 2], log[-3000:]
