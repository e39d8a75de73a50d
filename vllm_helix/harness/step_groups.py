"""Where a decode step's time goes: vLLM profiler operations grouped by what the time is spent on.

Used by ``benchmarks/decode_step_profile.py`` (which profiles the steps) and by the long-context
page's explanations (which read the committed profile).
"""

from __future__ import annotations

from collections import defaultdict

STEP = "execute_context_0(0)_generation_"  # vLLM's annotation of a worker step with decode requests only

# name fragment -> group, first match wins (checked against the operation name)
GROUPS: tuple[tuple[str, str], ...] = (
    ("helix/native_kernel", "attention kernel"),  # Helix's C++ per-shard decode (a range around the call)
    ("helix/", "helix hops (self)"),
    (STEP, "worker Python between ops"),
    ("cpu_attention_with_kv_cache", "attention kernel"),  # vLLM's C++ CPU decode (TP)
    ("mla_decode_kvcache", "attention kernel"),  # vLLM's C++ CPU MLA decode (TP)
    ("_scaled_dot_product_flash_attention", "attention kernel"),  # torch's flash kernel (Helix prefill)
    ("cpu_attn_reshape_and_cache", "KV append"),
    ("concat_and_cache_mla", "KV append"),
    ("all_gather", "collectives"),
    ("all_reduce", "collectives"),
    ("all_to_all", "collectives"),
    ("gloo", "collectives"),
    ("c10d", "collectives"),
    ("shm", "collectives"),
    ("aten::linear", "linear layers"),
    ("aten::addmm", "linear layers"),
    ("aten::mm", "linear layers"),
    ("onednn", "linear layers"),
    ("gemm", "linear layers"),
    ("fused_moe", "MoE experts"),
)


def group_of(name: str) -> str:
    """The group of an operation name (:data:`GROUPS`, first match; else "other torch ops")."""
    lowered = name.lower()
    return next((group for fragment, group in GROUPS if fragment in lowered), "other torch ops")


def grouped(ops_ms: dict[str, float]) -> dict[str, float]:
    """Self time per step summed by :data:`GROUPS`."""
    groups: dict[str, float] = defaultdict(float)
    for name, ms in ops_ms.items():
        groups[group_of(name)] += ms
    return dict(groups)
