"""Adapters between vLLM's internals and :mod:`vllm_helix` (plugin, backends, hooks).

Every import of vLLM by the installed package (``vllm_helix`` and this package)
lives under this package, so a vLLM upgrade touches one place; the benchmarks and
scripts, which drive vLLM as a user would, import it too. Every touch is listed in
``docs/vllm-touchpoints.md``.
"""
