"""Handed-off KV as files: parts from any writer layout assemble the canonical form exactly, and every
fault a file can carry (torn, missing, misshapen, foreign, planted) is refused before it reaches a cache."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vllm_helix.config import HelixConfig
from vllm_helix.kv_handoff import BlockLayout, rank_tokens, scatter_sequence, tp_kv_heads
from vllm_helix.kv_store import (MANIFEST, KVFileStore, KVStoreError, StoreConfig, StoreConfigError, default_path,
                                 entry_key, part_file, private_root)
from vllm_helix.rank_grid import HelixLayout
from vllm_helix.striping import KVStriping

ENGINE = {"model": "m", "revision": None, "quantization": None, "dtype": "float32", "kv_cache_dtype": "float32"}


def _canonical(tokens: int, heads: int, row: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(tokens, heads, row, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _key(tag: int) -> str:
    return entry_key(ENGINE, [tag])


def _save(store: KVFileStore, key: str, canonical: torch.Tensor, layers: tuple[str, ...] = ("L0", "L1"),
          writers: int = 1, positions: torch.Tensor | None = None) -> None:
    """A plain TP=writers producer: writer r holds heads tp_kv_heads(.., writers, r) of every position."""
    tokens, heads = canonical.shape[:2]
    staging = store.begin(key)
    parts = {f"r{r}": tp_kv_heads(heads, writers, r) for r in range(writers)}
    records = [store.write_part(staging, layer, name, torch.arange(tokens) if positions is None else positions,
                                mine, canonical[:, mine.start:mine.stop] if positions is None else
                                canonical[positions, mine.start:mine.stop])
               for layer in layers for name, mine in parts.items()]
    assert store.publish(staging, key, tokens, list(layers), parts, records) > 0


def _read(store: KVFileStore, key: str, heads: range, tokens: int, dtype: torch.dtype = torch.float32,
          row: int = 6, start: int = 0, layer: str = "L0") -> torch.Tensor:
    with store.reader(key) as entry:
        return entry.read_layer(layer, heads, tokens, dtype, row, start=start)


@pytest.fixture
def store(tmp_path: Path) -> KVFileStore:
    return KVFileStore(private_root(str(tmp_path / "kv")))


@pytest.mark.parametrize(("kvp", "stripe", "tokens"), [(2, 16, 600), (2, 128, 700), (4, 8, 37), (3, 4, 2)])
def test_helix_ranks_write_their_stripes_and_a_reader_gets_the_whole_sequence(store: KVFileStore, kvp: int,
                                                                             stripe: int, tokens: int,
                                                                             fresh_seed: int) -> None:
    key, bs, row = _key(kvp * 1000 + tokens), 128, 10
    canonical = _canonical(tokens, 1, row, fresh_seed)
    striping = KVStriping(kvp, stripe, bs)
    block_row = torch.randperm(8)[: int(striping.blocks_needed(torch.tensor([tokens]))[0])]
    caches = [torch.zeros(8, 1, bs, row) for _ in range(kvp)]
    scatter_sequence(canonical, caches, BlockLayout(bs, row), striping, block_row)
    staging = store.begin(key)
    records = []
    for rank, cache in enumerate(caches):  # what each producer rank's save_kv_layer does
        positions, slots = rank_tokens(striping, block_row, tokens, rank)
        records.append(store.write_part(staging, "layers.0", f"r{rank}", positions, range(0, 1),
                                        BlockLayout(bs, row).read(cache, slots)))
    assert store.status(key) == (0, True)  # not published yet: a reader sees nothing
    store.publish(staging, key, tokens, ["layers.0"], {f"r{rank}": range(0, 1) for rank in range(kvp)}, records)
    assert store.status(key) == (tokens, True)
    assert torch.equal(_read(store, key, range(0, 1), tokens, row=row, layer="layers.0"), canonical)
    assert torch.equal(_read(store, key, range(0, 1), tokens - 1, row=row, layer="layers.0"), canonical[:-1])
    if tokens > 1:  # a load after a prefix-cache hit reads only its own positions
        assert torch.equal(_read(store, key, range(0, 1), tokens, row=row, layer="layers.0", start=1), canonical[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_tensor_parallel_writers_split_by_heads_and_readers_take_their_heads(store: KVFileStore, dtype: torch.dtype,
                                                                           fresh_seed: int) -> None:
    key, tokens = _key(1), 50
    canonical = _canonical(tokens, 4, 6, fresh_seed, dtype)
    _save(store, key, canonical, writers=2)
    assert torch.equal(_read(store, key, range(0, 4), tokens, dtype), canonical)
    assert torch.equal(_read(store, key, range(1, 3), tokens, dtype), canonical[:, 1:3])  # spans both parts
    # a reader of heads 0-1 (a TPA slice) does not open the part of heads 2-3: spoil it, the read still works
    (store.entry(key) / part_file("L0", "r1")).write_bytes(b"not a part")
    assert torch.equal(_read(store, key, range(0, 2), tokens, dtype), canonical[:, 0:2])
    with pytest.raises(KVStoreError, match="torn"):  # a reader of heads 1-2 does open it
        _read(store, key, range(1, 3), tokens, dtype)


def _damage(store: KVFileStore, key: str, how: str) -> None:
    entry = store.entry(key)
    part = entry / part_file("L0", "r0")
    manifest = json.loads((entry / MANIFEST).read_text())
    if how == "torn":
        part.write_bytes(part.read_bytes()[:-5])
    elif how == "flipped":
        data = bytearray(part.read_bytes())
        data[-3] ^= 0x40
        part.write_bytes(bytes(data))
    elif how == "missing part":
        part.unlink()
    elif how == "manifest garbage":
        (entry / MANIFEST).write_text("{not json")
    elif how == "other key":
        manifest["key"] = "0" * 64
        (entry / MANIFEST).write_text(json.dumps(manifest))
    elif how == "fewer positions claimed":  # size, count and checksum consistent, positions don't cover
        _rewrite(entry, manifest, positions=torch.arange(7), rows=torch.zeros(7, 2, 6))
    elif how == "duplicate positions":
        _rewrite(entry, manifest, positions=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), rows=torch.zeros(10, 2, 6))
    elif how == "negative position":
        _rewrite(entry, manifest, positions=torch.tensor([-1, 1, 2, 3, 4, 5, 6, 7, 8]), rows=torch.zeros(9, 2, 6))
    elif how == "NaN rows":
        rows = torch.zeros(9, 2, 6)
        rows[4, 1, 2] = float("nan")
        _rewrite(entry, manifest, positions=torch.arange(9), rows=rows)
    elif how == "1-wide rows":  # once broadcast to the full row by a lenient reader
        _rewrite(entry, manifest, positions=torch.arange(9), rows=torch.zeros(9, 2, 1), row=1)
    elif how == "fp16 rows":
        _rewrite(entry, manifest, positions=torch.arange(9), rows=torch.zeros(9, 2, 6, dtype=torch.float16),
                 dtype="float16")
    elif how == "uint8 rows":
        _rewrite(entry, manifest, positions=torch.arange(9), rows=torch.zeros(9, 2, 6, dtype=torch.uint8),
                 dtype="uint8")
    else:
        raise AssertionError(how)


def _rewrite(entry: Path, manifest: dict, positions: torch.Tensor, rows: torch.Tensor, row: int | None = None,
             dtype: str | None = None) -> None:
    """Replace part r0 of L0 by a self-consistent file (size and checksum match): only content checks catch it."""
    import hashlib
    data = positions.to(torch.int64).numpy().tobytes() + rows.contiguous().view(torch.uint8).numpy().tobytes()
    (entry / part_file("L0", "r0")).write_bytes(data)
    manifest["parts"]["r0"]["files"]["L0"] = {"count": positions.numel(), "bytes": len(data),
                                              "sha256": hashlib.sha256(data).hexdigest()}
    manifest["row"] = row or manifest["row"]
    manifest["dtype"] = dtype or manifest["dtype"]
    (entry / MANIFEST).write_text(json.dumps(manifest))


DAMAGE = ["torn", "flipped", "missing part", "manifest garbage", "other key", "fewer positions claimed",
          "duplicate positions", "negative position", "NaN rows", "1-wide rows", "fp16 rows", "uint8 rows"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_entry_is_refused_before_any_row_is_returned(store: KVFileStore, how: str, fresh_seed: int) -> None:
    key = _key(2)
    _save(store, key, _canonical(9, 2, 6, fresh_seed))
    _damage(store, key, how)
    with pytest.raises(KVStoreError):
        store.status(key)
        _read(store, key, range(0, 2), 9)


def test_a_part_that_is_not_visible_yet_makes_the_entry_incomplete(store: KVFileStore) -> None:
    key = _key(3)
    _save(store, key, torch.zeros(4, 1, 6), writers=1)
    (store.entry(key) / part_file("L1", "r0")).rename(store.root / "elsewhere")
    assert store.status(key) == (4, False)


def test_an_incomplete_or_inconsistent_save_is_not_published_and_leaves_nothing(store: KVFileStore) -> None:
    key = _key(4)
    staging = store.begin(key)
    record = store.write_part(staging, "L0", "r0", torch.arange(3), range(0, 1), torch.zeros(3, 1, 6))
    with pytest.raises(KVStoreError, match="incomplete"):
        store.publish(staging, key, 3, ["L0", "L1"], {"r0": range(0, 1)}, [record])
    with pytest.raises(KVStoreError, match="foreign heads"):
        store.publish(staging, key, 3, ["L0"], {"r0": range(1, 2)}, [record])
    store.abandon(staging)
    assert list(store.root.iterdir()) == []
    with pytest.raises(ValueError, match="rows \\[2, 1, 3\\] do not match 3 positions x 1 heads"):
        store.write_part(store.begin(key), "L", "r2", torch.arange(3), range(0, 1), torch.zeros(2, 1, 3))


def test_a_failed_write_leaves_no_file_and_two_producers_of_one_prompt_publish_once(store: KVFileStore,
                                                                                    monkeypatch) -> None:
    key = _key(5)
    staging = store.begin(key)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdopen", lambda fd, mode: (os.close(fd), full_disk())[1])
        with pytest.raises(OSError, match="No space"):
            store.write_part(staging, "L0", "r0", torch.arange(3), range(0, 1), torch.zeros(3, 1, 6))
    assert list((store.root / staging).iterdir()) == []
    store.abandon(staging)
    first, second = store.begin(key), store.begin(key)
    records = {s: [store.write_part(s, "L0", "r0", torch.arange(3), range(0, 1), torch.full((3, 1, 6), float(i)))]
               for i, s in enumerate((first, second))}
    assert store.publish(first, key, 3, ["L0"], {"r0": range(0, 1)}, records[first]) > 0
    assert store.publish(second, key, 3, ["L0"], {"r0": range(0, 1)}, records[second]) == 0  # lost the race
    assert sorted(p.name for p in store.root.iterdir()) == [key]
    assert torch.equal(_read(store, key, range(0, 1), 3), torch.zeros(3, 1, 6))


def test_a_store_seen_through_another_mount_reads_what_this_one_wrote(
        store: KVFileStore, tmp_path: Path, bind_mount: Callable[..., bool], fresh_seed: int) -> None:
    # a producer host and a decode host mounting one file system at different paths: the entry is
    # found by its key, never by the writer's path, and a save in progress is invisible there
    other_path = tmp_path / "seen-from-the-decode-host"
    bind_mount(store.root, other_path)
    other = KVFileStore(private_root(str(other_path)))
    canonical = _canonical(37, 2, 6, fresh_seed)
    staging = store.begin(_key(2))
    assert other.status(_key(2)) == (0, True) and not list(other_path.glob("[0-9a-f]*"))  # none yet
    store.abandon(staging)
    _save(store, _key(1), canonical)
    assert other.status(_key(1)) == (37, True)
    assert torch.equal(_read(other, _key(1), range(0, 2), 37), canonical)


def test_files_are_private_and_not_followed_through_links(store: KVFileStore, tmp_path: Path) -> None:
    key = _key(6)
    _save(store, key, torch.zeros(2, 1, 6))
    for path in [store.root, store.entry(key), *store.entry(key).iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    staging = store.begin(_key(7))
    assert stat.S_IMODE((store.root / staging).stat().st_mode) == 0o700
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (store.root / staging / part_file("L0", "r0")).symlink_to(victim)  # planted link at the part's name
    with pytest.raises(OSError):
        store.write_part(staging, "L0", "r0", torch.arange(1), range(0, 1), torch.zeros(1, 1, 6))
    assert victim.read_text() == "keep"
    with pytest.raises(KVStoreError):
        store.write_part("../elsewhere", "L0", "r0", torch.arange(1), range(0, 1), torch.zeros(1, 1, 6))


def test_the_root_must_be_private_and_ours(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    with pytest.raises(StoreConfigError, match="open to other users.*chmod 700"):
        private_root(str(open_dir))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    assert private_root(str(link)) == (tmp_path / "real").resolve()  # links resolved once, the target checked
    assert stat.S_IMODE((tmp_path / "real").stat().st_mode) == 0o700
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 12345, 12345)
        with pytest.raises(StoreConfigError, match="belongs to uid 12345"):
            private_root(str(other))
    assert default_path().endswith(f"vllm-helix-kv-{os.geteuid()}")


@pytest.mark.parametrize(("extra", "message"), [
    ({"pth": "/x"}, "unknown HelixConnector option 'pth'.*did you mean 'path'"),
    ({"path": "relative/dir"}, "must be an absolute directory"),
    ({"path": "/"}, "must be an absolute directory other than /"),
    ({"path": "//"}, "other than /"),
    ({"max_age_s": -1}, "max_age_s=-1 must be a finite number > 0"),
    ({"max_age_s": float("nan")}, "max_age_s=nan"),
    ({"max_age_s": True}, "max_age_s=True"),
    ({"max_bytes": 0}, "max_bytes=0 must be a finite integer > 0"),
    ({"max_bytes": 1.5e9}, "integer"),
    ({"load_timeout_s": float("inf")}, "load_timeout_s=inf"),
    ({"model_id": ""}, "model_id"),
])
def test_bad_options_are_refused_naming_the_option(extra: dict, message: str) -> None:
    with pytest.raises(StoreConfigError, match=message):
        StoreConfig.from_extra(extra)


def test_options_default_to_a_per_user_path_and_sane_limits() -> None:
    config = StoreConfig.from_extra({})
    assert (config.path, config.max_age_s, config.load_timeout_s) == (default_path(), 3600.0, 5.0)
    assert config.max_bytes == 16 * 2**30
    assert StoreConfig.from_extra({"path": "/srv/kv", "max_bytes": 10, "max_age_s": 2}).max_bytes == 10


def test_keys_cover_the_engine_and_what_vllms_prefix_cache_hash_covers() -> None:
    base = entry_key(ENGINE, [1, 2, 3])
    variants = [entry_key({**ENGINE, field: value}, [1, 2, 3]) for field, value in
                [("model", "m2"), ("revision", "abc"), ("quantization", "fp8"), ("dtype", "bfloat16"),
                 ("kv_cache_dtype", "fp8_e4m3")]]
    variants += [entry_key(ENGINE, tokens) for tokens in ([1, 2], [1, 2, 4])]
    variants += [entry_key(ENGINE, [1, 2, 3], extra) for extra in (
        {"lora": ["a", "/lora/a"]}, {"lora": ["a", "/lora/b"]}, {"cache_salt": "alice"}, {"cache_salt": "bob"},
        {"mm": [["img-1", 0, 2]]}, {"mm": [["img-2", 0, 2]]}, {"mm": [["img-1", 1, 2]]}, {"prompt_embeds": "ab"})]
    assert len({base, *variants}) == 1 + len(variants)
    assert entry_key(ENGINE, (1, 2, 3)) == base == entry_key(ENGINE, [1, 2, 3], {})
    with pytest.raises(ValueError, match="lacks"):
        entry_key({"model": "m"}, [1])


@pytest.mark.parametrize(("kvp", "tpa", "kv_heads"), [(2, 1, 1), (2, 2, 2), (1, 4, 8), (2, 4, 4), (4, 2, 2)])
def test_tp_heads_are_the_helix_layouts_heads(kvp: int, tpa: int, kv_heads: int) -> None:
    """vLLM runs Helix as TP = kvp x tpa (with kvp > 1, more ranks than KV heads, tpa = KV heads);
    its head rule must give each rank its TPA slice's heads."""
    layout = HelixLayout.from_config(HelixConfig(kvp=kvp, tpa=tpa))
    for rank in range(kvp * tpa):
        assert tp_kv_heads(kv_heads, kvp * tpa, rank) == layout.kv_heads(rank, kv_heads)
    assert [tp_kv_heads(8, 2, r) for r in range(2)] == [range(0, 4), range(4, 8)]
