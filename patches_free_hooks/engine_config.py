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
method (one of the plugin's touch-points into vLLM, all listed with their guards in
``docs/vllm-touchpoints.md``). The wrapper is inert without a
``helix`` entry. With one, every constraint is checked against the model
*before* vLLM builds anything, so a bad layout fails with one message naming
the constraint and a working alternative, never a traceback from a worker.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from vllm_helix.config import (ADDITIONAL_CONFIG_KEY, HelixConfig, HelixConfigError, ModelShape, from_additional_config,
                               near_miss_key)
from vllm_helix.kv_store import CONNECTOR_NAME, StoreConfig, StoreConfigError, private_root
from vllm_helix.serving_rules import Platform, check_kv_cache_dtype, check_layout, check_platform, workers_per_node

from patches_free_hooks.compat import HelixStartupError, check_supported_version, internal
from patches_free_hooks.cuda_attention import plan_cuda_attention

logger = logging.getLogger("vllm.helix")  # under vLLM's logger: same handlers and format

_INSTALLED_MARK = "_vllm_helix_wrapped"

# vLLM's CPU backends: MLA decodes with block_size 16 (forced by the CPU platform),
# everything else defaults to 128-token blocks.
_CPU_MLA_BLOCK_SIZE = 16
_CPU_DEFAULT_BLOCK_SIZE = 128


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


_TARGET: Platform | None = None  # a platform checked for (serve --check), instead of this machine's


@contextlib.contextmanager
def checking_for(target: Platform | None) -> Iterator[None]:
    """Apply the start-up rules of ``target`` (None: this machine) inside the block."""
    global _TARGET
    previous, _TARGET = _TARGET, target
    try:
        yield
    finally:
        _TARGET = previous


def _is_cpu_platform() -> bool:
    if _TARGET is not None:
        return _TARGET.kind == "cpu"
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _is_cuda_platform() -> bool:
    if _TARGET is not None:
        return _TARGET.kind == "cuda"
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def _cuda_capability() -> tuple[int, int]:
    if _TARGET is not None and _TARGET.capability is not None:
        return _TARGET.capability
    from vllm.platforms import current_platform

    capability = current_platform.get_device_capability()
    if capability is None:
        raise HelixStartupError("vLLM reports no CUDA device capability; Helix cannot choose an attention backend")
    return int(capability.major), int(capability.minor)


def _platform() -> Platform:
    """The platform the start-up rules apply to: the one checked for, else this machine's."""
    if _TARGET is not None:
        return _TARGET
    if _is_cpu_platform():
        return Platform("cpu", cores=_cpu_worker_slots())  # this node's
    return Platform("cuda", capability=_cuda_capability())


def _cpu_worker_slots(nodes: int = 1) -> int | None:
    """CPU workers that can start on ``nodes`` nodes like this one: one per usable core, unless the
    user bound the workers to cores (``VLLM_CPU_OMP_THREADS_BIND``), which vLLM then checks itself."""
    if not _is_cpu_platform() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return None
    if _TARGET is not None and _TARGET.cores is not None:
        return _TARGET.cores * nodes
    return len(os.sched_getaffinity(0)) * nodes


def _named_backend(args: Any) -> str | None:
    """``--attention-backend`` as a name (vLLM accepts the enum or its name)."""
    named = args.attention_backend
    if named is None or (isinstance(named, str) and named.lower() == "auto"):
        return None
    return str(getattr(named, "name", named)).upper()


def _runnable_world(world: int, nodes: int = 1) -> bool:
    """Whether ``world`` workers can start on ``nodes`` nodes like this one (CPU: one core each;
    elsewhere: not known here)."""
    slots = _cpu_worker_slots(nodes)
    return slots is None or world <= slots


def _nodes(args: Any) -> int:
    return max(1, int(getattr(args, "nnodes", 1) or 1))


def check_nodes(helix: HelixConfig, args: Any, headless: bool) -> int:
    """vLLM's multi-node flags against the layout; returns the workers each node runs.

    vLLM's multiprocessing executor puts ``world / nnodes`` consecutive ranks on each node
    (node 0 serves, the others run workers only, ``--headless``). vLLM checks the same
    arithmetic later, in a traceback; here it is one line with the fix.
    """
    nodes, rank, world = _nodes(args), int(getattr(args, "node_rank", 0) or 0), helix.world_size
    if nodes == 1:
        if rank != 0:
            raise HelixStartupError(f"--node-rank {rank} needs --nnodes > 1 (this is a one-node engine); "
                                    "drop --node-rank or set --nnodes")
        return world
    try:
        per_node = workers_per_node(world, nodes)
    except HelixConfigError as err:
        raise HelixStartupError(f"helix {helix.to_cli()} with --nnodes {nodes}: {err}") from None
    if not 0 <= rank < nodes:
        raise HelixStartupError(f"--node-rank {rank} is outside 0..{nodes - 1} for --nnodes {nodes}; "
                                "number the nodes from 0")
    if rank > 0 and not headless:
        raise HelixStartupError(f"--node-rank {rank} runs workers only: add --headless (node 0 serves the API)")
    if rank == 0 and headless:
        raise HelixStartupError("--node-rank 0 serves the API: drop --headless on node 0")
    return per_node


def resolve_attention(helix: HelixConfig, args: Any, model_config: Any) -> tuple[int, int]:
    """The KV block size and stripe Helix runs with, after choosing the attention backend.

    CPU: the plugin's own backends (``CPU_ATTN`` / ``CPU_MLA`` subclasses: torch
    decode with the LSE, the Helix exchange, HOP-B); MLA is pinned to ``CPU_MLA``
    (vLLM would pick ``AMX_MLA`` on AMX CPUs, which returns no LSE). CUDA: one of
    vLLM's LSE-returning backends with vLLM's all-to-all DCP combine, chosen and
    checked by :func:`patches_free_hooks.cuda_attention.plan_cuda_attention`.
    Sets ``args.attention_backend`` (and on CUDA ``args.block_size``).
    """
    is_mla = bool(model_config.use_mla)
    named = _named_backend(args)
    if _is_cpu_platform():
        own = "CPU_MLA" if is_mla else "CPU_ATTN"
        if named not in (None, own):
            raise HelixStartupError(
                f"--attention-backend {named}: Helix on CPU runs {'MLA' if is_mla else 'GQA'} attention in the "
                f"plugin's {own} backend (the only one that returns the LSE its exchange needs); drop "
                "--attention-backend"
            )
        if args.dcp_comm_backend is not None:
            raise HelixStartupError(
                f"--dcp-comm-backend {args.dcp_comm_backend} has no effect with Helix on CPU (the "
                "plugin's backends always exchange with one all-to-all); drop it"
            )
        if is_mla:
            args.attention_backend = internal("vllm.v1.attention.backends.registry:AttentionBackendEnum.CPU_MLA")
        block = _CPU_MLA_BLOCK_SIZE if is_mla else (args.block_size or _CPU_DEFAULT_BLOCK_SIZE)
        return block, helix.stripe_for(block)
    if not _is_cuda_platform():
        from vllm.platforms import current_platform

        raise HelixStartupError(
            f"Helix runs on vLLM's CPU and CUDA platforms, not on {current_platform.device_name}; "
            "serve without the helix option"
        )
    check_cuda_settings(helix, args, model_config)
    hf = model_config.hf_text_config
    plan = plan_cuda_attention(
        mla=is_mla, capability=_cuda_capability(), named=named, block_size=args.block_size, stripe=helix.stripe,
        head_size=int(hf.qk_nope_head_dim) if is_mla else int(model_config.get_head_size()),
    )
    args.attention_backend = plan.backend
    args.block_size = plan.block_size
    args.dcp_comm_backend = "a2a"  # vLLM's all-to-all + LSE combine: the Helix exchange on CUDA
    logger.info("vllm-helix: CUDA shards run on vLLM's %s backend (%s), block size %d, stripe %d",
                plan.backend, plan.why, plan.block_size, plan.stripe)
    return plan.block_size, plan.stripe


def check_cuda_settings(helix: HelixConfig, args: Any, model_config: Any) -> None:
    """What Helix on CUDA cannot honour: it runs on vLLM's backends and exchange, not the plugin's."""
    try:
        check_platform(helix, Platform("cuda", capability=_cuda_capability()))  # the planner's rule too
    except HelixConfigError as err:
        raise HelixStartupError(str(err)) from None
    if args.dcp_comm_backend not in (None, "a2a"):
        raise HelixStartupError(
            f"--dcp-comm-backend {args.dcp_comm_backend} is not Helix's exchange (one all-to-all of "
            "partial outputs and LSEs); drop it (Helix sets a2a)"
        )
    import torch

    if model_config.dtype == torch.float32:
        raise HelixStartupError(
            "the model runs in float32, but vLLM's CUDA backends that return the decode LSE take "
            "float16/bfloat16 only; pass --dtype bfloat16"
        )


def check_vllm_settings(helix: HelixConfig, shape: ModelShape, args: Any) -> None:
    """Constraints that come from running Helix through vLLM's DCP plumbing.

    ``helix.validate`` has already checked the layout against the model; these
    are the extra rules of this implementation, each with its way out (only
    layouts that can start on this machine are suggested).
    """
    world = helix.world_size
    if args.tensor_parallel_size not in (1, world):
        alternative = max(1, args.tensor_parallel_size // helix.tpa)
        other = (f" or use kvp={alternative},tpa={helix.tpa}"
                 if _runnable_world(alternative * helix.tpa, _nodes(args)) and alternative * helix.tpa != world
                 else "")
        raise HelixStartupError(
            f"kvp*tpa must equal the number of workers: kvp={helix.kvp} * tpa={helix.tpa} = "
            f"{world} but --tensor-parallel-size is {args.tensor_parallel_size}; drop "
            f"--tensor-parallel-size (Helix sets it to {world}){other}"
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
    try:
        check_kv_cache_dtype(args.kv_cache_dtype)
    except HelixConfigError as err:
        raise HelixStartupError(str(err)) from None
    if args.speculative_config:
        raise HelixStartupError(
            "speculative decoding is not supported with Helix; drop --speculative-config"
        )


def _transfer_field(transfer: Any, name: str) -> Any:
    """A field of ``--kv-transfer-config``, whether vLLM holds it as a dict or a ``KVTransferConfig``."""
    if transfer is None:
        return None
    return transfer.get(name) if isinstance(transfer, dict) else getattr(transfer, name, None)


def _connector_name(transfer: Any) -> str | None:
    return _transfer_field(transfer, "kv_connector")


def check_kv_transfer(helix: HelixConfig, shape: ModelShape, args: Any, block_size: int) -> None:
    """Refuse, at start-up and with the rule, the KV connectors known to break a Helix decode server.

    vLLM's NIXL path accepts decode-context parallelism only for MLA, with DCP over all of TP
    (tpa = 1) and ``cp_kv_cache_interleave_size`` forced to the block size (vLLM 0.32
    ``config/vllm.py``); its ``ExampleConnector`` writes global positions into every rank
    in vLLM's CPU block packing, which a Helix cache neither shards nor packs that way.
    """
    name = _connector_name(args.kv_transfer_config)
    if name is None or helix.kvp == 1:
        return
    if name == "NixlConnector":
        problems = [rule for rule, broken in (
            ("vLLM's NIXL transfers support decode-context parallelism only for MLA models", not shape.is_mla),
            (f"NIXL needs DCP over every worker, i.e. tpa=1 (got tpa={helix.tpa})", helix.tpa != 1),
            (f"NIXL moves whole blocks, so the stripe must equal the block size {block_size} "
             f"(got stripe={helix.stripe}); drop stripe", helix.stripe != block_size),
        ) if broken]
        if problems:
            raise HelixStartupError(f"--kv-transfer-config NixlConnector with helix kvp={helix.kvp}: "
                                    + "; ".join(problems))
    elif name == "ExampleConnector":
        raise HelixStartupError(
            f"--kv-transfer-config ExampleConnector cannot feed helix kvp={helix.kvp}: it writes every "
            "token into every rank in vLLM's CPU block packing; use \"kv_connector\": \"HelixConnector\" "
            "on both servers")


def check_helix_connector(args: Any) -> None:
    """Refuse a ``HelixConnector`` whose options or store directory are unusable, on every engine that
    names it (a plain producer too), before anything starts: one line naming the option and the fix."""
    transfer = args.kv_transfer_config
    if (_connector_name(transfer) != CONNECTOR_NAME
            and _transfer_field(transfer, "kv_connector_module_path") != "patches_free_hooks.kv_connector"):
        return
    extra = _transfer_field(transfer, "kv_connector_extra_config")
    if extra is not None and not isinstance(extra, dict):
        raise HelixStartupError(f"--kv-transfer-config kv_connector_extra_config must be a JSON object, got {extra!r}")
    try:
        private_root(StoreConfig.from_extra(extra).path)
    except StoreConfigError as err:
        raise HelixStartupError(f"--kv-transfer-config: {err}") from None


def check_moe_grid_settings(helix: HelixConfig, args: Any, quantization: str | None) -> None:
    """Rules of the MoE TPF x EP grid (ep > 1) beyond the layout's own (``HelixConfig.validate``).

    The grid is built by :mod:`patches_free_hooks.moe_grid_hook` from vLLM's plain
    TP = N MoE; vLLM's own expert-parallel options would build a different one,
    and its CPU path honours ``expert_map`` only for unquantized experts.
    """
    from patches_free_hooks import moe_grid_hook

    keep = f"or use ep=1,tpf={helix.world_size} (experts tensor-parallel over all ranks)"
    if args.enable_expert_parallel or args.enable_eplb:
        raise HelixStartupError(
            f"helix ep={helix.ep} places the experts itself (tpf={helix.tpf} x ep={helix.ep}); "
            f"drop --enable-expert-parallel/--enable-eplb {keep}"
        )
    if quantization is not None:
        raise HelixStartupError(
            f"helix ep={helix.ep} supports unquantized experts only: vLLM's CPU quantized MoE experts "
            f"(fp8, int8, int4, mxfp4) compute with global expert ids and ignore the expert map that places "
            f"1/ep of the experts on each rank, and the model is {quantization}-quantized; {keep}"
        )
    if not moe_grid_hook.installed():
        raise HelixStartupError(
            f"helix ep={helix.ep}: the MoE grid hook is not installed in this process (see the "
            f"'MoE grid unavailable' warning); install the plugin (vllm.general_plugins), {keep}"
        )


def check_cpu_cores(local: int, nodes: int = 1) -> None:
    """vLLM's CPU workers each need a core of their own: the ``local`` ones of this node (of ``nodes``)."""
    if local > 1 and not _runnable_world(local):
        where = "" if nodes == 1 else f" on each of {nodes} nodes"
        raise HelixStartupError(
            f"{local} CPU workers{where} need at least {local} cores but only {_cpu_worker_slots()} are "
            f"available; use a smaller layout (kvp*tpa <= {_cpu_worker_slots(nodes)})"
        )


def _bind_one_core_range_per_worker(world: int) -> None:
    """vLLM's CPU workers need explicit core binding with more than one worker (``world``: this node's)."""
    if world == 1 or _TARGET is not None or not _is_cpu_platform() \
            or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return  # (a check for another platform binds nothing)
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // world
    ranges = [cores[i * per:(i + 1) * per] for i in range(world)]
    binding = "|".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in ranges)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    logger.info("vllm-helix: VLLM_CPU_OMP_THREADS_BIND=%s (one core range per worker)", binding)


def apply_helix(args: Any, headless: bool = False) -> HelixConfig | None:
    """Validate the requested layout and rewrite ``args`` into vLLM's DCP settings.

    Returns the layout with ``stripe`` resolved, or ``None`` when Helix is off.
    ``headless``: this process runs workers only (``vllm serve --headless``).
    """
    try:
        helix = from_additional_config(args.additional_config)
    except (HelixConfigError, json.JSONDecodeError) as err:
        raise HelixStartupError(f"invalid helix option in --additional-config: {err}") from None
    if helix is None:
        near = near_miss_key(args.additional_config) if isinstance(args.additional_config, dict) else None
        if near is not None:
            logger.warning("vllm-helix: --additional-config has %r but no 'helix' key, so Helix is off; "
                           "did you mean 'helix'?", near)
        return None
    check_supported_version()
    local_workers = check_nodes(helix, args, headless)
    check_cpu_cores(local_workers, _nodes(args))
    model_config = args.create_model_config()
    block_size, stripe = resolve_attention(helix, args, model_config)
    shape = model_shape(model_config, block_size)
    resolved = HelixConfig(**{**helix.to_dict(), "stripe": stripe})
    try:  # the layout rules the planner enumerates with (vllm_helix.serving_rules)
        check_layout(resolved, shape, _platform(), max_workers=_cpu_worker_slots(_nodes(args)))
    except HelixStartupError:
        raise
    except HelixConfigError as err:
        raise HelixStartupError(str(err)) from None
    check_vllm_settings(resolved, shape, args)
    check_kv_transfer(resolved, shape, args, block_size)
    if resolved.ep > 1:
        check_moe_grid_settings(resolved, args, model_config.quantization)

    args.tensor_parallel_size = resolved.world_size
    args.decode_context_parallel_size = resolved.kvp
    args.cp_kv_cache_interleave_size = stripe
    args.additional_config = {**dict(args.additional_config), ADDITIONAL_CONFIG_KEY: resolved.to_dict()}
    _bind_one_core_range_per_worker(local_workers)
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
        check_helix_connector(self)
        try:
            headless = kwargs.get("headless", args[1] if len(args) > 1 else False)  # (usage_context, headless)
            apply_helix(self, headless=bool(headless))
            return original(self, *args, **kwargs)
        except OSError as err:  # the model's files: missing, unreadable, or a hub name offline
            raise HelixStartupError(f"model {self.model!r} cannot be loaded: {err}".splitlines()[0]) from None

    setattr(create_engine_config, _INSTALLED_MARK, True)
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
