"""Which per-shard kernel runs a call: the C++ decode kernel, torch's flash kernel, or the reference.

* ``"native"``: :mod:`~vllm_helix.attention.cpu_native`, one pass per decode token
  over its paged shard, read in place (the CPU decode path).
* ``"flash"``: :mod:`~vllm_helix.attention.cpu_flash`, torch's fused kernel over views
  of the cache; reads a shard once for many query tokens (the CPU prefill path).
* ``"reference"``: plain torch ops on any device, the float64-checked reference.

``"auto"`` takes native for GQA decode tokens and flash for prefill chunks and for
MLA's decode on CPU (flash alone where the C++ kernel is not built, the reference
where neither runs).
All three are exact to float rounding and return the natural-log LSE.
"""

from __future__ import annotations

from typing import Literal

import torch

from vllm_helix.attention.cpu_flash import flash_supported
from vllm_helix.attention.cpu_native import native_supported
from vllm_helix.attention.merge import CPU_KERNEL_DTYPES

Kernel = Literal["auto", "native", "flash", "reference"]
Choice = Literal["native", "flash", "reference"]
KERNELS = ("auto", "native", "flash", "reference")
_DTYPE_NAMES = "/".join(str(dtype).removeprefix("torch.") for dtype in CPU_KERNEL_DTYPES)


def choose_kernel(query: torch.Tensor, kernel: Kernel, key_dim: int, value_dim: int) -> Choice:
    """Resolve ``kernel`` for this query; raises where a named kernel cannot run.

    For ``"auto"`` the answer is the decode kernel; callers send prefill chunks
    (many query tokens on one sequence) and MLA's decode to flash where flash runs.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: use one of {', '.join(map(repr, KERNELS))}")
    if kernel == "reference":
        return "reference"
    if kernel == "native":
        if not native_supported(query):
            raise ValueError(
                f"kernel='native' needs a CPU query in {_DTYPE_NAMES} (got {query.device.type} "
                f"{query.dtype}) and the built C++ kernel (`vllm-helix build-kernel` builds it); "
                "use kernel='auto'"
            )
        return "native"
    if kernel == "flash":
        if not flash_supported(query, key_dim, value_dim):
            raise ValueError(
                f"kernel='flash' needs a CPU query in {_DTYPE_NAMES} and equal key and value "
                f"dims (got {query.device.type} {query.dtype}, dims {key_dim} and {value_dim}); use kernel='auto'"
            )
        return "flash"
    if native_supported(query):
        return "native"
    return "flash" if flash_supported(query, key_dim, value_dim) else "reference"
