"""Turn ``additional_config["helix"]`` into vLLM's own parallel settings, at start-up.

Helix reuses vLLM's decode-context-parallel (DCP) plumbing: a Helix layout
``kvp x tpa`` on N = kvp*tpa ranks is vLLM with ``tensor_parallel_size = N``,
``decode_context_parallel_size = kvp`` and ``cp_kv_cache_interleave_size =
stripe``. vLLM then builds the KVP groups, the striped slot mapping, the shared
block table and the scheduler's KV capacity (kvp times the context at the same
memory); the plugin's attention backends supply what vLLM's CPU backends lack
(the LSE, the Helix exchange, HOP-B).

vLLM reads those settings when ``EngineArgs.create_engine_config`` builds the
``VllmConfig``, and it offers no hook there, so :func:`install` wraps that one
method (the only monkey-patch of the plugin). The wrapper is inert without a
``helix`` entry. With one, every constraint is checked against the model
*before* vLLM builds anything, so a bad layout fails with one message naming
the constraint and a working alternative, never a traceback from a worker.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

from vllm_helix.config import HelixConfig, HelixConfigError, ModelShape

from patches_free_hooks.compat import HelixStartupError, check_supported_version, internal

logger = logging.getLogger("vllm.helix")  # under vLLM's logger: same handlers and format

HELIX_KEY = "helix"
_INSTALLED_MARK = "_vllm_helix_wrapped"

# vLLM's CPU backends: MLA decodes with block_size 16 (forced by the CPU platform),
# everything else defaults to 128-token blocks.
_CPU_MLA_BLOCK_SIZE = 16
_CPU_DEFAULT_BLOCK_SIZE = 128


def helix_from_additional_config(additional_config: Any) -> HelixConfig | None:
    """The Helix layout asked for in ``additional_config`` (dict or JSON string), if any."""
    if not additional_config:
        return None
    if isinstance(additional_config, str):
        additional_config = json.loads(additional_config)
    if not isinstance(additional_config, dict) or HELIX_KEY not in additional_config:
        return None
    options = additional_config[HELIX_KEY]
    if isinstance(options, str):
        return HelixConfig.parse(options)
    return HelixConfig.from_dict(options)


def model_shape(model_config: Any, block_size: int) -> ModelShape:
    """The facts about the model that constrain a layout, from vLLM's ModelConfig."""
    hf = model_config.hf_text_config
    is_mla = bool(model_config.use_mla)
    experts = int(getattr(hf, "n_routed_experts", None) or getattr(hf, "num_experts", None)
                  or getattr(hf, "num_local_experts", None) or 0)
    return ModelShape(
        num_q_heads=int(hf.num_attention_heads),
        num_kv_heads=1 if is_mla else model_config.get_total_num_kv_heads(),
        is_mla=is_mla,
        num_experts=experts,
        moe_intermediate_size=int(getattr(hf, "moe_intermediate_size", 0) or 0),
        block_size=block_size,
    )


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _is_cuda_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def _expected_block_size(args: Any, is_mla: bool) -> int:
    if _is_cpu_platform():
        return _CPU_MLA_BLOCK_SIZE if is_mla else (args.block_size or _CPU_DEFAULT_BLOCK_SIZE)
    if args.block_size is None:  # CUDA backends pick it late (FlashInfer 16, FlashMLA 64, ...)
        raise HelixStartupError(
            "Helix on this platform needs an explicit KV block size to place its stripes; "
            "pass --block-size (e.g. --block-size 16)"
        )
    return args.block_size


def check_vllm_settings(helix: HelixConfig, shape: ModelShape, args: Any) -> None:
    """Constraints that come from running Helix through vLLM's DCP plumbing.

    ``helix.validate`` has already checked the layout against the model; these
    are the extra rules of this implementation, each with its way out.
    """
    world = helix.world_size
    if args.tensor_parallel_size not in (1, world):
        raise HelixStartupError(
            f"kvp*tpa must equal the number of workers: kvp={helix.kvp} * tpa={helix.tpa} = "
            f"{world} but --tensor-parallel-size is {args.tensor_parallel_size}; drop "
            f"--tensor-parallel-size (Helix sets it to {world}) or use "
            f"kvp={max(1, args.tensor_parallel_size // helix.tpa)},tpa={helix.tpa}"
        )
    if args.decode_context_parallel_size not in (1, helix.kvp):
        raise HelixStartupError(
            f"--decode-context-parallel-size={args.decode_context_parallel_size} conflicts with "
            f"helix kvp={helix.kvp}; drop --decode-context-parallel-size (Helix sets it)"
        )
    if args.pipeline_parallel_size != 1 or args.data_parallel_size != 1:
        raise HelixStartupError(
            "Helix runs one kvp x tpa instance: --pipeline-parallel-size and "
            "--data-parallel-size must be 1 (run several servers behind a router for more)"
        )
    if not shape.is_mla and helix.kvp > 1 and helix.tpa != shape.num_kv_heads:
        raise HelixStartupError(
            f"tpa={helix.tpa} is below the model's {shape.num_kv_heads} KV heads: vllm-helix "
            f"keeps one KV head per TPA slice (tpa = KV heads), so use kvp="
            f"{max(1, world // shape.num_kv_heads)},tpa={shape.num_kv_heads} on "
            f"{max(1, world // shape.num_kv_heads) * shape.num_kv_heads} workers"
        )
    if args.kv_cache_dtype not in ("auto", None):
        raise HelixStartupError(
            f"--kv-cache-dtype {args.kv_cache_dtype} is not supported with Helix; "
            "drop it (the KV cache uses the model dtype)"
        )
    if args.speculative_config:
        raise HelixStartupError(
            "speculative decoding is not supported with Helix; drop --speculative-config"
        )
    check_platform(helix, args)


def check_platform(helix: HelixConfig, args: Any) -> None:
    """Which attention runs Helix on this platform, and the options it cannot honour.

    CPU: the plugin's backends (torch decode, Helix exchange, HOP-B). CUDA: vLLM's
    own LSE-returning backends (FlashInfer, FlashMLA, FlashAttention) with vLLM's
    all-to-all DCP exchange (``dcp_comm_backend="a2a"``: partial outputs + LSE in one
    all-to-all, exact LSE combine), which do not overlap the exchange.
    """
    if _is_cpu_platform():
        if args.dcp_comm_backend is not None:
            raise HelixStartupError(
                f"--dcp-comm-backend {args.dcp_comm_backend} has no effect with Helix on CPU (the "
                "plugin's backends always exchange with one all-to-all); drop it"
            )
        return
    if not _is_cuda_platform():
        from vllm.platforms import current_platform

        raise HelixStartupError(
            f"Helix runs on vLLM's CPU and CUDA platforms, not on {current_platform.device_name}; "
            "serve without the helix option"
        )
    if helix.hopb > 1:
        raise HelixStartupError(
            f"hopb={helix.hopb}: HOP-B runs in the plugin's CPU backends; on CUDA Helix uses vLLM's "
            "own FlashInfer/FlashMLA backends, whose exchange is not overlapped: use hopb=1"
        )
    if args.dcp_comm_backend not in (None, "a2a"):
        raise HelixStartupError(
            f"--dcp-comm-backend {args.dcp_comm_backend} is not Helix's exchange (one all-to-all of "
            "partial outputs and LSEs); drop it (Helix sets a2a)"
        )


def check_moe_grid_settings(helix: HelixConfig, args: Any, quantization: str | None) -> None:
    """Rules of the MoE TPF x EP grid (ep > 1) beyond the layout's own (``HelixConfig.validate``).

    The grid is built by :mod:`patches_free_hooks.moe_grid` from vLLM's plain
    TP = N MoE; vLLM's own expert-parallel options would build a different one,
    and its CPU path honours ``expert_map`` only for unquantized experts.
    """
    from patches_free_hooks import moe_grid

    keep = f"or use ep=1,tpf={helix.world_size} (experts tensor-parallel over all ranks)"
    if args.enable_expert_parallel or args.enable_eplb:
        raise HelixStartupError(
            f"helix ep={helix.ep} places the experts itself (tpf={helix.tpf} x ep={helix.ep}); "
            f"drop --enable-expert-parallel/--enable-eplb {keep}"
        )
    if quantization is not None:
        raise HelixStartupError(
            f"helix ep={helix.ep} supports unquantized experts only (vLLM's CPU quantized MoE "
            f"kernels ignore the expert map) but the model is {quantization}-quantized; {keep}"
        )
    if not moe_grid.installed():
        raise HelixStartupError(
            f"helix ep={helix.ep}: the MoE grid hook is not installed in this process (see the "
            f"'MoE grid unavailable' warning); install the plugin (vllm.general_plugins), {keep}"
        )


def _bind_one_core_range_per_worker(world: int) -> None:
    """vLLM's CPU workers need explicit core binding with more than one worker."""
    if world == 1 or not _is_cpu_platform() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < world:
        raise HelixStartupError(
            f"{world} CPU workers need at least {world} cores but only {len(cores)} are "
            f"available; use a smaller layout (kvp*tpa <= {len(cores)})"
        )
    per = len(cores) // world
    ranges = [cores[i * per:(i + 1) * per] for i in range(world)]
    binding = "|".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in ranges)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    logger.info("vllm-helix: VLLM_CPU_OMP_THREADS_BIND=%s (one core range per worker)", binding)


def apply_helix(args: Any) -> HelixConfig | None:
    """Validate the requested layout and rewrite ``args`` into vLLM's DCP settings.

    Returns the layout with ``stripe`` resolved, or ``None`` when Helix is off.
    """
    try:
        helix = helix_from_additional_config(args.additional_config)
    except (HelixConfigError, json.JSONDecodeError) as err:
        raise HelixStartupError(f"invalid helix option in --additional-config: {err}") from None
    if helix is None:
        return None
    check_supported_version()
    model_config = args.create_model_config()
    is_mla = bool(model_config.use_mla)
    shape = model_shape(model_config, _expected_block_size(args, is_mla))
    helix.validate(helix.world_size, shape)
    check_vllm_settings(helix, shape, args)
    if helix.ep > 1:
        check_moe_grid_settings(helix, args, model_config.quantization)
    stripe = helix.stripe_for(shape.block_size)
    resolved = HelixConfig(**{**helix.to_dict(), "stripe": stripe})

    args.tensor_parallel_size = resolved.world_size
    args.decode_context_parallel_size = resolved.kvp
    args.cp_kv_cache_interleave_size = stripe
    if not _is_cpu_platform():
        args.dcp_comm_backend = "a2a"  # vLLM's all-to-all + LSE combine: the Helix exchange on CUDA
    if is_mla and args.attention_backend is None and _is_cpu_platform():
        # Keep the reference CPU MLA backend (the one Helix adapts) on AMX machines too.
        args.attention_backend = internal(
            "vllm.v1.attention.backends.registry:AttentionBackendEnum.CPU_MLA"
        )
    args.additional_config = {**dict(args.additional_config), HELIX_KEY: resolved.to_dict()}
    _bind_one_core_range_per_worker(resolved.world_size)
    logger.info(
        "vllm-helix: %s -> tensor_parallel_size=%d, decode_context_parallel_size=%d, "
        "cp_kv_cache_interleave_size=%d",
        resolved.to_cli(), resolved.world_size, resolved.kvp, stripe,
    )
    return resolved


def install() -> None:
    """Wrap ``EngineArgs.create_engine_config`` once per process (idempotent)."""
    internal("vllm.engine.arg_utils:EngineArgs.create_engine_config")  # loud if vLLM moved it
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _INSTALLED_MARK, False):
        return

    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args: Any, **kwargs: Any):
        apply_helix(self)
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _INSTALLED_MARK, True)
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
