"""Per-shard decode on CUDA through FlashInfer, returning a natural-log LSE.

Same contract as :mod:`vllm_helix.attention.paged_decode` (which is the reference
these kernels are tested against), with three adaptations:

* FlashInfer's LSE is base 2; it is converted to natural log here, once, so no
  caller can mix bases (a known way to silently corrupt a combine).
* FlashInfer's paged layout is CSR (``indptr``/``indices``/``last_page_len``)
  and requires at least one token per request; sequences whose shard is empty
  are left out of the kernel call and given ``out = 0, lse = -inf``.
* Each call plans and runs; HOP-B calls it once per micro-batch.

FlashInfer is imported lazily: this module imports on machines without it, and
constructing a decoder there raises a clear error.

Status: written against flashinfer-python 0.7 and never run on a GPU (its tests skip
without CUDA). The vLLM integration does not use it: on CUDA the plugin runs the
shards on vLLM's own FlashInfer (or other LSE-returning) backend, chosen by
``patches_free_hooks/cuda_attention.py``. It serves direct use of the attention core.
"""

from __future__ import annotations

import abc
import math

import torch

LN2 = math.log(2.0)
_WORKSPACE_BYTES = 128 * 1024 * 1024


def _import_flashinfer():
    try:
        import flashinfer
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the FlashInfer decode path needs flashinfer-python on a CUDA machine: "
            "pip install 'vllm-helix[gpu]' (or use the torch path, paged_decode)"
        ) from err
    return flashinfer


def _csr_pages(
    block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's (indptr, indices, last_page_len) for sequences with >= 1 token."""
    pages = (seq_lens + block_size - 1) // block_size
    indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=block_table.device)
    indptr[1:] = torch.cumsum(pages, 0)
    columns = torch.arange(block_table.shape[1], device=block_table.device)
    indices = block_table[columns[None, :] < pages[:, None]].to(torch.int32)
    last_page_len = (seq_lens - 1) % block_size + 1
    return indptr, indices, last_page_len.to(torch.int32)


class _FlashInferDecodeBase(abc.ABC):
    """Shared empty-shard handling and workspace for the GQA and MLA wrappers."""

    def __init__(self, device: torch.device) -> None:
        self._flashinfer = _import_flashinfer()
        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)

    @abc.abstractmethod
    def _run_nonempty(
        self, query: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FlashInfer's (out, base-2 lse) for rows that all have >= 1 token."""

    @abc.abstractmethod
    def _value_dim(self) -> int:
        """Width of the output per head."""

    def __call__(
        self, query: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, _ = query.shape
        out = query.new_zeros(batch, heads, self._value_dim())
        lse = torch.full((batch, heads), float("-inf"), dtype=torch.float32, device=query.device)
        rows = torch.nonzero(seq_lens > 0).flatten()
        if rows.numel():
            part_out, part_lse = self._run_nonempty(
                query[rows].contiguous(), block_table[rows], seq_lens[rows].to(torch.int32)
            )
            out[rows] = part_out.to(out.dtype)
            lse[rows] = part_lse.float() * LN2
        return out, lse


class FlashInferDecode(_FlashInferDecodeBase):
    """GQA/MHA decode over ``[num_blocks, block_size, kv_heads, head_dim]`` K and V caches."""

    def __init__(
        self, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float
    ) -> None:
        super().__init__(key_cache.device)
        self.key_cache, self.value_cache, self.scale = key_cache, value_cache, scale
        self._wrapper = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD")

    def _value_dim(self) -> int:
        return self.value_cache.shape[-1]

    def _run_nonempty(
        self, query: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block_size, kv_heads, head_dim = self.key_cache.shape[1:]
        indptr, indices, last_page_len = _csr_pages(block_table, seq_lens, block_size)
        self._wrapper.plan(
            indptr, indices, last_page_len,
            num_qo_heads=query.shape[1], num_kv_heads=kv_heads, head_dim=head_dim,
            page_size=block_size, sm_scale=self.scale,
            q_data_type=query.dtype, kv_data_type=self.key_cache.dtype,
        )
        return self._wrapper.run(query, (self.key_cache, self.value_cache), return_lse=True)


class FlashInferMLADecode(_FlashInferDecodeBase):
    """MLA decode over a ``[num_blocks, block_size, kv_lora_rank + rope_dim]`` latent cache."""

    def __init__(self, latent_cache: torch.Tensor, scale: float, kv_lora_rank: int) -> None:
        super().__init__(latent_cache.device)
        self.scale, self.kv_lora_rank = scale, kv_lora_rank
        self.ckv_cache = latent_cache[..., :kv_lora_rank]
        self.kpe_cache = latent_cache[..., kv_lora_rank:]
        self._wrapper = self._flashinfer.BatchMLAPagedAttentionWrapper(self._workspace)

    def _value_dim(self) -> int:
        return self.kv_lora_rank

    def _run_nonempty(
        self, query: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block_size = self.ckv_cache.shape[1]
        indptr, indices, _ = _csr_pages(block_table, seq_lens, block_size)
        qo_indptr = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=query.device)
        self._wrapper.plan(
            qo_indptr, indptr, indices, seq_lens,
            num_heads=query.shape[1], head_dim_ckv=self.kv_lora_rank,
            head_dim_kpe=self.kpe_cache.shape[-1], page_size=block_size, causal=False,
            sm_scale=self.scale, q_data_type=query.dtype, kv_data_type=self.ckv_cache.dtype,
        )
        return self._wrapper.run(
            query[..., : self.kv_lora_rank], query[..., self.kv_lora_rank:],
            self.ckv_cache, self.kpe_cache, return_lse=True,
        )
