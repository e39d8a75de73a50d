"""Adapters between vLLM's internals and :mod:`vllm_helix` (plugin, backends, hooks).

Every import of vLLM in this project lives under this package, so a vLLM upgrade
touches one place.
"""
