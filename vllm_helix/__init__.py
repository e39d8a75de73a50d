"""vllm-helix: Helix Parallelism for vLLM.

This package is pure torch (no vLLM import anywhere): configuration, rank layouts,
KV striping, per-shard decode kernels, the exact LSE combine, the KVP exchange with
HOP-B overlap, and the deployment planner. Everything that touches vLLM internals
lives in the sibling package ``patches_free_hooks``.
"""

__version__ = "0.1.0"
