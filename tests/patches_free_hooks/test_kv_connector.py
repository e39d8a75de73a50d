"""Prefill on one engine, decode on another through ``HelixConnector``.

Scheduler half on its own (fast): which tokens are saved when (chunked prefill,
preemption), how many are loaded and into which blocks (never a prefix-cached one),
how writer reports publish or drop an entry, keys. End to end (slow: real vLLM
engines): a prefill engine (``kv_producer``, one greedy token) writes each prompt's KV
to a directory (for the Llama twin, two producers at once into the same store); a
decode engine (``kv_consumer``) loads it and decodes. Its tokens and logprobs must
equal one engine that did both, for plain -> Helix (both twins, stripes 16 and the
block size) and Helix -> plain, with prompt lengths that are and are not multiples of
``block_size * kvp``. The consumer's log must show the load of all but the last
prompt token (a decode that silently recomputed the prompt would also match).

Faults (issue 26), on the same engines: entries of further prompts damaged in the store
(torn, corrupted, missing, misshapen and foreign-dtype parts, a producer killed
mid-write) cost only the requests that touch them: under
``kv_load_failure_policy="recompute"`` every request still equals one engine, under
``"fail"`` those requests alone fail; a full disk on
the producer drops its entries and answers every request; and with prefix caching on,
a load after a local prefix hit leaves the shared blocks alone (a poisoned prefix in
the store reaches no request).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM not installed: pip install 'vllm-helix[cpu]'")

from vllm.config import KVTransferConfig  # noqa: E402

from vllm_helix.kv_store import (DTYPES, MANIFEST, STAGING_PREFIX, KVFileStore, entry_key,  # noqa: E402
                                 part_file)

from patches_free_hooks.kv_connector import (HelixConnector, HelixWorkerMetadata, KVConnectorRole,  # noqa: E402
                                             _Placement)
from vllm_helix.config import from_additional_config  # noqa: E402
from vllm_helix.harness.server import EXACT_ROPE_KWARGS  # noqa: E402
from vllm_helix.striping import KVStriping  # noqa: E402

MAX_TOKENS = 12
LOGPROB_TOL = 1e-3  # the equality tests' tolerance (test_generation.py)
# the plain engine every split is compared with (shared with the other modules' equality tests)
# (twin, block size, prompt lengths): 512 is a multiple of block * kvp for both twins, 600 of neither
TWINS = {"llama1": (128, (512, 600)), "deepseek": (16, (512, 600))}
# damage done to one prompt's entry each. A missing part is an entry not fully visible yet (the
# consumer waits load_timeout_s, then computes the prompt); a producer killed mid-write leaves only a
# staging directory. Both are misses; the others fail their load's checks.
FAULTS = ("torn", "flipped", "missing part", "misshapen", "wrong dtype", "killed mid-write")
LOAD_FAILURES = ("torn", "flipped", "misshapen", "wrong dtype")
PREFIX = 256  # the Llama twin's Helix block-table entry: block 128 x kvp 2 tokens


def _prompts(lengths: tuple[int, ...], seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 2000) for _ in range(n)] for n in lengths]


def _trio() -> list[list[int]]:
    """Three prompts sharing a PREFIX-token prefix (A, B, C)."""
    prefix, = _prompts((PREFIX,), seed=3)
    return [prefix + tail for tail in _prompts((44, 64, 54), seed=5)]


def _transfer(role: str, path: Path, policy: str = "fail") -> dict[str, Any]:
    return {"kv_transfer_config": {"kv_connector": "HelixConnector", "kv_role": role, "kv_load_failure_policy": policy,
                                   "kv_connector_extra_config": {"path": str(path), "load_timeout_s": 1}}}


def _loaded(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"HelixConnector: loading (\d+) tokens", log)]


def _failed_keys(log: str) -> set[str]:
    return set(re.findall(r"HelixConnector: load of ([0-9a-f]{12}) failed", log))


def _store_key(model: Path, prompt: list[int]) -> str:
    engine = {"model": str(model), "revision": None, "quantization": None, "dtype": "float32",
              "kv_cache_dtype": "float32"}
    return entry_key(engine, prompt)


def _damage(store: KVFileStore, key: str, how: str) -> None:
    entry = store.entry(key)
    manifest = json.loads((entry / MANIFEST).read_text())
    part = entry / part_file(manifest["layers"][-1], next(iter(manifest["parts"])))
    if how == "torn":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif how == "flipped":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0x10
        part.write_bytes(bytes(data))
    elif how == "missing part":
        part.unlink()
    elif how in ("misshapen", "wrong dtype"):
        manifest.update({"row": 1} if how == "misshapen" else {"dtype": "float16"})
        (entry / MANIFEST).write_text(json.dumps(manifest))
    elif how == "killed mid-write":
        (entry / MANIFEST).unlink()
        entry.rename(store.root / f"{STAGING_PREFIX}{key[:16]}-killed")
    else:
        raise AssertionError(how)


def _poison_prefix(store: KVFileStore, key: str, upto: int) -> None:
    """Re-publish ``key`` with rows of positions < ``upto`` replaced by garbage (a well-formed entry)."""
    with store.reader(key) as entry:
        manifest = entry.manifest
        heads = range(0, max(info["heads"][1] for info in manifest["parts"].values()))
        rows = {layer: entry.read_layer(layer, heads, manifest["tokens"], DTYPES[manifest["dtype"]], manifest["row"])
                for layer in manifest["layers"]}
    shutil.rmtree(store.entry(key))
    staging = store.begin(key)
    records = []
    for layer, values in rows.items():
        values[:upto] = 3.0
        records.append(store.write_part(staging, layer, "r0", torch.arange(manifest["tokens"]), heads, values))
    assert store.publish(staging, key, manifest["tokens"], manifest["layers"], {"r0": heads}, records)


@pytest.fixture(scope="module")
def runs(twins: dict[str, Path], generate: Callable[..., dict[str, Any]], plain: Callable[..., dict[str, Any]],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One engine per role and twin; each consumer plays a split case and a fault case at once.

    The producers store every prompt; then the fault prompts' entries are damaged in place
    (one way each) and, for the Llama twin, the prefix trio is set up. The stripe-16
    consumer (``recompute``) loads the intact prompts and meets every fault; the Llama
    twin's block-stripe consumer does the same under ``fail``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, (block, lengths) in TWINS.items():
        extra = EXACT_ROPE_KWARGS if name == "deepseek" else {}
        prompts, faults = _prompts(lengths), _prompts((300, 310, 320, 330, 340, 350), seed=11)
        trio = _trio() if name == "llama1" else []
        out[f"{name}/prompts"] = {"base": prompts, "faults": faults, "trio": trio}
        out[f"{name}/single"] = plain(name, prompts + faults + trio, MAX_TOKENS)
        path = tmp_path_factory.mktemp(f"{name}-plain") / "kv"
        producers = 2 if name == "llama1" else 1  # two producers of the same prompts race into one store
        with ThreadPoolExecutor(producers) as pool:
            list(pool.map(lambda _: generate(twins[name], prompts + faults + trio, 1, **extra,
                                             **_transfer("kv_producer", path)), range(producers)))
        store = KVFileStore(path)
        for how, prompt in zip(FAULTS, faults):
            _damage(store, _store_key(twins[name], prompt), how)
        rounds = {}
        if trio:  # A computed locally first; B then hits A's prefix and loads the rest; C reuses the prefix
            _poison_prefix(store, _store_key(twins[name], trio[1]), PREFIX)
            for prompt in (trio[0], trio[2]):
                shutil.rmtree(store.entry(_store_key(twins[name], prompt)))
            rounds = {"rounds": [[trio[1]], [trio[2]]]}
        out[f"{name}/plain->helix stripe 16"] = generate(
            twins[name], prompts + faults + trio[:1], MAX_TOKENS, **extra, **HELIX16,
            **_transfer("kv_consumer", path, policy="recompute"), **rounds)
        if name == "llama1":
            out[f"{name}/plain->helix stripe {block}"] = generate(
                twins[name], prompts + faults, MAX_TOKENS, **_transfer("kv_consumer", path, policy="fail"),
                additional_config={"helix": {"kvp": 2, "tpa": 1, "stripe": block}})
    path = tmp_path_factory.mktemp("llama1-helix") / "kv"
    prompts = _prompts(TWINS["llama1"][1])
    generate(twins["llama1"], prompts, 1, **HELIX16, **_transfer("kv_producer", path))
    out["llama1/helix->plain"] = generate(twins["llama1"], prompts, MAX_TOKENS, **_transfer("kv_consumer", path))
    return out


HELIX16 = {"additional_config": {"helix": {"kvp": 2, "tpa": 1, "stripe": 16}}}
CASES = [("llama1", "plain->helix stripe 16"), ("llama1", "plain->helix stripe 128"),
         ("deepseek", "plain->helix stripe 16"), ("llama1", "helix->plain")]
RECOMPUTE, FAIL = "plain->helix stripe 16", "plain->helix stripe 128"  # the fault policies' runs


def _assert_equal(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert ours["ids"] == theirs["ids"]
    assert max(abs(a - b) for a, b in zip(ours["logprobs"], theirs["logprobs"])) < LOGPROB_TOL


@pytest.mark.slow
@pytest.mark.parametrize(("twin", "case"), CASES)
def test_a_split_decode_equals_one_engine(runs: dict[str, dict[str, Any]], twin: str, case: str) -> None:
    single, split = runs[f"{twin}/single"], runs[f"{twin}/{case}"]
    base = runs[f"{twin}/prompts"]["base"]
    wanted = sorted(len(p) - 1 for p in base)  # each intact prompt loaded whole but its last token, once
    assert sorted(n for n in _loaded(split["log"]) if n in wanted) == wanted, split["log"][-3000:]
    for ours, theirs in zip(split["results"][:len(base)], single["results"]):
        _assert_equal(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("twin", list(TWINS))
def test_a_damaged_store_costs_only_a_recompute_of_the_requests_it_touches(runs: dict[str, dict[str, Any]],
                                                                         twins: dict[str, Path], twin: str) -> None:
    single, damaged, prompts = runs[f"{twin}/single"], runs[f"{twin}/{RECOMPUTE}"], runs[f"{twin}/prompts"]
    log = damaged["log"]
    assert len(damaged["results"]) == len(single["results"])  # the engine served every request
    for ours, theirs in zip(damaged["results"], single["results"]):
        _assert_equal(ours, theirs)
    failing = {_store_key(twins[twin], p)[:12] for how, p in zip(FAULTS, prompts["faults"]) if how in LOAD_FAILURES}
    assert _failed_keys(log) == failing, log[-4000:]
    assert "Recovered from KV load failure" in log
    assert "stayed invisible" in log  # the missing part: a bounded wait, then computed
    counters = {name.removeprefix("vllm:helix_kv_").removesuffix("_total"): value
                for name, value in damaged["connector"].items()}
    assert counters["load_failures"] == len(failing), counters
    assert counters["hits"] >= len(prompts["base"]) + len(failing) and counters["loaded_bytes"] > 0, counters
    if prompts["trio"]:  # B loaded only what follows the prefix A left in vLLM's cache
        b = prompts["trio"][1]
        assert f"loading {len(b) - 1 - PREFIX} tokens of a {len(b)}-token prompt (positions {PREFIX}.." in log


@pytest.mark.slow
def test_under_the_fail_policy_only_the_damaged_requests_fail(runs: dict[str, dict[str, Any]]) -> None:
    single, failed, prompts = runs["llama1/single"], runs[f"llama1/{FAIL}"], runs["llama1/prompts"]
    kinds = ["intact"] * len(prompts["base"]) + list(FAULTS)
    assert len(failed["results"]) == len(kinds)
    for kind, ours, theirs in zip(kinds, failed["results"], single["results"]):
        if kind not in LOAD_FAILURES:
            _assert_equal(ours, theirs)
        else:
            assert ours["finish_reason"] == "error", (kind, ours)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 64 KiB file system for the producer's store (needs mount rights: root, as in CI)."""
    mount = tmp_path_factory.mktemp("full")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a full-disk producer needs a small tmpfs and this user cannot mount one ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_drops_the_entries_and_answers_every_request(full_disk: Path, twins: dict[str, Path],
                                                                generate: Callable[..., dict[str, Any]],
                                                                runs: dict[str, dict[str, Any]]) -> None:
    prompts = runs["llama1/prompts"]["base"]
    produced = generate(twins["llama1"], prompts, 1, **_transfer("kv_producer", full_disk))
    for ours, theirs in zip(produced["results"], runs["llama1/single"]["results"]):
        assert ours["ids"] == theirs["ids"][:1]
    assert produced["log"].count("not stored") >= len(prompts), produced["log"][-3000:]
    assert list(full_disk.iterdir()) == []  # no entry, no staging directory, no temporary file


# ------------------------------------------------------------------ scheduler half, no engine
def _parallel(helix: dict | None, block: int) -> SimpleNamespace:
    """vLLM's parallel settings as the engine hook leaves them for ``helix``."""
    layout = from_additional_config({"helix": helix}) if helix else None
    return SimpleNamespace(tensor_parallel_size=layout.world_size if layout else 1,
                           decode_context_parallel_size=layout.kvp if layout else 1,
                           cp_kv_cache_interleave_size=layout.stripe_for(block) if layout else 1)


def _connector(tmp_path: Path, role: str = "kv_both", helix: dict | None = None, block: int = 16,
               **extra: Any) -> HelixConnector:
    config = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(kv_connector="HelixConnector", kv_role=role,
                                            kv_connector_extra_config={"path": str(tmp_path / "kv"), **extra}),
        model_config=SimpleNamespace(model="twin", dtype=torch.float32, use_mla=False, revision=None,
                                     quantization=None, get_total_num_kv_heads=lambda: 1, get_head_size=lambda: 2),
        cache_config=SimpleNamespace(block_size=block, cache_dtype="auto"),
        parallel_config=_parallel(helix, block),
        additional_config={"helix": helix} if helix else {})
    groups = SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=["L1", "L0"])])
    return HelixConnector(config, KVConnectorRole.SCHEDULER, groups)


def _request(req_id: str, tokens: list[int], **extra: Any) -> SimpleNamespace:
    fields = {"lora_request": None, "mm_features": None, "cache_salt": None, "prompt_embeds": None, **extra}
    return SimpleNamespace(request_id=req_id, prompt_token_ids=tokens, **fields)


def _key(connector: HelixConnector, tokens: list[int], **extra: Any) -> str:
    return connector._key(_request(f"key-{random.random()}", tokens, **extra))


def _step(new: list = (), cached: list = (), scheduled: dict | None = None) -> SimpleNamespace:
    """A SchedulerOutput with ``new`` (req_id, prompt, block_ids, num_computed) and ``cached``
    (req_id, new_block_ids, num_computed, resumed) requests."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, prompt_token_ids=p, block_ids=(b,), num_computed_tokens=c)
                            for r, p, b, c in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, *_ in cached], new_block_ids=[None if b is None else (b,) for _, b, _, _ in cached],
            num_computed_tokens=[c for _, _, c, _ in cached], resumed_req_ids={r for r, _, _, res in cached if res}),
        num_scheduled_tokens=scheduled or {})


def _admit(connector: HelixConnector, request: SimpleNamespace, external: int = 0) -> None:
    """What vLLM's scheduler does for a waiting request: look up, allocate, tell the connector."""
    connector.get_num_new_matched_tokens(request, 0)
    connector.update_state_after_alloc(request, None, external)


def _write_as_workers(connector: HelixConnector, save: Any, rows: int = 4) -> HelixWorkerMetadata:
    """The parts every writer rank writes in the saving step, reported as vLLM carries worker metadata."""
    meta = HelixWorkerMetadata()
    for layer in ("L0", "L1"):
        for part, heads in connector._placement.writer_parts().items():
            record = connector._store.write_part(save.staging, layer, part, torch.arange(save.end), heads,
                                                 torch.zeros(save.end, len(heads), rows))
            meta.records.setdefault(save.staging, []).append(record)
    return meta


def test_a_chunked_prompt_is_saved_once_its_last_chunk_ran_and_published_when_its_writers_report(
        tmp_path: Path) -> None:
    connector, prompt = _connector(tmp_path, "kv_producer"), list(range(40))
    _admit(connector, _request("a", prompt))
    key = _key(connector, prompt)
    assert connector.build_connector_meta(_step(new=[("a", prompt, [3, 1], 0)], scheduled={"a": 32})).saves == []
    meta = connector.build_connector_meta(_step(cached=[("a", [7], 32, False)], scheduled={"a": 8}))
    assert [(t.key, t.block_ids, t.start, t.end) for t in meta.saves] == [(key, [3, 1, 7], 0, 40)]
    assert connector._store.status(key) == (0, True)  # the saving step has not run yet
    report = _write_as_workers(connector, meta.saves[0])
    connector.request_finished(_request("a", prompt), ([3, 1, 7],))  # vLLM finishes it before the output update
    connector.update_connector_output(SimpleNamespace(kv_connector_worker_meta=report, invalid_block_ids=set()))
    assert connector._store.status(key) == (40, True)  # published before vLLM answers the request
    assert [p.name for p in connector._store.root.iterdir()] == [key]  # staging moved into place
    assert connector.get_kv_connector_stats().data["saved_entries"] == 1
    # the same prompt again is not saved twice
    _admit(connector, _request("b", prompt))
    assert connector.build_connector_meta(_step(new=[("b", prompt, [5, 6, 8], 0)], scheduled={"b": 40})).saves == []


def test_a_writer_error_drops_the_entry_whole_and_counts_it(tmp_path: Path) -> None:
    connector, prompt = _connector(tmp_path, "kv_producer"), list(range(20))
    _admit(connector, _request("a", prompt))
    save, = connector.build_connector_meta(_step(new=[("a", prompt, [0, 1], 0)], scheduled={"a": 20})).saves
    report = _write_as_workers(connector, save)
    report.failed[save.staging] = "rank r0 writing L1: [Errno 28] No space left on device"
    connector.update_connector_output(SimpleNamespace(kv_connector_worker_meta=report, invalid_block_ids=set()))
    assert list(connector._store.root.iterdir()) == []  # nothing left behind
    assert connector.get_kv_connector_stats().data["save_failures"] == 1
    # a save whose writers never report is dropped after a few steps, not kept forever
    _admit(connector, _request("b", prompt[:10]))
    connector.build_connector_meta(_step(new=[("b", prompt[:10], [2], 0)], scheduled={"b": 10}))
    for _ in range(5):
        connector.update_connector_output(SimpleNamespace(kv_connector_worker_meta=None, invalid_block_ids=set()))
    assert list(connector._store.root.iterdir()) == [] and connector._saving == {}
    # a prompt above max_bytes is not staged at all
    small = _connector(tmp_path, "kv_producer", max_bytes=100)
    _admit(small, _request("c", prompt))
    assert small.build_connector_meta(_step(new=[("c", prompt, [0, 1], 0)], scheduled={"c": 20})).saves == []
    assert small.get_kv_connector_stats().data["save_failures"] == 1


def _publish(connector: HelixConnector, tokens: list[int], stored: int, **extra: Any) -> str:
    key = _key(connector, tokens, **extra)
    staging = connector._store.begin(key)
    records = [connector._store.write_part(staging, layer, "r0", torch.arange(stored), range(0, 1),
                                           torch.zeros(stored, 1, 4)) for layer in ("L0", "L1")]
    connector._store.publish(staging, key, stored, ["L0", "L1"], {"r0": range(0, 1)}, records)
    return key


@pytest.mark.parametrize(("helix", "stored", "prompt", "loaded"), [
    (None, 40, 41, 40), (None, 40, 40, 39), (None, 40, 33, 32), (None, 40, 2, 1), (None, 40, 1, 0),
    ({"kvp": 2, "tpa": 1}, 40, 41, 40), ({"kvp": 2, "tpa": 1}, 40, 17, 16),
])
def test_a_consumer_loads_all_but_the_last_prompt_token(tmp_path: Path, helix: dict | None,
                                                        stored: int, prompt: int, loaded: int) -> None:
    connector = _connector(tmp_path, "kv_consumer", helix)
    tokens = list(range(prompt))
    request = _request("r", tokens)
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)  # nothing stored
    key = _publish(connector, tokens, stored)
    assert connector.get_num_new_matched_tokens(request, 0) == (loaded, False)
    assert connector.get_num_new_matched_tokens(request, 16) == (max(0, loaded - 16), False)
    if loaded:
        connector.update_state_after_alloc(request, None, loaded)
        meta = connector.build_connector_meta(_step(new=[("r", tokens, [4, 2], loaded)]))
        assert [(t.key, t.block_ids, t.start, t.end) for t in meta.loads] == [(key, [4, 2], 0, loaded)]
        # preempted and resumed: loaded again into its new blocks
        connector.update_state_after_alloc(request, None, loaded)
        meta = connector.build_connector_meta(_step(cached=[("r", [9, 8], loaded, True)]))
        assert [(t.key, t.block_ids, t.start, t.end) for t in meta.loads] == [(key, [9, 8], 0, loaded)]


def test_a_load_after_a_prefix_cache_hit_writes_only_the_blocks_vllm_did_not_have(tmp_path: Path) -> None:
    connector, tokens = _connector(tmp_path, "kv_consumer", {"kvp": 2, "tpa": 1}), list(range(100))
    request = _request("r", tokens)
    _publish(connector, tokens, 100)
    # vLLM's prefix cache holds 64 tokens: two block-table entries of block_size x kvp = 32 tokens
    assert connector.get_num_new_matched_tokens(request, 64) == (99 - 64, False)
    connector.update_state_after_alloc(request, None, 99 - 64)
    load, = connector.build_connector_meta(_step(new=[("r", tokens, [7, 3, 5, 6], 99)])).loads
    assert (load.start, load.end) == (64, 99)
    assert connector._placement.blocks_of(load) == [5, 6]  # blocks 7 and 3 (positions 0..63) are shared: untouched


def test_a_published_entry_whose_parts_stay_invisible_is_a_miss_after_the_timeout(tmp_path: Path) -> None:
    connector, tokens = _connector(tmp_path, "kv_consumer", load_timeout_s=0.2), list(range(10))
    key = _publish(connector, tokens, 10)
    (connector._store.entry(key) / "L1.r0.bin").rename(connector._store.root / "away")
    request = _request("r", tokens)
    assert connector.get_num_new_matched_tokens(request, 0) == (None, False)  # ask again later
    time.sleep(0.3)
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)  # bounded: computed instead


def test_a_broken_manifest_is_a_counted_miss_and_load_errors_are_counted_per_request(tmp_path: Path) -> None:
    connector, tokens = _connector(tmp_path, "kv_consumer"), list(range(10))
    key = _publish(connector, tokens, 10)
    (connector._store.entry(key) / "MANIFEST.json").write_text("{")
    _admit(connector, _request("r", tokens))
    other = list(range(5, 15))
    _publish(connector, other, 10)
    _admit(connector, _request("s", other), external=9)
    connector.build_connector_meta(_step(new=[("s", other, [4], 9)]))
    connector.update_connector_output(SimpleNamespace(kv_connector_worker_meta=None, invalid_block_ids={4}))
    assert {k: v for k, v in connector.get_kv_connector_stats().data.items() if v} == {
        "corrupt_entries": 1, "misses": 1, "hits": 1, "load_failures": 1}


def test_keys_differ_by_lora_salt_image_and_embeddings_and_unrepresentable_requests_are_not_handed_over(
        tmp_path: Path) -> None:
    connector, tokens = _connector(tmp_path, "kv_both"), [1, 2, 3]
    image = lambda ident: [SimpleNamespace(identifier=ident, mm_position=SimpleNamespace(offset=0, length=2))]  # noqa: E731
    keys = {_key(connector, tokens), _key(connector, tokens, cache_salt="alice"),
            _key(connector, tokens, cache_salt="bob"),
            _key(connector, tokens, lora_request=SimpleNamespace(lora_name="a", lora_path="/a")),
            _key(connector, tokens, mm_features=image("img-1")), _key(connector, tokens, mm_features=image("img-2")),
            _key(connector, tokens, prompt_embeds=torch.zeros(3, 4)),
            _key(connector, tokens, prompt_embeds=torch.ones(3, 4))}
    assert len(keys) == 8
    anonymous = _request("x", tokens, mm_features=image(None))
    assert connector.get_num_new_matched_tokens(anonymous, 0) == (0, False) and connector._key(anonymous) is None


@pytest.mark.parametrize(("kv_heads", "tp", "kvp", "parts"), [
    (2, 4, 1, {"r0": range(0, 1), "r2": range(1, 2)}),  # plain TP=4 over 2 heads: the first replica of each writes
    (8, 2, 1, {"r0": range(0, 4), "r1": range(4, 8)}),
    (1, 2, 2, {"r0": range(0, 1), "r1": range(0, 1)}),  # Helix kvp=2: every rank holds its own stripes
    (2, 4, 2, {f"r{r}": range(r // 2, r // 2 + 1) for r in range(4)}),  # Helix kvp=2 x tpa=2
])
def test_writer_parts_name_each_writers_heads(kv_heads: int, tp: int, kvp: int, parts: dict[str, range]) -> None:
    placement = _Placement(kv_heads, tp, KVStriping(kvp, 16, 16), mla=False)
    assert placement.writer_parts() == parts
