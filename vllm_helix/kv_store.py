"""Handed-off KV caches as files: the transport of the Helix connector (one host, or a file system both hosts mount).

An entry is one prompt's KV in the canonical form of :mod:`vllm_helix.kv_handoff`, in
``<root>/<key>/``:

* ``<layer>.<part>.bin``: one writer rank's share of one layer, raw bytes: ``positions``
  (int64 ``[n]``, sequence positions) then ``rows`` (``[n, heads, row]`` in the cache
  dtype). A plain engine's rank writes every position of its KV heads; a Helix rank
  only its stripes.
* ``MANIFEST.json``: the token count, the layers, the cache dtype and row width, and per
  part its KV-head range and, per layer, its position count, byte size and sha256.

What the store promises (issue 26):

* **Atomic entries.** A producer writes into a private staging directory
  (``.staging-<random>``, made by ``mkdtemp``); every file is created with
  ``O_EXCL | O_NOFOLLOW``, mode 0600. The manifest is written last and the directory
  renamed to ``<key>`` in one step, so a reader sees a whole entry or none. Two
  producers of the same prompt race on the rename: one wins, the other's staging
  directory is dropped. A producer killed mid-write leaves only a staging directory,
  which no reader opens and the janitor (:mod:`vllm_helix.kv_store_janitor`) removes.
* **Checked reads.** Before a byte reaches a cache the reader checks the manifest's
  structure, each part file's size and sha256, its dtype and shape against what the
  reading engine holds, that positions are in range, unique and cover every position
  asked for, and that the rows are finite. Any failure raises :class:`KVStoreError`,
  which costs the request that reads the entry, never the engine.
* **A private root.** The default directory is per user; the root is created 0700 and
  refused when it belongs to another user or is open to group or others.
* **Complete keys.** :func:`entry_key` hashes the engine's identity (model, revision,
  quantization, dtypes) and what vLLM's own prefix-cache hash covers for a request
  (LoRA, multimodal items, ``cache_salt``, prompt embeddings), beside the token ids.
* **Leases.** A reader holds a shared ``flock`` on the manifest while it reads; the
  janitor deletes an entry only under an exclusive, non-blocking lock, so an entry is
  never deleted under its reader (locks die with their process: no stale leases).

Pure torch and the standard library: nothing here imports vLLM.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 3  # 3: atomic directories, raw parts with sha256 in the manifest, complete keys
MANIFEST = "MANIFEST.json"
CONNECTOR_NAME = "HelixConnector"  # the name vLLM's --kv-transfer-config uses (registered by the plugin)
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # layer and part names that may become file names
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.uint8, torch.int8)}
ENGINE_FIELDS = ("model", "revision", "quantization", "dtype", "kv_cache_dtype")


class KVStoreError(ValueError):
    """A stored entry is torn, missing, misshapen or not what this engine holds: the reading request's fault."""


class StoreConfigError(ValueError):
    """``kv_connector_extra_config`` (or the store's directory) is unusable; raised at start-up."""


def default_path() -> str:
    """The per-user default root: ``$TMPDIR/vllm-helix-kv-<uid>`` (never one name shared by every user)."""
    return os.path.join(tempfile.gettempdir(), f"vllm-helix-kv-{os.geteuid()}")


def _positive(name: str, value: Any, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise StoreConfigError(f"HelixConnector option {name}={value!r} must be a finite "
                               f"{'integer' if integer else 'number'} > 0")
    return value


@dataclass(frozen=True)
class StoreConfig:
    """The connector's ``kv_connector_extra_config``, read strictly (an unknown key is a typo, not a no-op)."""

    path: str
    max_age_s: float = 3600.0  # an entry unused this long (monotonic, as this process saw it) is deleted
    max_bytes: int = 16 * 2**30  # least recently used entries are evicted above this many bytes
    load_timeout_s: float = 5.0  # a published entry whose parts stay invisible this long is a miss
    model_id: str | None = None  # the model's name in keys, when producer and consumer name it differently

    OPTIONS = ("path", "max_age_s", "max_bytes", "load_timeout_s", "model_id")

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> StoreConfig:
        extra = dict(extra or {})
        for key in sorted(set(extra) - set(cls.OPTIONS)):
            near = difflib.get_close_matches(key, cls.OPTIONS, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise StoreConfigError(f"unknown HelixConnector option {key!r} in kv_connector_extra_config; {hint}"
                                   f"the options are {', '.join(cls.OPTIONS)}")
        path = extra.get("path", default_path())
        if not isinstance(path, str) or not os.path.isabs(path) or not os.path.normpath(path).strip("/"):
            raise StoreConfigError(f"HelixConnector path {path!r} must be an absolute directory other than /, "
                                   f"e.g. {default_path()}")
        model_id = extra.get("model_id")
        if model_id is not None and (not isinstance(model_id, str) or not model_id):
            raise StoreConfigError(f"HelixConnector model_id {model_id!r} must be a non-empty string")
        return cls(path=path,
                   max_age_s=float(_positive("max_age_s", extra.get("max_age_s", cls.max_age_s))),
                   max_bytes=_positive("max_bytes", extra.get("max_bytes", cls.max_bytes), integer=True),
                   load_timeout_s=float(_positive("load_timeout_s", extra.get("load_timeout_s", cls.load_timeout_s))),
                   model_id=model_id)


def kv_transfer_config(role: str, path: str | None = None) -> str:
    """The ``--kv-transfer-config`` JSON of one side of a prefill/decode split through this store
    (without ``path``, both sides use the per-user default)."""
    extra = {} if path is None else {"path": path}
    return json.dumps({"kv_connector": CONNECTOR_NAME, "kv_role": role, "kv_connector_extra_config": extra},
                      separators=(",", ":"))


def private_root(path: str) -> Path:
    """The store's directory, created 0700; refused if another user owns it or others may read or write it.

    Symbolic links in ``path`` are resolved once, here: everything later works under the
    real directory and never follows a link inside it.
    """
    real = os.path.realpath(path)
    if real == "/":
        raise StoreConfigError(f"HelixConnector path {path!r} resolves to /; use a directory of its own")
    try:
        os.makedirs(real, mode=0o700, exist_ok=True)
        info = os.lstat(real)
    except OSError as err:
        raise StoreConfigError(f"HelixConnector path {path!r} cannot be created: {err.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StoreConfigError(f"HelixConnector path {path!r} is not a directory")
    if info.st_uid != os.geteuid():
        raise StoreConfigError(f"HelixConnector path {path!r} belongs to uid {info.st_uid}, not to this user "
                               f"(uid {os.geteuid()}); use a directory of your own")
    if info.st_mode & 0o077:
        raise StoreConfigError(f"HelixConnector path {path!r} is open to other users (mode "
                               f"{stat.S_IMODE(info.st_mode):o}); run chmod 700 {real}")
    return Path(real)


def entry_key(engine: Mapping[str, Any], token_ids: Sequence[int], request: Mapping[str, Any] | None = None) -> str:
    """sha256 of the format, the engine's identity (every one of :data:`ENGINE_FIELDS`), the request's
    extra keys (LoRA, multimodal items, ``cache_salt``, prompt-embedding digest: whatever changes the KV
    of the same token ids) and the token ids."""
    missing = [name for name in ENGINE_FIELDS if name not in engine]
    if missing:
        raise ValueError(f"entry_key: the engine identity lacks {missing}")
    head = json.dumps({"format": FORMAT_VERSION, "engine": dict(engine), "request": dict(request or {})},
                      sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"vllm-helix-kv|{head}|".encode())
    digest.update(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise KVStoreError(f"{kind} name {value!r} is not a plain file-name component")
    return value


def part_file(layer: str, part: str) -> str:
    return f"{_name('layer', layer)}.{_name('part', part)}.bin"


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy())


@dataclass(frozen=True)
class PartRecord:
    """What a writer wrote for one (layer, part): reported to the scheduler, which puts it in the manifest."""

    layer: str
    part: str
    heads: tuple[int, int]
    count: int
    dtype: str
    row: int
    nbytes: int
    sha256: str


class KVFileStore:
    """Entries under a private ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        if not KEY_PATTERN.fullmatch(key):
            raise KVStoreError(f"{key!r} is not an entry key")
        return self.root / key

    # ------------------------------------------------------------------ producer
    def published(self, key: str) -> bool:
        return (self.entry(key) / MANIFEST).exists()

    def begin(self, key: str) -> str:
        """A fresh, private staging directory for one save of ``key``; returns its name."""
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{key[:16]}-", dir=self.root)).name

    def _staging(self, staging: str) -> Path:
        if not staging.startswith(STAGING_PREFIX) or "/" in staging or not _NAME.fullmatch(staging.lstrip(".")):
            raise KVStoreError(f"{staging!r} is not a staging directory name")
        return self.root / staging

    def write_part(self, staging: str, layer: str, part: str, positions: torch.Tensor, heads: range,
                   rows: torch.Tensor) -> PartRecord:
        """Write one writer's share of one layer into ``staging``; a failed write leaves no file behind."""
        if rows.dim() != 3 or rows.shape[:2] != (positions.numel(), len(heads)):
            raise ValueError(f"rows {list(rows.shape)} do not match {positions.numel()} positions x {len(heads)} heads")
        dtype = str(rows.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"rows of dtype {dtype} cannot be stored (stored dtypes: {', '.join(DTYPES)})")
        path = self._staging(staging) / part_file(layer, part)
        chunks = (_bytes_of(positions.to(torch.int64)), _bytes_of(rows))
        digest = hashlib.sha256()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return PartRecord(layer, part, (heads.start, heads.stop), positions.numel(), dtype, rows.shape[-1],
                          sum(chunk.nbytes for chunk in chunks), digest.hexdigest())

    def publish(self, staging: str, key: str, tokens: int, layers: Sequence[str], parts: Mapping[str, range],
                records: Sequence[PartRecord]) -> int:
        """Write the manifest of a complete save and move it into place as ``key``.

        Returns the entry's bytes, or 0 when another producer published ``key`` first (this
        save is dropped). Raises :class:`KVStoreError` when ``records`` do not make a whole
        entry (a writer missing, heads or formats that disagree); the caller abandons it.
        """
        found = {(r.layer, r.part): r for r in records}
        missing = [(layer, part) for layer in layers for part in parts if (layer, part) not in found]
        if missing or len(found) != len(records) or len(found) != len(layers) * len(parts):
            raise KVStoreError(f"save of {key[:12]} is incomplete: missing {missing[:3]} "
                               f"({len(records)} records for {len(layers)} layers x {len(parts)} parts)")
        formats = {(r.dtype, r.row) for r in records}
        wrong = [r for r in records if r.heads != (parts[r.part].start, parts[r.part].stop)]
        if len(formats) != 1 or wrong:
            raise KVStoreError(f"save of {key[:12]} mixes formats {sorted(formats)} or writes foreign heads {wrong[:1]}")
        (dtype, row), = formats
        manifest = {
            "format": FORMAT_VERSION, "key": key, "tokens": int(tokens), "layers": list(layers), "dtype": dtype,
            "row": row, "bytes": sum(r.nbytes for r in records),
            "parts": {part: {"heads": [heads.start, heads.stop],
                             "files": {r.layer: {"count": r.count, "bytes": r.nbytes, "sha256": r.sha256}
                                       for r in records if r.part == part}}
                      for part, heads in parts.items()},
        }
        directory = self._staging(staging)
        fd = os.open(directory / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(manifest, out)
        try:
            os.rename(directory, self.entry(key))
        except OSError:  # ENOTEMPTY / EEXIST: another producer's entry is already in place
            self.abandon(staging)
            return 0
        return manifest["bytes"]

    def abandon(self, staging: str) -> None:
        shutil.rmtree(self._staging(staging), ignore_errors=True)

    # ------------------------------------------------------------------ consumer
    def status(self, key: str) -> tuple[int, bool]:
        """``(tokens, complete)`` of a published entry; ``(0, True)`` when there is none.

        ``complete`` is False while a part file named by the manifest is not visible (a
        shared file system still catching up). A manifest that cannot be read or
        validated raises :class:`KVStoreError`.
        """
        entry = self.entry(key)
        try:
            with open(entry / MANIFEST, "rb") as source:
                manifest = _manifest(source.read(), key)
        except FileNotFoundError:
            return 0, True
        except OSError as err:
            raise KVStoreError(f"KV entry {key[:12]}: manifest unreadable ({err.strerror})") from None
        present = set(os.listdir(entry))
        complete = all(part_file(layer, part) in present for layer in manifest["layers"] for part in manifest["parts"])
        return manifest["tokens"], complete

    def touch(self, key: str) -> None:
        """Mark an entry used (the janitor evicts the least recently used)."""
        try:
            os.utime(self.entry(key), follow_symlinks=False)
        except OSError:
            pass  # gone meanwhile: the load will say so

    def reader(self, key: str) -> EntryReader:
        return EntryReader(self.entry(key), key)


def _manifest(raw: bytes, key: str) -> dict[str, Any]:
    """Parse and validate a manifest; every field a reader relies on is checked here."""
    try:
        manifest = json.loads(raw)
        ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT_VERSION and manifest.get("key") == key
              and isinstance(manifest.get("tokens"), int) and manifest["tokens"] > 0
              and isinstance(manifest.get("layers"), list) and manifest["layers"]
              and manifest.get("dtype") in DTYPES and isinstance(manifest.get("row"), int) and manifest["row"] > 0
              and isinstance(manifest.get("parts"), dict) and manifest["parts"])
        for layer in manifest["layers"] if ok else ():
            _name("layer", layer)
        for part, info in manifest["parts"].items() if ok else ():
            _name("part", part)
            heads, files = info.get("heads"), info.get("files")
            ok = ok and (isinstance(heads, list) and len(heads) == 2 and all(isinstance(h, int) for h in heads)
                         and 0 <= heads[0] < heads[1] and isinstance(files, dict)
                         and set(files) == set(manifest["layers"])
                         and all(isinstance(f, dict) and isinstance(f.get("count"), int) and f["count"] >= 0
                                 and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
                                 for f in files.values()))
    except (ValueError, TypeError, AttributeError, KVStoreError) as err:
        raise KVStoreError(f"KV entry {key[:12]}: manifest is not valid ({err})") from None
    if not ok:
        raise KVStoreError(f"KV entry {key[:12]}: manifest is not a format-{FORMAT_VERSION} manifest of this key")
    return manifest


class EntryReader:
    """One entry opened for reading under a shared lock (the lease the janitor respects)."""

    def __init__(self, entry: Path, key: str) -> None:
        self.entry, self.key = entry, key
        self.manifest: dict[str, Any] = {}
        self.bytes_read = 0
        self._fd: int | None = None

    def __enter__(self) -> EntryReader:
        path = self.entry / MANIFEST
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            opened, current = os.fstat(self._fd), os.stat(path, follow_symlinks=False)
        except OSError as err:
            self.__exit__()
            raise KVStoreError(f"KV entry {self.key[:12]} is gone ({err.strerror})") from None
        if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
            self.__exit__()
            raise KVStoreError(f"KV entry {self.key[:12]} was replaced while being opened")
        with os.fdopen(os.dup(self._fd), "rb") as source:
            raw = source.read()
        try:
            self.manifest = _manifest(raw, self.key)
        except KVStoreError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def _part(self, layer: str, part: str, info: dict[str, Any], dtype: torch.dtype, row: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        record, heads = info["files"][layer], info["heads"][1] - info["heads"][0]
        count, expected = record["count"], record["bytes"]
        if expected != count * 8 + count * heads * row * dtype.itemsize:
            raise KVStoreError(f"KV entry {self.key[:12]}: {layer}.{part} size {expected} does not fit "
                               f"{count} positions x {heads} heads x {row}")
        buffer = bytearray(expected)
        try:
            with open(self.entry / part_file(layer, part), "rb", buffering=0) as source:
                got = source.readinto(buffer)
                extra = source.read(1)
        except OSError as err:
            raise KVStoreError(f"KV entry {self.key[:12]}: {layer}.{part} unreadable ({err.strerror})") from None
        if got != expected or extra:
            raise KVStoreError(f"KV entry {self.key[:12]}: {layer}.{part} is torn or padded "
                               f"({got}{'+' if extra else ''} of {expected} bytes)")
        if hashlib.sha256(buffer).hexdigest() != record["sha256"]:
            raise KVStoreError(f"KV entry {self.key[:12]}: {layer}.{part} fails its checksum")
        self.bytes_read += expected
        flat = torch.frombuffer(buffer, dtype=torch.uint8) if expected else torch.empty(0, dtype=torch.uint8)
        positions = flat[:count * 8].view(torch.int64)
        return positions, flat[count * 8:].view(dtype).reshape(count, heads, row)

    def read_layer(self, layer: str, heads: range, tokens: int, dtype: torch.dtype, row: int,
                   start: int = 0) -> torch.Tensor:
        """Canonical ``[tokens - start, len(heads), row]`` of positions ``[start, tokens)``, every check passed.

        ``dtype`` and ``row`` are what the reading engine's cache holds: an entry of another
        format is refused, never cast.
        """
        manifest = self.manifest
        stored = str(dtype).removeprefix("torch.")
        if manifest["dtype"] != stored or manifest["row"] != row:
            raise KVStoreError(f"KV entry {self.key[:12]} holds {manifest['dtype']} rows of {manifest['row']}; "
                               f"this engine's cache holds {stored} rows of {row}")
        if layer not in manifest["layers"] or not 0 <= start < tokens <= manifest["tokens"]:
            raise KVStoreError(f"KV entry {self.key[:12]} of {manifest['tokens']} tokens has no positions "
                               f"[{start}, {tokens}) of {layer}")
        out = torch.empty(tokens - start, len(heads), row, dtype=dtype)
        seen = torch.zeros(tokens - start, len(heads), dtype=torch.int32)
        for part, info in manifest["parts"].items():
            first, end = info["heads"]
            lo, hi = max(first, heads.start), min(end, heads.stop)
            if lo >= hi:
                continue  # none of the reader's heads: not opened
            positions, rows = self._part(layer, part, info, dtype, row)
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= manifest["tokens"]):
                raise KVStoreError(f"KV entry {self.key[:12]}: {layer}.{part} has positions outside "
                                   f"[0, {manifest['tokens']})")
            keep = (positions >= start) & (positions < tokens)
            local, rows = positions[keep] - start, rows[keep][:, lo - first:hi - first]
            if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
                raise KVStoreError(f"KV entry {self.key[:12]}: {layer}.{part} holds non-finite values")
            out[local, lo - heads.start:hi - heads.start] = rows
            seen[:, lo - heads.start:hi - heads.start].index_put_(
                (local,), torch.ones(local.numel(), hi - lo, dtype=torch.int32), accumulate=True)
        if not bool((seen == 1).all()):
            raise KVStoreError(f"KV entry {self.key[:12]} does not hold every position in [{start}, {tokens}) of "
                               f"heads {heads.start}..{heads.stop - 1} exactly once for {layer}")
        return out
