"""CPU benchmark: Helix's per-shard decode kernels beside vLLM's own CPU decode kernels, on the same cache.

One rank's share of a decode step (what a vLLM worker runs per layer), on one
thread as in a served worker (``VLLM_CPU_OMP_THREADS_BIND`` gives each worker one
core), 8 query heads, the twins' shapes and the block sizes vLLM serves them with:

* GQA: head dim 64, 1 KV head, 128-token blocks. vLLM's kernel is
  ``_C::cpu_attention_with_kv_cache`` (the ``CPU_ATTN`` backend, ISA chosen by
  vLLM's own ``_get_attn_isa``) on vLLM's cache, written by vLLM's
  ``cpu_attn_reshape_and_cache`` from the same keys and values Helix's ``[K|V]``
  cache holds.
* MLA: latent 512 + 64, absorbed query, 16-token blocks. vLLM's kernel is
  ``_C::mla_decode_kvcache`` (the ``CPU_MLA`` backend) on the very same latent cache.

vLLM's kernels return no LSE, so they cannot serve Helix; they are the speed to
match. ``vllm_tp`` is vLLM's kernel as a TP=2 rank runs it on the same cache: half
of the 8 query heads (TP splits the heads; with one KV head every TP rank reads
the whole cache), i.e. the per-byte rate Helix's rank, running all 8 heads over
half the cache, competes with when served. Helix's are the C++ decode kernel (``native``, the served path), torch's
flash kernel (``flash``) and, for the short shards, the plain-torch reference.
Every kernel's output is checked against vLLM's before timing; times are medians
of interleaved repeats. Bandwidth is KV bytes read per second, against this
machine's single-thread read bandwidth (a streaming ``sum`` over 1 GiB) and copy
bandwidth (``copy_``, bytes read + written), measured in the same run.

Writes ``benchmarks/results/shard_kernels_cpu.{json,md}``.

    .venv/bin/python -m benchmarks.shard_kernels_cpu [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from vllm_helix.attention import paged_decode_mla, paged_extend
from vllm_helix.harness.machine import machine_sentence
from vllm_helix.harness.results_page import stamped, write_page

RESULTS = Path(__file__).parent / "results"
HEADS, HEAD_DIM, LATENT, KV_LORA_RANK = 8, 64, 576, 512
BLOCK = {"gqa": 128, "mla": 16}
SCALE = 0.125
KERNELS = ("vllm", "native", "flash", "reference")
REFERENCE_MAX_TOKENS = 65536  # the reference gathers and materialises scores: shorter shards only


def _interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per kernel, the kernels taking turns so that machine noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bandwidth_gb_per_s(repeats: int = 5) -> dict[str, float]:
    """Single-thread read (sum) and copy (read + write) bandwidth over 1 GiB, in GB/s."""
    source = torch.ones(256 << 20)  # 1 GiB of float32
    target = torch.empty_like(source)
    nbytes = source.numel() * 4
    times = _interleaved_medians({"read": lambda: source.sum(), "copy": lambda: target.copy_(source)}, repeats)
    return {"read": round(nbytes / times["read"] / 1e9, 2), "copy": round(2 * nbytes / times["copy"] / 1e9, 2)}


def _table(batch: int, blocks_per_seq: int, order: str, gen: torch.Generator) -> torch.Tensor:
    count = batch * blocks_per_seq
    ids = torch.arange(count) if order == "contiguous" else torch.randperm(count, generator=gen)
    return ids.view(batch, blocks_per_seq).to(torch.int32)


def gqa_runs(context: int, batch: int, order: str, gen: torch.Generator) -> tuple[dict, int]:
    """Helix's K|V cache and vLLM's CPU_ATTN cache, holding the same keys and values."""
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    block = BLOCK["gqa"]
    table = _table(batch, context // block, order, gen)
    num_blocks = table.numel()
    helix_cache = torch.randn(num_blocks, block, 1, 2 * HEAD_DIM, generator=gen)
    keys, values = helix_cache[..., :HEAD_DIM], helix_cache[..., HEAD_DIM:]
    isa = _get_attn_isa(torch.float32, block, HEAD_DIM)
    vllm_cache = torch.empty(num_blocks, 1, 2 * block, HEAD_DIM)
    vllm_keys, vllm_values = vllm_cache.chunk(2, dim=2)
    slots = torch.arange(num_blocks * block)
    ops.cpu_attn_reshape_and_cache(keys.reshape(-1, 1, HEAD_DIM), values.reshape(-1, 1, HEAD_DIM), vllm_keys,
                                   vllm_values, slots, isa)
    query = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    lens = torch.full((batch,), context)
    seq_lens = lens.to(torch.int32)
    query_start = torch.arange(batch + 1, dtype=torch.int32)

    def vllm_kernel(heads: int) -> Callable[[], torch.Tensor]:
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=batch, num_heads=heads, num_kv_heads=1, head_dim=HEAD_DIM, seq_lens=seq_lens,
            dtype=torch.float32, query_start_loc=query_start, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=False)
        head_query = query[:, :heads].contiguous()
        out = torch.empty(batch, heads, HEAD_DIM)

        def run() -> torch.Tensor:
            ops.cpu_attention_with_kv_cache(
                query=head_query, key_cache=vllm_keys, value_cache=vllm_values, output=out,
                query_start_loc=query_start, seq_lens=seq_lens, scale=SCALE, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=table, softcap=0.0, scheduler_metadata=metadata, s_aux=None)
            return out
        return run

    def helix(kernel: str) -> Callable[[], torch.Tensor]:
        return lambda: paged_extend(query, keys, values, table, lens, SCALE, kernel=kernel)[0]
    runs = {"vllm": vllm_kernel(HEADS), "vllm_tp": vllm_kernel(HEADS // 2), **{k: helix(k) for k in KERNELS[1:]}}
    return runs, batch * context * 2 * HEAD_DIM * 4


def mla_runs(context: int, batch: int, order: str, gen: torch.Generator) -> tuple[dict, int]:
    """One latent cache, read by vLLM's CPU_MLA decode and by Helix's kernels."""
    import vllm._custom_ops as ops

    block = BLOCK["mla"]
    table = _table(batch, context // block, order, gen)
    cache = torch.randn(table.numel(), block, LATENT, generator=gen)
    query = torch.randn(batch, HEADS, LATENT, generator=gen)
    lens = torch.full((batch,), context)

    def vllm_kernel(heads: int) -> Callable[[], torch.Tensor]:
        head_query, out = query[:, :heads].contiguous(), torch.empty(batch, heads, KV_LORA_RANK)

        def run() -> torch.Tensor:
            ops.mla_decode_kvcache_cpu(out, head_query, cache, SCALE, table, lens.to(torch.int32))
            return out
        return run

    def helix(kernel: str) -> Callable[[], torch.Tensor]:
        return lambda: paged_decode_mla(query, cache, table, lens, SCALE, KV_LORA_RANK, kernel=kernel)[0]
    runs = {"vllm": vllm_kernel(HEADS), "vllm_tp": vllm_kernel(HEADS // 2), **{k: helix(k) for k in KERNELS[1:]}}
    return runs, batch * context * LATENT * 4


def decode_case(kind: str, context: int, batch: int, order: str, repeats: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(context + batch)
    runs, kv_bytes = (gqa_runs if kind == "gqa" else mla_runs)(context, batch, order, gen)
    if batch * context > REFERENCE_MAX_TOKENS:
        del runs["reference"]
    expected = runs["vllm"]().clone()
    diffs = {}
    for name, run in runs.items():
        if name != "vllm":
            out = run()
            diffs[name] = float((out - expected[:, :out.shape[1]]).abs().max())  # vllm_tp: the first heads
    seconds = _interleaved_medians(runs, repeats)
    return {"kind": kind, "context": context, "batch": batch, "blocks": order, "kv_bytes": kv_bytes,
            "ms": {name: round(1e3 * s, 3) for name, s in seconds.items()},
            "gb_per_s": {name: round(kv_bytes / s / 1e9, 2) for name, s in seconds.items()},
            "max_abs_diff_vs_vllm": diffs}


def markdown(payload: dict) -> str:
    bw = payload["bandwidth"]
    lines = [
        "# Per-shard decode kernels on CPU: Helix's beside vLLM's own, on the same cache",
        "",
        machine_sentence(payload["machine"], payload["date"], " (benchmark on 1 thread, as a served worker)"),
        f"This machine, one thread, in the same run: read bandwidth {bw['read']:.1f} GB/s (streaming sum over "
        f"1 GiB), copy bandwidth {bw['copy']:.1f} GB/s (read + written). One rank's shard, 8 query heads; GQA: head "
        "dim 64, 1 KV head, 128-token blocks (vLLM's `cpu_attention_with_kv_cache` on vLLM's cache with the same "
        "keys and values); MLA: latent 512 + 64, absorbed query, 16-token blocks (vLLM's `mla_decode_kvcache` on "
        "the same cache). vLLM's kernels return no LSE; Helix's do. Medians of interleaved repeats; GB/s is KV "
        "bytes read per second; '% read bw' is native's against the read bandwidth. Reproduce: "
        "`.venv/bin/python -m benchmarks.shard_kernels_cpu`.",
        "",
        "| kind | shard tokens | batch | blocks | vLLM ms | native ms | flash ms | reference ms | vLLM GB/s | "
        "native GB/s | flash GB/s | native / vLLM speed | native % read bw | vLLM as a TP=2 rank GB/s | "
        "native / TP-rank vLLM GB/s | max diff vs vLLM |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        ms, gb = r["ms"], r["gb_per_s"]
        reference = f"{ms['reference']:.2f}" if "reference" in ms else "-"
        lines.append(
            f"| {r['kind']} | {r['context']:,} | {r['batch']} | {r['blocks']} | {ms['vllm']:.2f} | "
            f"{ms['native']:.2f} | {ms['flash']:.2f} | {reference} | {gb['vllm']:.1f} | {gb['native']:.1f} | "
            f"{gb['flash']:.1f} | {ms['vllm'] / ms['native']:.2f}x | {100 * gb['native'] / bw['read']:.0f}% | "
            f"{gb['vllm_tp']:.1f} | {gb['native'] / gb['vllm_tp']:.2f}x | "
            f"{max(r['max_abs_diff_vs_vllm'].values()):.1e} |")
    lines += ["", "## Reading", "", *payload["reading"]]
    return "\n".join(lines) + "\n"


def reading(rows: list[dict], bandwidth: dict[str, float]) -> list[str]:
    """Summary lines computed from the rows (nothing typed in by hand)."""
    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}x" if values else "n/a"

    def ratio(kind: str, select: Callable[[dict], bool], a: str, b: str) -> str:
        return span([r["ms"][b] / r["ms"][a] for r in rows if r["kind"] == kind and select(r)])

    longest = {kind: max(r["context"] for r in rows if r["kind"] == kind) for kind in ("gqa", "mla")}
    long_rows = [r for r in rows if r["context"] == longest[r["kind"]]]
    return [
        f"- Speed of Helix's C++ kernel relative to vLLM's (vLLM time / native time; above 1 is faster): GQA "
        f"{ratio('gqa', lambda r: True, 'native', 'vllm')}, MLA {ratio('mla', lambda r: True, 'native', 'vllm')}. "
        f"At the longest shards (GQA {longest['gqa']:,}, MLA {longest['mla']:,} tokens, DRAM-bound): GQA "
        f"{ratio('gqa', lambda r: r['context'] == longest['gqa'], 'native', 'vllm')}, MLA "
        f"{ratio('mla', lambda r: r['context'] == longest['mla'], 'native', 'vllm')}.",
        f"- Against the flash kernel it replaces for decode: GQA {ratio('gqa', lambda r: True, 'native', 'flash')}, "
        f"MLA {ratio('mla', lambda r: True, 'native', 'flash')} (flash time / native time).",
        f"- The physical limit: at the longest shards native reads "
        f"{min(r['gb_per_s']['native'] for r in long_rows):.1f}-{max(r['gb_per_s']['native'] for r in long_rows):.1f}"
        f" GB/s and vLLM {min(r['gb_per_s']['vllm'] for r in long_rows):.1f}-"
        f"{max(r['gb_per_s']['vllm'] for r in long_rows):.1f} GB/s, against {bandwidth['read']:.1f} GB/s of "
        "single-thread streaming read on this machine.",
        f"- Per byte against vLLM's kernel as a TP=2 rank runs it (4 of the 8 heads, the whole cache): native "
        f"{span([r['gb_per_s']['native'] / r['gb_per_s']['vllm_tp'] for r in long_rows if r['kind'] == 'gqa'])} "
        f"(GQA) and {span([r['gb_per_s']['native'] / r['gb_per_s']['vllm_tp'] for r in long_rows if r['kind'] == 'mla'])}"
        " (MLA) at the longest shards. This is the rate that sets the served ratio: a Helix rank reads half "
        "the bytes of a TP rank, so Helix's attention takes half TP's time only if it reads a byte as fast.",
        "- Block order does not matter to the C++ kernel (it reads blocks in place through the table); flash "
        "gathers scattered blocks first.",
        f"- Differences from vLLM's output: GQA at most "
        f"{max(max(r['max_abs_diff_vs_vllm'].values()) for r in rows if r['kind'] == 'gqa'):.1e}, MLA at most "
        f"{max(max(r['max_abs_diff_vs_vllm'].values()) for r in rows if r['kind'] == 'mla'):.1e} (each kernel "
        "sums in its own order); Helix's kernels are tested against "
        "float64 in tests/attention/test_cpu_native.py and test_cpu_flash.py.",
        "- What the served path uses: GQA decode runs native (on par with vLLM's kernel where DRAM-bound, faster "
        "on short shards and scattered blocks); MLA decode runs flash, the fastest on contiguous runs of the "
        "576-dim latent but slower than vLLM's and native's on scattered blocks (it gathers them first); native "
        "beats vLLM's CPU MLA decode on every row.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short shards, few repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    contexts = {"gqa": (8192, 65536) if args.quick else (8192, 65536, 524288),
                "mla": (8192, 32768) if args.quick else (8192, 65536, 262144)}
    repeats = 3 if args.quick else 7
    bandwidth = bandwidth_gb_per_s()
    print(bandwidth, flush=True)
    rows = []
    for kind in ("gqa", "mla"):
        for context in contexts[kind]:
            for batch in (1, 4):
                for order in ("contiguous", "shuffled"):
                    if batch * context * (LATENT if kind == "mla" else 2 * HEAD_DIM) * 4 > 2 << 30:
                        continue  # over 2 GB of cache: the machine has 24 GiB for all kernels' copies
                    rows.append(decode_case(kind, context, batch, order, repeats))
                    print(rows[-1], flush=True)
    payload = stamped({"bandwidth": bandwidth, "rows": rows, "reading": reading(rows, bandwidth)})
    print(write_page(RESULTS, "shard_kernels_cpu", payload, markdown))


if __name__ == "__main__":
    main()
