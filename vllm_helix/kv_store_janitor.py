"""Cleanup of the handed-off KV store: ages, a size cap, and never an entry under its reader.

Run by producers (the side that fills the store), in a thread of their scheduler
process, woken after each publication and at a fixed interval, so no scan costs a
scheduling step.

* **Only its own.** It looks at names it makes: entries (64 hex digits), staging and
  trash directories (:data:`~vllm_helix.kv_store.STAGING_PREFIX`,
  :data:`~vllm_helix.kv_store.TRASH_PREFIX`); each must be a real directory, never a
  link. Anything else under the root is left alone.
* **Ages robust to clock steps.** The wall-clock mtime of an entry is used only as a
  change signal (a publication, or a consumer's ``touch`` on a load). The age is the
  time on this process's monotonic clock since the janitor last saw it change, so a
  clock step neither deletes fresh entries nor keeps future-dated ones forever; after a
  restart every entry starts at age 0.
* **A size cap** (``max_bytes``): above it, the least recently used entries go first.
* **Leases.** An entry is deleted only under an exclusive, non-blocking ``flock`` of its
  manifest (readers hold a shared one), renamed to a trash name while locked, then
  removed; an entry being read is skipped until the next sweep.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_helix.kv_store import KEY_PATTERN, MANIFEST, STAGING_PREFIX, TRASH_PREFIX

_logger = logging.getLogger("vllm.helix")


@dataclass
class _Seen:
    identity: tuple[int, int]  # (inode, mtime_ns): a change of either is a use
    since: float  # monotonic time it was last seen to change
    nbytes: int


class StoreJanitor:
    """One sweep at a time over ``root`` (:meth:`sweep`); :class:`JanitorThread` runs it in the background."""

    def __init__(self, root: Path, max_age_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root, self.max_age_s, self.max_bytes, self.clock = Path(root), max_age_s, max_bytes, clock
        self._seen: dict[str, _Seen] = {}
        self.removed = 0  # entries deleted so far (age or cap)

    @staticmethod
    def _kind(name: str) -> str | None:
        if KEY_PATTERN.fullmatch(name):
            return "entry"
        if name.startswith(STAGING_PREFIX):
            return "staging"
        if name.startswith(TRASH_PREFIX):
            return "trash"
        return None

    def _entry_bytes(self, path: Path) -> int:
        try:
            return int(json.loads((path / MANIFEST).read_bytes()).get("bytes", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            return 0

    def sweep(self) -> list[str]:
        """Delete what is too old or over the cap; returns the names removed."""
        now, removed, live = self.clock(), [], {}
        try:
            listing = list(os.scandir(self.root))
        except OSError:
            return removed
        for item in listing:
            kind = self._kind(item.name)
            try:
                info = item.stat(follow_symlinks=False)
            except OSError:
                continue
            if kind is None or not stat.S_ISDIR(info.st_mode):
                continue  # not ours, or a link: never followed, never deleted
            if kind == "trash":  # a removal interrupted earlier
                shutil.rmtree(item.path, ignore_errors=True)
                continue
            identity = (info.st_ino, info.st_mtime_ns)
            seen = self._seen.get(item.name)
            if seen is None or seen.identity != identity:
                nbytes = self._entry_bytes(Path(item.path)) if kind == "entry" else 0
                seen = _Seen(identity, now, nbytes)
            live[item.name] = seen
        self._seen = live
        for name, seen in sorted(live.items(), key=lambda kv: kv[1].since):
            if now - seen.since > self.max_age_s and self._remove(name):
                removed.append(name)
        total = sum(seen.nbytes for name, seen in live.items() if name not in removed)
        for name, seen in sorted(live.items(), key=lambda kv: kv[1].since):  # least recently used first
            if total <= self.max_bytes:
                break
            if name not in removed and self._kind(name) == "entry" and self._remove(name):
                removed.append(name)
                total -= seen.nbytes
        for name in removed:
            self._seen.pop(name, None)
        self.removed += sum(1 for name in removed if self._kind(name) == "entry")
        return removed

    def _remove(self, name: str) -> bool:
        """Delete one entry or staging directory unless a reader holds it."""
        path = self.root / name
        trash = self.root / f"{TRASH_PREFIX}{secrets.token_hex(8)}"
        if self._kind(name) == "staging":
            shutil.rmtree(path, ignore_errors=True)
            return True
        try:
            fd = os.open(path / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None  # an entry directory without a manifest (an older format): nobody reads it
        except OSError:
            return False
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # being read: next sweep
            os.rename(path, trash)
        except OSError:
            return False
        finally:
            if fd is not None:
                os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        return True


class JanitorThread:
    """Runs :meth:`StoreJanitor.sweep` in a daemon thread: after :meth:`poke` and every ``interval_s``."""

    def __init__(self, janitor: StoreJanitor, interval_s: float) -> None:
        self.janitor, self.interval_s = janitor, interval_s
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="helix-kv-janitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.janitor.sweep()
            except Exception:  # a cleanup fault must never take the engine down
                _logger.exception("HelixConnector: store cleanup failed (will retry)")

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
