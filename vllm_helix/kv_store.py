"""Handed-off KV caches as local files: the transport of the Helix connector on one host.

An entry is one prompt's KV, in the canonical form of :mod:`vllm_helix.kv_handoff`,
under ``<root>/<key>/``:

* ``<layer>.<part>.pt``: one writer rank's share of one layer, ``positions
  [n]`` (sequence positions) and ``rows [n, heads, row]`` (its KV heads, as the
  manifest names them). A plain engine's rank writes every position of its heads;
  a Helix rank only its stripes. Written to a temporary name and renamed, so a
  reader never sees half a part.
* ``MANIFEST.json``: written last (same way) by the producer's scheduler, once
  every writer has finished: the token count and the parts to expect, each with
  its KV-head range (a reader skips the parts that hold none of its heads without
  opening them). An entry without a manifest, or with a part missing, is not
  (yet) there.

The key hashes the model, the cache dtype and the prompt's token ids, so a prompt
served by another model or dtype never matches. Limits: one host (or a shared
file system); no eviction beyond age: entries older than ``max_age_s`` are
deleted whenever the producer commits a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

FORMAT_VERSION = 2  # 2: the manifest names each part's KV-head range
MANIFEST = "MANIFEST.json"
CONNECTOR_NAME = "HelixConnector"  # the name vLLM's --kv-transfer-config uses (registered by the plugin)
DEFAULT_PATH = "/tmp/vllm-helix-kv"


def kv_transfer_config(role: str, path: str = DEFAULT_PATH) -> str:
    """The ``--kv-transfer-config`` JSON of one side of a prefill/decode split through this store."""
    return json.dumps({"kv_connector": CONNECTOR_NAME, "kv_role": role, "kv_connector_extra_config": {"path": path}},
                      separators=(",", ":"))


def entry_key(model: str, dtype: str, token_ids: Sequence[int]) -> str:
    """The entry of a prompt: sha256 of the model, the cache dtype and the token ids."""
    digest = hashlib.sha256(f"vllm-helix-kv/{FORMAT_VERSION}|{model}|{dtype}|".encode())
    digest.update(torch.tensor(list(token_ids), dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


class KVFileStore:
    """Entries of handed-off KV under ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str, max_age_s: float = 3600.0) -> None:
        self.root = Path(root)
        self.max_age_s = max_age_s

    def _entry(self, key: str) -> Path:
        return self.root / key

    @staticmethod
    def part_name(layer: str, part: str) -> str:
        return f"{layer}.{part}.pt"

    def write_part(self, key: str, layer: str, part: str, positions: torch.Tensor, heads: range,
                   rows: torch.Tensor) -> None:
        """Store one writer's share of one layer."""
        if rows.shape[:2] != (positions.numel(), len(heads)):
            raise ValueError(f"rows {list(rows.shape)} do not match {positions.numel()} positions x {len(heads)} heads")
        entry = self._entry(key)
        entry.mkdir(parents=True, exist_ok=True)
        payload = {"positions": positions.to(torch.int64).contiguous(), "rows": rows.contiguous()}
        _atomic_write(entry / self.part_name(layer, part), lambda path: torch.save(payload, path))

    def commit(self, key: str, tokens: int, layers: Sequence[str], parts: Mapping[str, range]) -> None:
        """Publish an entry whose ``parts`` (name: the KV heads it holds) of every layer are written;
        then drop stale entries."""
        manifest = {"format": FORMAT_VERSION, "tokens": tokens, "layers": list(layers),
                    "parts": {name: [heads.start, heads.stop] for name, heads in parts.items()}}
        entry = self._entry(key)
        entry.mkdir(parents=True, exist_ok=True)
        _atomic_write(entry / MANIFEST, lambda path: path.write_text(json.dumps(manifest)))
        self.remove_stale(keep=key)

    def tokens(self, key: str) -> int | None:
        """Tokens of a complete entry; 0 when there is none; ``None`` when it is committed but a part
        is not visible yet (ask again later)."""
        try:
            manifest = json.loads((self._entry(key) / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return 0
        if manifest.get("format") != FORMAT_VERSION:
            return 0
        entry = self._entry(key)
        complete = all((entry / self.part_name(layer, part)).exists()
                       for layer in manifest["layers"] for part in manifest["parts"])
        return int(manifest["tokens"]) if complete else None

    def read_layer(self, key: str, layer: str, heads: range, tokens: int) -> torch.Tensor:
        """Canonical ``[tokens, len(heads), row]`` of positions ``[0, tokens)`` from the entry's parts."""
        entry = self._entry(key)
        manifest = json.loads((entry / MANIFEST).read_text())
        out: torch.Tensor | None = None
        covered = torch.zeros(tokens, len(heads), dtype=torch.bool)
        for part, (first, end) in manifest["parts"].items():
            lo, hi = max(first, heads.start), min(end, heads.stop)
            if lo >= hi:
                continue  # none of the reader's heads: not opened
            payload = torch.load(entry / self.part_name(layer, part), weights_only=True)
            keep = payload["positions"] < tokens
            positions, rows = payload["positions"][keep], payload["rows"][keep][:, lo - first:hi - first]
            if out is None:
                out = torch.empty(tokens, len(heads), rows.shape[-1], dtype=rows.dtype)
            out[positions, lo - heads.start:hi - heads.start] = rows
            covered[positions, lo - heads.start:hi - heads.start] = True
        if out is None or not bool(covered.all()):
            raise ValueError(f"KV entry {key[:12]} does not hold every position < {tokens} of heads "
                             f"{heads.start}..{heads.stop - 1} for {layer}")
        return out

    def remove_stale(self, keep: str | None = None, now: float | None = None) -> list[str]:
        """Delete entries whose newest file is older than ``max_age_s``; returns their keys."""
        now = time.time() if now is None else now
        removed = []
        for entry in self.root.iterdir() if self.root.exists() else ():
            if not entry.is_dir() or entry.name == keep:
                continue
            newest = max((f.stat().st_mtime for f in entry.iterdir()), default=entry.stat().st_mtime)
            if now - newest > self.max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed
