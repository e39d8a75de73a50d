"""Run vLLM's fused MoE on Helix's TPF x EP grid (``ep > 1``), without a fork.

vLLM 0.32 shards a MoE layer one of two ways (``FusedMoEParallelConfig.make``):
all N TP ranks split every expert's intermediate dimension (``tp_size = N``), or,
with ``--enable-expert-parallel``, every rank holds whole experts
(``tp_size = 1, ep_size = N``). Helix wants both at once: rank ``r`` holds the
experts of EP group ``r // tpf`` and the ``1/tpf`` slice ``r % tpf`` of their
intermediate dimension, so each rank holds ``1/N`` of the routed-expert weights
(``vllm_helix.moe_shards.grid_position``, which the plain-torch reference
``GridShard`` also uses).

Everything else vLLM already does right for that grid, which is why two small
hooks suffice:

* hidden states are replicated over the TP group after attention (``o_proj``
  all-reduces), so no token dispatch is needed; with ``dp = pcp = 1`` and no
  sequence parallelism vLLM uses no all-to-all kernels and its
  ``MoEPrepareAndFinalizeNoDPEP`` passes tokens through;
* the weight loader keeps only local experts (``expert_map``) and only the
  ``tp_rank`` slice of ``tp_size`` (``moe_config.tp_rank``), which the grid config
  sets to the TPF position;
* the MoE runner all-reduces the output over the *whole* TP group (N ranks)
  whenever ``tp_size > 1 or ep_size > 1``: summed over N ranks, the grid's
  partial outputs are the full MoE output, plus the shared experts' TP = N partial
  sums that are added before that one all-reduce;
* routing (router logits, grouped top-k, ``e_score_correction_bias``, scaling)
  is vLLM's own router, unchanged; it returns global expert ids.

The two hooks:

1. :func:`grid_parallel_config` replaces the result of
   ``FusedMoEParallelConfig.make`` (a wrapper installed once per process) when the
   current ``VllmConfig`` asks for Helix with ``ep > 1``; otherwise vLLM's own
   result is returned untouched.
2. vLLM's CPU expert kernel (``cpu_fused_moe``) indexes its weights with the
   router's *global* ids and ignores ``expert_map``, so under EP it reads past
   the local weights (vLLM EP on CPU crashes). ``UnquantizedFusedMoEMethod``'s
   public out-of-tree registration (``CustomOp.register_oot``) points it at a
   subclass that, only under the Helix grid, swaps the CPU experts class for one
   that keeps the (token, slot) pairs routed to local experts, maps them to local
   ids and runs vLLM's kernel on those rows alone (top-1 each), then adds them
   back per token. Non-local experts cost neither weight reads nor FLOPs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch

from vllm_helix.config import HelixConfig
from vllm_helix.moe_shards import grid_position

from patches_free_hooks.compat import HelixStartupError, internal
from patches_free_hooks.engine_helix import engine_helix

logger = logging.getLogger("vllm.helix")  # under vLLM's logger: same handlers and format

_INSTALLED_MARK = "_vllm_helix_moe_grid"
_METHOD_NAME = "UnquantizedFusedMoEMethod"
_logged: set[str] = set()


def helix_grid() -> HelixConfig | None:
    """The current ``VllmConfig``'s Helix layout when it asks for a MoE grid (``ep > 1``), else ``None``.

    vLLM builds MoE layers inside ``set_current_vllm_config``; outside one (vLLM's
    own unit tests build layers bare) there is no Helix request.
    """
    vllm_config = internal("vllm.config:get_current_vllm_config_or_none")()
    if vllm_config is None:
        return None
    helix = engine_helix(vllm_config)
    return helix.config if helix is not None and helix.config.ep > 1 else None


def grid_parallel_config(config: Any, helix: HelixConfig) -> Any:
    """vLLM's TP = N MoE parallel config re-cut into Helix's ``tpf x ep`` grid.

    ``config`` is what vLLM built for this rank (``tp_rank`` = rank in the TP
    group of N, no EP). Rank ``r`` becomes TPF position ``r % tpf`` of EP group
    ``r // tpf``; ``use_ep`` makes vLLM build the ``expert_map`` of that group.
    """
    world = helix.world_size
    if config.use_ep or config.tp_size != world or config.dp_size != 1 or config.pcp_size != 1 \
            or config.sp_size != 1:
        raise HelixStartupError(
            f"the Helix MoE grid tpf={helix.tpf} x ep={helix.ep} needs vLLM's plain TP={world} MoE "
            f"(no --enable-expert-parallel, data/prefill-context/sequence parallelism), but vLLM "
            f"built tp_size={config.tp_size}, use_ep={config.use_ep}, dp={config.dp_size}, "
            f"pcp={config.pcp_size}, sp={config.sp_size}; start through the plugin's engine hook "
            f"and drop those options"
        )
    rank = config.tp_rank
    tpf_rank, ep_rank = grid_position(rank, helix.tpf, helix.ep)
    grid = dataclasses.replace(config, tp_size=helix.tpf, tp_rank=tpf_rank, ep_size=helix.ep, ep_rank=ep_rank,
                               use_ep=True)
    if "parallel" not in _logged:
        _logged.add("parallel")
        logger.info("Helix MoE grid active: tpf=%d x ep=%d, rank %d is TPF rank %d of EP group %d",
                    helix.tpf, helix.ep, rank, grid.tp_rank, grid.ep_rank)
    return grid


def _local_experts_class(base: type) -> type:
    """``base`` (one of vLLM's CPU unquantized experts) that honours ``expert_map``."""

    class LocalExperts(base):  # type: ignore[valid-type, misc]
        """Runs vLLM's CPU kernel on the (token, slot) pairs routed to local experts only."""

        def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: Any,
                  global_num_experts: int, expert_map: torch.Tensor | None, *args: Any, **kwargs: Any) -> None:
            if expert_map is None:
                return super().apply(output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                                     global_num_experts, expert_map, *args, **kwargs)
            local = expert_map[topk_ids.long()]
            tokens, slots = torch.nonzero(local >= 0, as_tuple=True)
            output.zero_()
            if tokens.numel() == 0:
                return None
            rows = output.new_empty(tokens.numel(), output.shape[-1])
            # vLLM's kernel reads routing as contiguous float32 / int32 buffers.
            super().apply(rows, hidden_states[tokens].contiguous(), w1, w2,
                          topk_weights[tokens, slots].unsqueeze(1).to(torch.float32).contiguous(),
                          local[tokens, slots].unsqueeze(1).to(torch.int32).contiguous(), activation,
                          w1.shape[0], None, *args, **kwargs)
            output.index_add_(0, tokens, rows)
            return None

    LocalExperts.__name__ = LocalExperts.__qualname__ = f"HelixLocal{base.__name__}"
    return LocalExperts


_local_classes: dict[type, type] = {}


def _grid_method_class(base: type) -> type:
    """The ``UnquantizedFusedMoEMethod`` replacement: vLLM's, plus the CPU expert-map path."""
    cpu_experts = internal("vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUUnquantizedExperts")

    class HelixUnquantizedFusedMoEMethod(base):  # type: ignore[valid-type, misc]
        """vLLM's unquantized MoE method; under the Helix grid its CPU experts honour ``expert_map``."""

        def __init__(self, moe: Any) -> None:
            super().__init__(moe)
            helix = helix_grid() if moe.moe_parallel_config.use_ep else None
            if helix is None:
                return
            if self.experts_cls is None or not issubclass(self.experts_cls, cpu_experts):
                raise HelixStartupError(
                    f"the Helix MoE grid (ep={helix.ep}) runs on vLLM's CPU unquantized experts, "
                    f"but vLLM picked {getattr(self.experts_cls, '__name__', self.experts_cls)}; "
                    f"use ep=1,tpf={helix.world_size}"
                )
            if self.experts_cls not in _local_classes:
                _local_classes[self.experts_cls] = _local_experts_class(self.experts_cls)
            self.experts_cls = _local_classes[self.experts_cls]

        def create_weights(self, layer: Any, num_experts: int, hidden_size: int,
                           intermediate_size_per_partition: int, params_dtype: torch.dtype,
                           **kwargs: Any) -> None:
            super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                                   params_dtype, **kwargs)
            if "weights" not in _logged and helix_grid() is not None:
                # One line per worker: what this rank holds of one MoE layer (tests read it).
                _logged.add("weights")
                nbytes = sum(p.numel() * p.element_size() for p in (layer.w13_weight, layer.w2_weight))
                logger.info("Helix MoE grid weights: w13 %s, w2 %s, %d bytes of routed experts per layer",
                            list(layer.w13_weight.shape), list(layer.w2_weight.shape), nbytes)

    HelixUnquantizedFusedMoEMethod.__qualname__ = "HelixUnquantizedFusedMoEMethod"
    return HelixUnquantizedFusedMoEMethod


def installed() -> bool:
    """True once :func:`install` succeeded in this process (a Helix ``ep > 1`` needs it)."""
    make = internal("vllm.model_executor.layers.fused_moe.config:FusedMoEParallelConfig.make")
    return bool(getattr(make, _INSTALLED_MARK, False))


def install() -> None:
    """Install both hooks once per process (idempotent); inert unless Helix asks for ``ep > 1``."""
    parallel_cls = internal("vllm.model_executor.layers.fused_moe.config:FusedMoEParallelConfig")
    if installed():
        return
    make = internal("vllm.model_executor.layers.fused_moe.config:FusedMoEParallelConfig.make")
    method = internal(
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:UnquantizedFusedMoEMethod")
    # LocalExperts.apply overrides (and calls) this entry point: loud if vLLM moved it.
    internal("vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUUnquantizedExperts.apply")
    registry = internal("vllm.model_executor.custom_op:op_registry_oot")
    if _METHOD_NAME in registry:
        raise HelixStartupError(
            f"another plugin already replaces vLLM's {_METHOD_NAME} "
            f"({registry[_METHOD_NAME].__module__}); the Helix MoE grid cannot be installed next to it"
        )
    oot = _grid_method_class(method)
    internal("vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:"
             "UnquantizedFusedMoEMethod.register_oot")(oot)
    # register_oot renames the op to the class name; keep vLLM's name so
    # --compilation-config custom_ops directives for it still apply.
    oot.name = method.name

    @functools.wraps(make)
    def grid_make(*args: Any, **kwargs: Any) -> Any:
        config = make(*args, **kwargs)
        helix = helix_grid()
        return config if helix is None else grid_parallel_config(config, helix)

    setattr(grid_make, _INSTALLED_MARK, True)
    parallel_cls.make = staticmethod(grid_make)
