"""The ``vllm.general_plugins`` entry point: ``helix = patches_free_hooks.plugin:register``.

vLLM calls :func:`register` in every process it starts (API server, engine
core, each worker, Ray actors), sometimes twice in one process. It must be
idempotent and inert unless Helix is requested, so it only

* wraps ``EngineArgs.create_engine_config`` (a no-op without a ``helix`` entry
  in ``additional_config``; see :mod:`patches_free_hooks.engine_config`), and
* points vLLM's ``CPU_ATTN`` and ``CPU_MLA`` backend names at the Helix
  subclasses, which defer to vLLM's own code unless the worker's config asks
  for Helix with kvp > 1, and
* registers ``HelixConnector`` with vLLM's KV connector factory (imported only when
  a ``--kv-transfer-config`` names it; :mod:`patches_free_hooks.kv_connector`), and
* asks Linux for AMX tile state where the CPU has AMX (vLLM's bf16 CPU attention uses
  the tiles without asking, and its workers die of SIGILL; :func:`request_amx_tiles`), and
* installs the MoE TPF x EP grid (:mod:`patches_free_hooks.moe_grid_hook`): a wrapper
  of ``FusedMoEParallelConfig.make`` and an out-of-tree ``UnquantizedFusedMoEMethod``,
  both inert unless the config asks for Helix with ep > 1.

On a vLLM outside the supported range the backends are left alone (vLLM runs
as if the plugin were absent) and a Helix request fails at start-up with the
version message.
"""

from __future__ import annotations

import logging

from vllm_helix.kv_store import CONNECTOR_NAME

from patches_free_hooks.compat import HelixStartupError, check_supported_version, internal

logger = logging.getLogger("vllm.helix")  # under vLLM's logger: same handlers and format

BACKENDS = {
    "CPU_ATTN": "patches_free_hooks.cpu_attention.HelixCPUAttentionBackend",
    "CPU_MLA": "patches_free_hooks.cpu_mla.HelixCPUMLABackend",
}
_registered = False


def request_amx_tiles() -> bool:
    """Ask Linux for AMX tile state in this process, where the CPU has AMX (idempotent, cheap).

    vLLM's CPU attention runs AMX tile instructions for bfloat16 on such CPUs without
    requesting the tile state (``ARCH_REQ_XCOMP_PERM``); a worker whose first AMX
    instruction is vLLM's then dies of SIGILL (seen on this project's Xeon machines:
    plain vLLM, bf16, exit code -4). PyTorch's own request makes it safe.
    """
    import torch

    return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())


def register() -> None:
    """Install the Helix hooks in this process (safe to call any number of times)."""
    global _registered
    if _registered:
        return
    _registered = True
    request_amx_tiles()
    from patches_free_hooks import engine_config

    try:
        # Installed even on an unsupported vLLM: a helix request then fails at
        # start-up with the version message (apply_helix checks it first).
        engine_config.install()
        check_supported_version()
    except HelixStartupError as err:
        logger.warning("vllm-helix inactive: %s", err)
        return
    enum = internal("vllm.v1.attention.backends.registry:AttentionBackendEnum.CPU_ATTN").__class__
    register_backend = internal("vllm.v1.attention.backends.registry:register_backend")
    for name, class_path in BACKENDS.items():
        register_backend(enum[name], class_path)
    factory = "vllm.distributed.kv_transfer.kv_connector.factory:KVConnectorFactory"
    if CONNECTOR_NAME not in internal(f"{factory}._registry"):
        internal(f"{factory}.register_connector")(CONNECTOR_NAME, "patches_free_hooks.kv_connector", "HelixConnector")
    from patches_free_hooks import moe_grid_hook

    try:
        moe_grid_hook.install()
    except HelixStartupError as err:
        # Helix attention still works; a request with ep > 1 is refused at start-up.
        logger.warning("vllm-helix MoE grid (ep > 1) unavailable: %s", err)
