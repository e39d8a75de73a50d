"""Number formats: how many bytes an element of weights, KV cache or activations takes.

Decode is memory-bound, so the bytes per element are the first-order input of the
whole model. Three FP4 spellings, because the scales cost bytes too:

- ``fp4``: nominal 4 bits per element, scales ignored (how the Helix paper prices
  FP4; its Appendix A per-layer times come out exactly with it);
- ``mxfp4``: OCP Microscaling (spec v1.0), 32 four-bit elements share one 8-bit
  E8M0 scale: 4.25 bits;
- ``nvfp4``: NVIDIA's format, 16 elements share one FP8 E4M3 scale: 4.5 bits
  (its per-tensor FP32 scale is negligible).

All three compute at the hardware's FP4 rate. FP8 block scales (one FP32 per
128x128 weight block in DeepSeek's checkpoints) add 0.002 bits per element and
are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_helix.planner.errors import PlannerError

BITS_PER_ELEMENT: dict[str, float] = {
    "fp4": 4.0,  # nominal E2M1, scales not counted (the paper's pricing)
    "mxfp4": 4.0 + 8.0 / 32.0,  # E2M1 + one 8-bit E8M0 scale per 32 elements
    "nvfp4": 4.0 + 8.0 / 16.0,  # E2M1 + one 8-bit E4M3 scale per 16 elements
    "fp8": 8.0,
    "bf16": 16.0,
    "fp16": 16.0,
    "fp32": 32.0,
}

# Spellings found in Hugging Face configs (torch_dtype / dtype) and on command lines.
_ALIASES: dict[str, str] = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
    "e4m3": "fp8",
    "e2m1": "fp4",
}

# Formats that compute at another format's FLOP rate (the scales do not change the tensor cores).
_FLOP_RATE_OF: dict[str, str] = {"mxfp4": "fp4", "nvfp4": "fp4"}


def canonical_dtype(name: str) -> str:
    """The planner's name for a number format (``bfloat16`` -> ``bf16``); raises on unknown."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BITS_PER_ELEMENT:
        raise PlannerError(
            f"unknown number format {name!r}; use one of {', '.join(BITS_PER_ELEMENT)}"
        )
    return key


def bytes_per_element(name: str) -> float:
    """Bytes one element occupies in memory or on the wire (0.5 for fp4, 0.53125 for mxfp4)."""
    return BITS_PER_ELEMENT[canonical_dtype(name)] / 8.0


def flop_rate_key(name: str) -> str:
    """The hardware profile's ``compute_tflops`` key that prices ``name`` (``mxfp4`` -> ``fp4``)."""
    key = canonical_dtype(name)
    return _FLOP_RATE_OF.get(key, key)


@dataclass(frozen=True)
class Precision:
    """Formats of the four things a decode step moves or computes.

    ``activations`` is the format of hidden states and partial attention outputs on
    the wire (all-reduce, all-to-all, MoE dispatch); the softmax log-sum-exp that
    travels with Helix partial outputs is always fp32. ``compute`` picks the
    tensor-core FLOP rate from the hardware profile.
    """

    weights: str = "bf16"
    kv: str = "bf16"
    compute: str = "bf16"
    activations: str = "bf16"

    def __post_init__(self) -> None:
        for field in ("weights", "kv", "compute", "activations"):
            object.__setattr__(self, field, canonical_dtype(getattr(self, field)))

    @property
    def weight_bytes(self) -> float:
        return bytes_per_element(self.weights)

    @property
    def kv_bytes(self) -> float:
        return bytes_per_element(self.kv)

    @property
    def activation_bytes(self) -> float:
        return bytes_per_element(self.activations)

    @classmethod
    def uniform(cls, dtype: str) -> "Precision":
        """Everything in one format, as in the Helix paper (all FP4)."""
        return cls(dtype, dtype, dtype, dtype)

    def describe(self) -> str:
        return (f"weights {self.weights}, KV {self.kv}, compute {self.compute}, "
                f"activations {self.activations}")
