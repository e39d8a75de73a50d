"""The store's cleanup: only its own names, ages on a monotonic clock, a size cap by recency, and never an
entry under its reader (a real second process holds the lease)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vllm_helix.kv_store import KVFileStore, entry_key, private_root
from vllm_helix.kv_store_janitor import JanitorThread, StoreJanitor

ENGINE = {"model": "m", "revision": None, "quantization": None, "dtype": "float32", "kv_cache_dtype": "float32"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _entry(store: KVFileStore, tag: int, tokens: int = 4) -> str:
    key = entry_key(ENGINE, [tag])
    staging = store.begin(key)
    record = store.write_part(staging, "L0", "r0", torch.arange(tokens), range(0, 1), torch.zeros(tokens, 1, 6))
    assert store.publish(staging, key, tokens, ["L0"], {"r0": range(0, 1)}, [record])
    return key


@pytest.fixture
def store(tmp_path: Path) -> KVFileStore:
    return KVFileStore(private_root(str(tmp_path / "kv")))


def test_ages_run_on_the_monotonic_clock_from_the_last_seen_use(store: KVFileStore) -> None:
    clock = Clock()
    janitor = StoreJanitor(store.root, max_age_s=60, max_bytes=10**9, clock=clock)
    old, used = _entry(store, 1), _entry(store, 2)
    future = time.time() + 10**6  # a wall clock far ahead or behind decides nothing
    os.utime(store.entry(old), (future, future))
    assert janitor.sweep() == []
    clock.now += 50
    store.touch(used)  # a consumer loaded it: its age starts again
    assert janitor.sweep() == []
    clock.now += 20
    assert janitor.sweep() == [old]
    clock.now += 61
    assert janitor.sweep() == [used]
    assert janitor.removed == 2 and list(store.root.iterdir()) == []


def test_the_size_cap_evicts_the_least_recently_used_first(store: KVFileStore) -> None:
    clock = Clock()
    keys = []
    for tag in range(3):
        keys.append(_entry(store, tag))
        StoreJanitor(store.root, 3600, 10**9, clock).sweep()
    size = sum(f.stat().st_size for f in store.entry(keys[0]).iterdir() if f.suffix == ".bin")
    janitor = StoreJanitor(store.root, max_age_s=3600, max_bytes=2 * size, clock=clock)
    janitor.sweep()  # first sight: all equally recent, one must go
    assert len([p for p in store.root.iterdir()]) == 2
    clock.now += 1
    newest = _entry(store, 9)
    survivors = sorted(p.name for p in store.root.iterdir())
    clock.now += 1
    store.touch(survivors[0] if survivors[0] != newest else survivors[1])
    touched = survivors[0] if survivors[0] != newest else survivors[1]
    janitor.sweep()
    assert sorted(p.name for p in store.root.iterdir()) == sorted({touched, newest})


def test_only_its_own_names_are_touched_and_links_are_never_followed(store: KVFileStore, tmp_path: Path) -> None:
    clock = Clock()
    data = tmp_path / "data"
    (data / "precious").mkdir(parents=True)
    (store.root / ("a" * 64)).symlink_to(data)  # a link with an entry's name
    (store.root / "notes").mkdir()
    (store.root / ".staging-x").mkdir()  # a producer killed mid-write
    (store.root / ".staging-x" / "L0.r0.bin").write_bytes(b"half")
    (store.root / ".trash-1").mkdir()  # an interrupted removal
    janitor = StoreJanitor(store.root, max_age_s=1, max_bytes=1, clock=clock)
    janitor.sweep()
    assert not (store.root / ".trash-1").exists()
    clock.now += 2
    janitor.sweep()
    assert sorted(p.name for p in store.root.iterdir()) == ["a" * 64, "notes"]
    assert (data / "precious").is_dir()


def _hold(path: str, ready, release) -> None:
    store = KVFileStore(path)
    key = entry_key(ENGINE, [1])
    with store.reader(key) as entry:
        ready.set()
        release.wait(30)
        entry.read_layer("L0", range(0, 1), 4, torch.float32, 6)


@pytest.mark.parametrize("through", ["the same path", "another mount"])
def test_an_entry_is_not_deleted_under_its_reader(store: KVFileStore, tmp_path: Path, through: str,
                                                  bind_mount: Callable[..., bool]) -> None:
    # "another mount": the reader sees the store through a second mount point of the same directory, as a
    # decode host does on a shared file system (the lease is on the file, not on the path)
    clock = Clock()
    key = _entry(store, 1)
    janitor = StoreJanitor(store.root, max_age_s=1, max_bytes=10**9, clock=clock)
    janitor.sweep()
    path = store.root
    if through == "another mount":
        path = tmp_path / "seen-from-the-decode-host"
        bind_mount(store.root, path)
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    reader = context.Process(target=_hold, args=(str(path), ready, release))
    reader.start()
    try:
        assert ready.wait(60)
        clock.now += 5
        assert janitor.sweep() == []  # leased: kept
        assert store.status(key) == (4, True)
        release.set()
        reader.join(60)
        assert reader.exitcode == 0  # it read the whole entry
        assert janitor.sweep() == [key]
    finally:
        release.set()
        reader.join(5)
        if reader.is_alive():
            reader.kill()


def test_the_thread_sweeps_when_poked_and_stops(store: KVFileStore) -> None:
    _entry(store, 1)
    (store.root / ".trash-2").mkdir()
    thread = JanitorThread(StoreJanitor(store.root, 3600, 10**9), interval_s=3600)
    try:
        thread.poke()
        for _ in range(100):
            if not (store.root / ".trash-2").exists():
                break
            time.sleep(0.05)
        assert not (store.root / ".trash-2").exists()
    finally:
        thread.stop()
