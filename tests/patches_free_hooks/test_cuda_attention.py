"""Helix's choice of vLLM CUDA backend, block size and stripe (argument logic; runs on CPU).

The rules table is transcribed from vLLM's backend classes, most of which import
only with CUDA; every class that imports here is checked against it, so a vLLM
that changes one of them goes red.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from patches_free_hooks.compat import HelixStartupError
from patches_free_hooks.cuda_attention import BACKENDS, plan_cuda_attention

HOPPER, BLACKWELL, AMPERE, TURING = (9, 0), (10, 0), (8, 0), (7, 5)


def _plan(mla: bool, capability: tuple[int, int], head_size: int = 128, named: str | None = None,
          block_size: int | None = None, stripe: int | None = None):
    return plan_cuda_attention(mla=mla, capability=capability, head_size=head_size, named=named,
                               block_size=block_size, stripe=stripe)


@pytest.mark.parametrize(
    ("mla", "capability", "head_size", "backend", "block", "stripe"),
    [
        (False, HOPPER, 128, "FLASHINFER", 16, 16),  # FlashInfer first where vLLM allows it
        (False, BLACKWELL, 64, "FLASHINFER", 16, 16),
        (False, HOPPER, 96, "FLASH_ATTN", 16, 16),  # FlashInfer takes head sizes 64/128/256/512
        (True, BLACKWELL, 128, "FLASHINFER_MLA", 32, 1),  # its native DCP needs interleave 1
        (True, BLACKWELL, 32, "CUTLASS_MLA", 128, 128),  # qk_nope_head_dim 32: not FlashInfer-MLA
        (True, HOPPER, 128, "FLASH_ATTN_MLA", 16, 16),  # vLLM's own first choice on Hopper
        (True, AMPERE, 128, "TRITON_MLA", 16, 16),
    ],
)
def test_default_choice_block_and_stripe(mla: bool, capability: tuple[int, int], head_size: int, backend: str,
                                         block: int, stripe: int) -> None:
    plan = _plan(mla, capability, head_size)
    assert (plan.backend, plan.block_size, plan.stripe) == (backend, block, stripe)
    chosen = next(b for b in BACKENDS if b.name == backend)
    assert chosen.mla == mla and chosen.runs_on(capability) and chosen.accepts_block(plan.block_size)
    assert plan.block_size % plan.stripe == 0


def test_user_block_size_and_stripe_steer_the_default_away_from_backends_that_refuse_them() -> None:
    assert _plan(True, BLACKWELL, block_size=16).backend == "TRITON_MLA"  # FlashInfer-MLA 32k, CUTLASS 128k
    assert _plan(False, HOPPER, block_size=128).backend == "FLASHINFER"  # a multiple of its 16/32/64
    plan = _plan(True, BLACKWELL, stripe=16)  # FlashInfer-MLA needs stripe 1
    assert (plan.backend, plan.block_size, plan.stripe) == ("CUTLASS_MLA", 128, 16)
    assert "FLASHINFER_MLA (its native DCP requires cp_kv_cache_interleave_size=1" in plan.why
    assert (_plan(False, HOPPER, block_size=64, stripe=8).block_size, _plan(False, HOPPER, stripe=8).stripe) == (64, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mla": True, "capability": HOPPER, "named": "FLASHMLA", "block_size": 16},
         r"--attention-backend FLASHMLA: takes block sizes that are multiples of 64, not --block-size 16; pass "
         r"--block-size 64 or drop it \(or drop --attention-backend"),
        ({"mla": True, "capability": BLACKWELL, "named": "FLASHINFER_MLA", "stripe": 16},
         r"FLASHINFER_MLA: its native DCP requires cp_kv_cache_interleave_size=1, i.e. helix stripe=1, not "
         r"stripe=16; drop stripe"),
        ({"mla": True, "capability": HOPPER, "named": "FLASHINFER_MLA"},
         r"FLASHINFER_MLA: runs on compute capability 10.0 to 10.x, not 9.0"),
        ({"mla": False, "capability": HOPPER, "named": "FLASHINFER", "head_size": 96},
         r"FLASHINFER: takes head size in \[64, 128, 256, 512\], the model has 96"),
        ({"mla": False, "capability": HOPPER, "named": "FLASH_ATTN", "head_size": 100},
         r"FLASH_ATTN: takes head size multiples of 8 up to 256, the model has 100"),
        ({"mla": False, "capability": HOPPER, "named": "FLASH_ATTN_MLA"},
         r"FLASH_ATTN_MLA cannot run Helix's shards for this GQA model.*\(FLASHINFER, FLASH_ATTN\)"),
        ({"mla": False, "capability": HOPPER, "named": "TRITON_ATTN"},
         r"TRITON_ATTN cannot run Helix's shards"),  # vLLM's Triton GQA backend has no DCP
        ({"mla": False, "capability": TURING},
         r"no vLLM CUDA backend can run Helix's GQA shards on compute capability 7.5 with these settings: FLASHINFER: runs on "
         r"compute capability 8.0 to 12.1, not 7.5; FLASH_ATTN: runs on compute capability 8.0 or newer, not 7.5$"),
        ({"mla": True, "capability": HOPPER, "named": "CPU_MLA"}, r"CPU_MLA cannot run Helix's shards"),
        ({"mla": False, "capability": HOPPER, "block_size": 8},
         r"no vLLM CUDA backend can run Helix's GQA shards on compute capability 9.0.*not --block-size 8"),
    ],
)
def test_refusals_name_the_backend_the_rule_and_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(HelixStartupError, match=message):
        _plan(**{"head_size": 128, **kwargs})


# --- the table against vLLM's own classes (those that import without CUDA) -----------------------

vllm = pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")


def _importable() -> list[tuple[object, type]]:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    found = []
    for backend in BACKENDS:
        try:
            found.append((backend, AttentionBackendEnum[backend.name].get_class()))
        except (ImportError, AssertionError, RuntimeError):  # needs flashinfer / flash_attn / CUDA torch
            continue
    return found


def test_table_agrees_with_every_vllm_class_that_imports_on_cpu() -> None:
    from vllm.platforms.interface import DeviceCapability

    checked = _importable()
    assert {b.name for b, _ in checked} >= {"FLASH_ATTN", "FLASHMLA", "TRITON_MLA"}
    for backend, cls in checked:
        assert cls.get_impl_cls().supports_dcp and cls.get_impl_cls().can_return_lse_for_decode, backend.name
        for size in (8, 16, 24, 32, 48, 64, 96, 128, 256):
            assert backend.accepts_block(size) == cls.supports_block_size(size), (backend.name, size)
        if not backend.mla:  # (MLA classes check the 576-dim latent; the table checks qk_nope_head_dim)
            for head_size in (*range(8, 600, 8), 12, 100, 132):
                assert backend.accepts_head(head_size) == cls.supports_head_size(head_size), (backend.name, head_size)
        for capability in ((7, 5), (8, 0), (8, 9), (9, 0), (10, 0), (12, 0)):
            # The table may be narrower (dense FlashMLA runs on Hopper only: vllm ops/flashmla.py),
            # never wider than what the class accepts.
            if backend.runs_on(capability):
                assert cls.supports_compute_capability(DeviceCapability(*capability)), (backend.name, capability)


def _source_tree(backend) -> ast.Module:
    """The backend's vLLM module, parsed (not imported: most need CUDA to import)."""
    root = Path(vllm.__file__).parent
    return ast.parse((root / backend.source.split()[0]).read_text())


def _head_size_rule(backend, tree: ast.Module) -> tuple[int, ...]:
    """What vLLM's source restricts: GQA ``get_supported_head_sizes()``'s literal; MLA a
    ``qk_nope_head_dim not in [...]`` check (every MLA backend takes the 576-dim latent)."""
    for node in ast.walk(tree):
        if not backend.mla and isinstance(node, ast.FunctionDef) and node.name == "get_supported_head_sizes":
            returned = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
            return tuple(ast.literal_eval(returned.value))
        if (backend.mla and isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                and node.left.id == "qk_nope_head_dim" and isinstance(node.ops[0], ast.NotIn)):
            return tuple(ast.literal_eval(node.comparators[0]))
    return ()


def _needs_interleave_one(tree: ast.Module) -> bool:
    """A ``<...interleave...> != 1`` check in vLLM's source (FlashInfer-MLA's metadata builder)."""
    return any(isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.NotEq)
               and "interleave" in ast.unparse(node.left)
               and isinstance(node.comparators[0], ast.Constant) and node.comparators[0].value == 1
               for node in ast.walk(tree))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_head_size_and_stripe_rules_match_vllms_source(backend) -> None:
    """The rules the class test above cannot reach (the classes need CUDA to import), read from the source."""
    tree = _source_tree(backend)
    overrides_check = any(isinstance(n, ast.FunctionDef) and n.name == "supports_head_size" for n in ast.walk(tree))
    if overrides_check:  # a rule in code, not a literal: the class test above compares it head size by head size
        assert backend.name in {b.name for b, _ in _importable()}
    else:
        assert backend.head_sizes == _head_size_rule(backend, tree)
    assert backend.interleave_one == _needs_interleave_one(tree)
