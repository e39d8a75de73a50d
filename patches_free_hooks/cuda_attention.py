"""Which of vLLM's CUDA attention backends runs Helix's shards, with which block size and stripe.

On CUDA the plugin brings no kernel of its own into vLLM: each rank's shard runs
on one of vLLM's backends that return the softmax LSE for decode (their impls set
``can_return_lse_for_decode`` and ``supports_dcp``), and vLLM's all-to-all DCP
combine (``dcp_comm_backend="a2a"``) is the exchange. What the plugin adds at
start-up is the choice: the design card asks for FlashInfer's decode, so Helix
names vLLM's FlashInfer backend where vLLM allows it, otherwise the backend vLLM
itself would pick first, and it fixes the KV block size and the stripe so that
the chosen backend accepts them. A combination a backend would reject only inside
a worker (``FLASHINFER_MLA`` with ``cp_kv_cache_interleave_size > 1`` fails in its
metadata builder) is refused here, with the backend, the rule and the flag that
fixes it.

The rules are transcribed from vLLM 0.32's backend classes because most of them
cannot be imported without CUDA (they import ``flashinfer`` or ``flash_attn`` at
module level); ``tests/patches_free_hooks/test_cuda_attention.py`` checks the
table against every class that does import on CPU, so a vLLM that moves one of
those goes red. This module has never run on a GPU: it is argument logic, tested
on CPU against a simulated CUDA platform.
"""

from __future__ import annotations

from dataclasses import dataclass

from patches_free_hooks.compat import HelixStartupError

Capability = tuple[int, int]
_ANY: tuple[Capability, Capability] = ((0, 0), (99, 99))


@dataclass(frozen=True)
class CudaBackend:
    """One of vLLM's DCP-capable CUDA backends and the rules Helix must satisfy for it.

    Attributes:
        name: vLLM's ``AttentionBackendEnum`` name (``--attention-backend``).
        mla: whether it serves MLA models (else GQA/MHA).
        capabilities: lowest and highest compute capability it runs on (inclusive).
        block_sizes: its kernel block sizes; vLLM accepts a KV block size that is a multiple of one
            of them (``AttentionBackend.supports_block_size``); empty means multiples of 16.
        head_sizes: GQA head sizes, or MLA ``qk_nope_head_dim`` values, it accepts; empty = any.
        interleave_one: its native DCP needs ``cp_kv_cache_interleave_size == 1`` (stripe 1).
        source: where vLLM 0.32 states these rules.
    """

    name: str
    mla: bool
    capabilities: tuple[Capability, Capability] = _ANY
    block_sizes: tuple[int, ...] = ()
    head_sizes: tuple[int, ...] = ()
    interleave_one: bool = False
    source: str = ""

    def runs_on(self, capability: Capability) -> bool:
        low, high = self.capabilities
        return low <= capability <= high

    def accepts_block(self, block_size: int) -> bool:
        return any(block_size % size == 0 for size in self.block_sizes or (16,))

    def accepts_head(self, head_size: int) -> bool:
        return not self.head_sizes or head_size in self.head_sizes

    def preferred_block(self) -> int:
        """vLLM's own default for the backend: 16 where accepted, else its smallest size."""
        return 16 if self.accepts_block(16) else min(self.block_sizes)

    def head_rule(self) -> str:
        """``in [64, 128, 256, 512]``, or ``multiples of 8 up to 256`` for a long arithmetic run."""
        sizes = list(self.head_sizes)
        if len(sizes) > 4 and sizes == list(range(sizes[0], sizes[-1] + 1, sizes[0])):
            return f"multiples of {sizes[0]} up to {sizes[-1]}"
        return f"in {sizes}"

    def block_rule(self) -> str:
        sizes = " or ".join(str(size) for size in self.block_sizes or (16,))
        return f"block sizes that are multiples of {sizes}"


# In Helix's order of preference: FlashInfer first (the design card), then vLLM's own order
# (platforms/cuda.py _get_backend_priorities), restricted to backends that return the decode LSE
# (TRITON_ATTN, FLEX_ATTENTION and the sparse MLA backends do not support DCP).
BACKENDS: tuple[CudaBackend, ...] = (
    CudaBackend("FLASHINFER", mla=False, capabilities=((8, 0), (12, 1)), block_sizes=(16, 32, 64),
                head_sizes=(64, 128, 256, 512), source="v1/attention/backends/flashinfer.py"),
    # FlashAttention: multiples of 8 up to 256 (FA4 alone goes to 512; the table stays on the safe side).
    CudaBackend("FLASH_ATTN", mla=False, capabilities=((8, 0), (99, 99)), head_sizes=tuple(range(8, 257, 8)),
                source="v1/attention/backends/flash_attn.py"),
    CudaBackend("FLASHINFER_MLA", mla=True, capabilities=((10, 0), (10, 99)), block_sizes=(32, 64),
                head_sizes=(64, 128, 192), interleave_one=True,
                source="v1/attention/backends/mla/flashinfer_mla.py"),
    CudaBackend("CUTLASS_MLA", mla=True, capabilities=((10, 0), (10, 99)), block_sizes=(128,),
                source="v1/attention/backends/mla/cutlass_mla.py"),
    CudaBackend("FLASH_ATTN_MLA", mla=True, capabilities=((9, 0), (9, 99)),
                source="v1/attention/backends/mla/flashattn_mla.py"),
    CudaBackend("FLASHMLA", mla=True, capabilities=((9, 0), (9, 99)), block_sizes=(64,),
                source="v1/attention/backends/mla/flashmla.py (dense FlashMLA: Hopper only)"),
    CudaBackend("TRITON_MLA", mla=True, source="v1/attention/backends/mla/triton_mla.py"),
)
_BY_NAME = {backend.name: backend for backend in BACKENDS}


@dataclass(frozen=True)
class CudaAttentionPlan:
    """The backend Helix names for vLLM, the KV block size and the stripe, and why."""

    backend: str
    block_size: int
    stripe: int
    why: str


def _kind(mla: bool) -> str:
    return "MLA" if mla else "GQA"


def plan_cuda_attention(*, mla: bool, capability: Capability, head_size: int, named: str | None,
                        block_size: int | None, stripe: int | None) -> CudaAttentionPlan:
    """Choose (or check the user's) backend, block size and stripe for Helix on a CUDA GPU.

    ``head_size`` is the attention head size for GQA and ``qk_nope_head_dim`` for MLA;
    ``named`` is ``--attention-backend``; ``block_size`` is ``--block-size``; ``stripe``
    the Helix option (``None``: the block size, or 1 where the backend needs it).
    """
    gpu = f"compute capability {capability[0]}.{capability[1]}"
    fits = [b for b in BACKENDS if b.mla == mla]
    if named is not None:
        backend = _BY_NAME.get(named)
        if backend is None or backend.mla != mla:
            raise HelixStartupError(
                f"--attention-backend {named} cannot run Helix's shards for this {_kind(mla)} model: Helix on "
                f"CUDA needs one of vLLM's backends that return the decode LSE ({', '.join(b.name for b in fits)}); "
                "name one of those, or drop --attention-backend and Helix picks one"
            )
        problem = _problem(backend, capability, head_size, block_size, stripe)
        if problem:
            raise HelixStartupError(f"--attention-backend {named}: {problem} (or drop --attention-backend: "
                                    "Helix then picks a backend that fits)")
        why = "named with --attention-backend"
    else:
        problems = {b.name: _problem(b, capability, head_size, block_size, stripe) for b in fits}
        usable = [b for b in fits if not problems[b.name]]
        if not usable:
            raise HelixStartupError(
                f"no vLLM CUDA backend can run Helix's {_kind(mla)} shards on {gpu} with these settings: "
                + "; ".join(f"{name}: {text}" for name, text in problems.items())
            )
        backend = usable[0]
        skipped = [f"{b.name} ({problems[b.name]})" for b in fits[:fits.index(backend)]]
        why = "FlashInfer's decode, as Helix prefers" if backend.name.startswith("FLASHINFER") else (
            "the first of vLLM's LSE-returning backends that fits; skipped " + ", ".join(skipped))
    block = block_size if block_size is not None else backend.preferred_block()
    return CudaAttentionPlan(backend.name, block, stripe if stripe is not None else (1 if backend.interleave_one
                                                                                       else block), why)


def _problem(backend: CudaBackend, capability: Capability, head_size: int, block_size: int | None,
             stripe: int | None) -> str:
    """Why ``backend`` cannot run these settings ('' if it can), with the flag that fixes it."""
    if not backend.runs_on(capability):
        (lo_major, lo_minor), (hi_major, hi_minor) = backend.capabilities
        upper = " or newer" if hi_major == 99 else f" to {hi_major}.{hi_minor if hi_minor != 99 else 'x'}"
        return f"runs on compute capability {lo_major}.{lo_minor}{upper}, not {capability[0]}.{capability[1]}"
    if not backend.accepts_head(head_size):
        what = "qk_nope_head_dim" if backend.mla else "head size"
        return f"takes {what} {backend.head_rule()}, the model has {head_size}"
    if block_size is not None and not backend.accepts_block(block_size):
        return (f"takes {backend.block_rule()}, not --block-size {block_size}; pass --block-size "
                f"{backend.preferred_block()} or drop it")
    if backend.interleave_one and stripe not in (None, 1):
        return (f"its native DCP requires cp_kv_cache_interleave_size=1, i.e. helix stripe=1, not stripe={stripe}; "
                "drop stripe (Helix then uses 1)")
    return ""
