"""The exact combine: splitting attention anywhere and merging gives the unsplit result."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_helix.attention.merge import merge_attention_states


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Dense attention of [T, H, D] queries over [L, H, D] keys: (out, lse), float64."""
    scores = torch.einsum("thd,lhd->thl", q, k)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("thl,lhd->thd", torch.softmax(scores, dim=-1), v)
    return out, lse


def _shard_states(q, k, v, cuts):
    """Partial states of attention over the pieces of the KV axis between cuts."""
    outs, lses = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi == lo:  # empty shard: zeros and -inf
            outs.append(torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype))
            lses.append(torch.full(q.shape[:2], float("-inf"), dtype=q.dtype))
        else:
            o, l = _attention(q, k[lo:hi], v[lo:hi])
            outs.append(o)
            lses.append(l)
    return torch.stack(outs), torch.stack(lses)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    length=st.integers(1, 300),
    shards=st.integers(1, 8),
    tokens=st.integers(1, 4),
    heads=st.integers(1, 4),
    spread=st.floats(0.1, 30.0),
)
def test_merge_of_any_split_equals_full_attention(seed, length, shards, tokens, heads, spread):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, heads, 16, generator=gen, dtype=torch.float64) * spread
    k = torch.randn(length, heads, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(length, heads, 8, generator=gen, dtype=torch.float64)
    cuts = sorted(torch.randint(0, length + 1, (shards - 1,), generator=gen).tolist())
    outs, lses = _shard_states(q, k, v, [0, *cuts, length])
    out, lse = merge_attention_states(outs, lses)
    ref_out, ref_lse = _attention(q, k, v)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 3, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(400, 3, 32, generator=gen, dtype=torch.float64)
    v = torch.randn(400, 3, 32, generator=gen, dtype=torch.float64)
    outs, lses = _shard_states(q, k, v, [0, 7, 7, 150, 400])
    out, lse = merge_attention_states(outs.to(dtype), lses.float())
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = merge_attention_states(outs.to(dtype).double(), lses)
    # rounding to ``dtype`` (plus float32 accumulation) is all that may differ from an exact merge
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref_out, rtol=4 * eps, atol=16 * eps)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)


def test_empty_shards_weigh_nothing_and_all_empty_rows_are_zero_not_nan():
    outs = torch.randn(3, 2, 2, 4)
    lses = torch.randn(3, 2, 2)
    outs[1, 0] = float("nan")  # an empty shard's output must not be read at all...
    outs[1, 0] = 123.0  # ...and garbage in it must not leak
    lses[1, 0] = float("-inf")
    out, lse = merge_attention_states(outs, lses)
    keep = [0, 2]
    expected, expected_lse = merge_attention_states(outs[keep, :1], lses[keep, :1])
    torch.testing.assert_close(out[:1], expected)
    torch.testing.assert_close(lse[:1], expected_lse)

    lses[:, 1, 0] = float("-inf")  # token 1, head 0: every shard empty
    out, lse = merge_attention_states(outs, lses)
    assert torch.all(out[1, 0] == 0) and lse[1, 0] == float("-inf")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"expected outputs \[S, T, H, D\] and lses \[S, T, H\]"):
        merge_attention_states(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 5))
