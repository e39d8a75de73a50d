"""The plugin under Ray: loaded in Ray actors; engine-level equality where vLLM allows Ray.

vLLM loads general plugins in every Ray worker it starts. The first test starts
a local Ray instance and checks, inside a Ray actor, that vLLM's plugin loader
installs the Helix hooks there. vLLM 0.32's CPU platform refuses the Ray
executor itself ("current platform cpu does not support ray"), so the
engine-level equality test runs only on platforms where vLLM supports Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")
ray = pytest.importorskip("ray", reason="Ray not installed: pip install 'vllm-helix[test]'")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=False)
    try:
        yield
    finally:
        ray.shutdown()


def _hooks_in_this_process() -> dict[str, Any]:
    import vllm.plugins
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm.plugins.load_general_plugins()
    return {
        "CPU_ATTN": AttentionBackendEnum.CPU_ATTN.get_path(),
        "CPU_MLA": AttentionBackendEnum.CPU_MLA.get_path(),
        "engine_hook": bool(getattr(EngineArgs.create_engine_config, "_vllm_helix_wrapped", False)),
    }


def test_vllm_plugin_loader_installs_the_hooks_in_a_ray_actor(local_ray: None) -> None:
    from patches_free_hooks.plugin import BACKENDS

    hooks = ray.get(ray.remote(num_cpus=1)(_hooks_in_this_process).remote(), timeout=300)
    assert hooks == {"CPU_ATTN": BACKENDS["CPU_ATTN"], "CPU_MLA": BACKENDS["CPU_MLA"], "engine_hook": True}


def test_helix_under_the_ray_executor_equals_helix_off(
    twins: dict[str, Path], generate: Callable[..., dict[str, Any]]
) -> None:
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        pytest.skip(f"vLLM's {current_platform.device_name} platform does not support the Ray executor "
                    "(vLLM refuses it itself); this equality runs on CUDA machines")
    prompts = [[(11 * i + 5) % 1900 + 5 for i in range(n)] for n in (1, 70, 300)]
    helix = generate(twins["llama1"], prompts, 32, distributed_executor_backend="ray",
                     additional_config={"helix": json.loads('{"kvp": 2, "tpa": 1}')})
    off = generate(twins["llama1"], prompts, 32)
    for h, o in zip(helix["results"], off["results"]):
        assert h["ids"] == o["ids"]
        assert max(abs(a - b) for a, b in zip(h["logprobs"], o["logprobs"])) <= 1e-3
