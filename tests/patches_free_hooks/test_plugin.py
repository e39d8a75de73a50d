"""The entry point on a vLLM outside the supported window (touch-point catalogue, "Version window").

``register`` must leave such a vLLM alone (no backend override, no MoE hook) and say
why once; a Helix request must then fail at start-up with the version message,
before any worker exists.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from patches_free_hooks import engine_config, moe_grid_hook, plugin  # noqa: E402
from patches_free_hooks.compat import HelixStartupError  # noqa: E402

VERSION_MESSAGE = r"supports vLLM >=0\.32,<0\.34 but vLLM 0\.40\.1 is installed"


def test_an_unsupported_vllm_is_left_alone_and_a_helix_request_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.v1.attention.backends.registry as registry

    calls: dict[str, list[Any]] = {"backend": [], "moe": [], "warning": []}
    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(registry, "register_backend", lambda *a: calls["backend"].append(a))
    monkeypatch.setattr(moe_grid_hook, "install", lambda: calls["moe"].append(True))
    monkeypatch.setattr(plugin.logger, "warning", lambda *a: calls["warning"].append(a[0] % a[1:]))
    monkeypatch.setattr(KVConnectorFactory, "_registry", {})

    plugin.register()

    assert calls["backend"] == [] and calls["moe"] == [] and KVConnectorFactory._registry == {}
    assert len(calls["warning"]) == 1 and calls["warning"][0].startswith("vllm-helix inactive: ")
    assert getattr(EngineArgs.create_engine_config, engine_config._INSTALLED_MARK, False)  # T2 stays
    with pytest.raises(HelixStartupError, match=VERSION_MESSAGE):
        engine_config.apply_helix(SimpleNamespace(additional_config={"helix": "kvp=2,tpa=1"}))
    assert engine_config.apply_helix(SimpleNamespace(additional_config={})) is None  # plain vLLM still starts


def test_a_supported_vllm_gets_the_backends_the_connector_and_the_moe_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same spies see the installation when the version is in the window (the test above can fail),
    and the KV connector name is registered once, however often vLLM loads the plugin."""
    import vllm.v1.attention.backends.registry as registry

    calls: dict[str, list[Any]] = {"backend": [], "moe": []}
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr(registry, "register_backend", lambda *a: calls["backend"].append(a))
    monkeypatch.setattr(moe_grid_hook, "install", lambda: calls["moe"].append(True))
    monkeypatch.setattr(KVConnectorFactory, "_registry", {})

    plugin.register()

    assert sorted(enum.name for enum, _ in calls["backend"]) == sorted(plugin.BACKENDS)
    assert calls["moe"] == [True]
    from patches_free_hooks.kv_connector import HelixConnector

    assert KVConnectorFactory._registry["HelixConnector"]() is HelixConnector
    plugin._registered = False
    plugin.register()  # a second registration in the same process must not collide
    assert list(KVConnectorFactory._registry) == ["HelixConnector"]


def test_amx_tile_state_is_requested_where_the_cpu_has_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without it vLLM's bf16 CPU attention dies of SIGILL on AMX machines (test_dtypes.py runs it there)."""
    import torch

    asked: list[bool] = []
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: asked.append(True) or True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert plugin.request_amx_tiles() is False and asked == []
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert plugin.request_amx_tiles() is True and asked == [True]
