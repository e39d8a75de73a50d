"""The C++ per-shard decode kernel (``csrc/shard_decode.cpp``): build, load, call.

torch's flash kernel is tiled for prefill-sized query blocks; a decode token has
one query row per head and its cost is the read of the shard's K/V. The C++
kernel reads the paged cache in place through the block table, scores a block
for all query heads of a KV head, and keeps an online softmax, returning the
LSE that vLLM's own C++ decode kernel does not (see the source's header).

It is compiled with torch's ``cpp_extension`` for the machine it runs on
(``-march=native``; AVX2 vector code through ATen's ``Vectorized`` where the CPU
has AVX2 and FMA) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``). ``scripts/setup.sh`` builds it
(``vllm-helix build-kernel``), so served workers only load it.
If it cannot be built (no compiler), :func:`native_kernel` returns ``None``,
logs why once, and the callers use torch's flash kernel: slower, equally exact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from vllm_helix.attention.merge import CPU_KERNEL_DTYPES
from vllm_helix.profiling import hop

SOURCE = Path(__file__).parent / "csrc" / "shard_decode.cpp"
# Tokens per piece of a shard (a unit of work for one thread).
SPLIT_TOKENS = 8192
_logger = logging.getLogger("vllm.helix")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list[str]:
    """Compiler flags for this machine: native ISA, OpenMP (torch's own runtime), AVX2 ``Vectorized``."""
    flags = ["-O3", "-fopenmp", "-march=native"]
    if {"avx2", "fma", "f16c"} <= _cpu_flags():
        flags += ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def extension_name() -> str:
    """Named after the machine's ISA so a cache shared between CPU kinds never loads a foreign build."""
    tag = hashlib.sha256(" ".join([platform.machine(), *sorted(_cpu_flags())]).encode()).hexdigest()[:10]
    return f"helix_shard_decode_{tag}"


def build(verbose: bool = False) -> ModuleType:
    """Compile (or reuse the up-to-date build of) the kernel and import it; raises if it cannot."""
    from torch.utils.cpp_extension import load

    return load(name=extension_name(), sources=[str(SOURCE)], extra_cflags=compile_flags(),
                extra_ldflags=["-fopenmp"], verbose=verbose)


@lru_cache(maxsize=1)
def native_kernel() -> ModuleType | None:
    """The built kernel, or ``None`` (logged once) where it cannot be built or is switched off.

    ``VLLM_HELIX_CPU_KERNEL=flash`` switches it off (for side-by-side measurements).
    """
    if os.environ.get("VLLM_HELIX_CPU_KERNEL", "native") == "flash":
        return None
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - any build failure means: use the flash kernel
        _logger.warning("Helix C++ decode kernel unavailable (%s); using torch's flash kernel. "
                        "Run `vllm-helix build-kernel --verbose` to see the build.",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None


def native_supported(query: torch.Tensor) -> bool:
    """True when the C++ kernel is built and can run this query (CPU tensor, float dtype)."""
    return query.device.type == "cpu" and query.dtype in CPU_KERNEL_DTYPES and native_kernel() is not None


def native_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_table: torch.Tensor, visible_lens: torch.Tensor, scale: float,
                  split_tokens: int = SPLIT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query token over the first ``visible_lens[t]`` tokens of its shard, one pass per token.

    Same contract as :func:`vllm_helix.attention.paged_extend` (``block_table`` has a
    row per token). Reads each token's prefix once, so it suits decode tokens; a
    prefill chunk (many tokens on one row) goes to the flash kernel, which reads
    the shard once for all of them. Each token's shard is cut into pieces of
    ``split_tokens`` (rounded up to whole blocks), spread over torch's threads and
    merged exactly; the cut depends only on the token's length, so results do not
    depend on the thread count or on the rest of the batch.
    """
    module = native_kernel()
    if module is None:
        raise RuntimeError("the Helix C++ decode kernel is not built; run `vllm-helix build-kernel`")
    if query.shape[1] % key_cache.shape[2]:
        raise ValueError(f"{query.shape[1]} query heads do not group over {key_cache.shape[2]} KV heads")
    if query.stride(-1) != 1:
        query = query.contiguous()
    with hop("helix/native_kernel"):  # a pybind call: invisible to the profiler without a range
        out, lse = module.shard_decode(query, key_cache, value_cache, block_table, visible_lens, float(scale),
                                       split_tokens)
    return out.to(query.dtype), lse
