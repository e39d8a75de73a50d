"""The number formats a plan priced, as the printed serve command must carry them.

A plan prices weights and KV cache in some format; a command that loads another
format needs another amount of memory and runs at another speed, so every format
that differs from what vLLM would load by default is spelled on the command line:

* **weights**: vLLM reads the format from the checkpoint (``quantization_config``).
  Priced in the checkpoint's own format, nothing to add; fp8 from a 16-bit
  checkpoint on CUDA is vLLM's online quantization (``--quantization fp8``); any
  other format needs a checkpoint in that format, which the command names with a
  placeholder (``FP4_CHECKPOINT``) the user fills in, as ``MASTER_ADDR`` for nodes.
* **KV cache**: vLLM's default (``--kv-cache-dtype auto``) is the model's own dtype,
  the only format Helix serves (:func:`vllm_helix.serving_rules.check_kv_cache_dtype`
  says why). Baselines may quantize it (``--kv-cache-dtype fp8``).
"""

from __future__ import annotations

from vllm_helix.planner.model_spec import ModelSpec
from vllm_helix.planner.precision import Precision
from vllm_helix.serving_rules import Platform

# The planner's format names as vLLM 0.32's --kv-cache-dtype spells them (vllm/config/cache.py CacheDType).
VLLM_KV_CACHE_DTYPES: dict[str, str] = {"fp8": "fp8", "bf16": "bfloat16", "fp16": "float16"}
_SIXTEEN_BIT = ("bf16", "fp16", "fp32")


def checkpoint_placeholder(model: ModelSpec, precision: Precision, platform: Platform) -> str | None:
    """The placeholder standing for the checkpoint a command must load (None: the model's own serves)."""
    weights = precision.weights
    if weights == model.dtype or _online_quantization(model, weights, platform):
        return None
    return f"{weights.upper()}_CHECKPOINT"


def _online_quantization(model: ModelSpec, weights: str, platform: Platform) -> bool:
    """vLLM quantizes a 16-bit checkpoint to fp8 at load on CUDA (``--quantization fp8``)."""
    return weights == "fp8" and model.dtype in _SIXTEEN_BIT and platform.kind == "cuda"


def weight_flags(model: ModelSpec, precision: Precision, platform: Platform) -> tuple[str, ...]:
    """Flags that make vLLM load the weights in the priced format."""
    return ("--quantization fp8",) if _online_quantization(model, precision.weights, platform) else ()


def kv_cache_flags(model: ModelSpec, precision: Precision) -> tuple[str, ...]:
    """The ``--kv-cache-dtype`` a baseline command needs for the priced KV format (none for vLLM's auto)."""
    if precision.kv == model.kv_cache_dtype:
        return ()
    return (f"--kv-cache-dtype {VLLM_KV_CACHE_DTYPES[precision.kv]}",) if precision.kv in VLLM_KV_CACHE_DTYPES else ()


def kv_cache_refusal(model: ModelSpec, precision: Precision) -> str | None:
    """Why vLLM cannot store the priced KV format (None: it can, as auto or with ``--kv-cache-dtype``)."""
    if precision.kv == model.kv_cache_dtype or precision.kv in VLLM_KV_CACHE_DTYPES:
        return None
    return (f"vLLM 0.32 has no {precision.kv} KV cache for this model (--kv-cache-dtype takes "
            f"{', '.join(VLLM_KV_CACHE_DTYPES.values())} or auto)")


def formats_text(model: ModelSpec, precision: Precision, platform: Platform) -> str:
    """One line: which format each priced tensor has and where the command gets it from."""
    placeholder = checkpoint_placeholder(model, precision, platform)
    if placeholder:
        weights = f"{precision.weights} ({placeholder}: a checkpoint of the model in {precision.weights}; vLLM reads " \
                  f"the format from the checkpoint and does not quantize to {precision.weights} at load)"
    elif _online_quantization(model, precision.weights, platform):
        weights = f"fp8 (--quantization fp8: vLLM quantizes the {model.dtype} checkpoint at load)"
    else:
        weights = f"{precision.weights} (the checkpoint's)"
    kv = (f"{precision.kv} (vLLM's auto: the model's dtype, the only one Helix serves)"
          if precision.kv == model.kv_cache_dtype else
          f"{precision.kv} (baselines: --kv-cache-dtype; Helix serves only the model's {model.kv_cache_dtype})")
    return (f"formats: weights {weights}; KV cache {kv}; compute {precision.compute}; "
            f"activations {precision.activations}")
