"""Artifact keys and atomic writes.

A key is a hash of the canonical JSON of everything that changes an artifact, so a changed
setting gives a new key and an old artifact is never trusted for it. Every write goes to a
temporary file that is renamed into place: an interrupted run leaves no half-written artifact.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def key(fields: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able dict (key order does not matter)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; artifacts are not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def _set_aside(shard: Path, err: Exception) -> None:
    """A damaged shard (written by hand, or a disk fault) is renamed, never trusted; its rows
    are recomputed."""
    bad = shard.with_suffix(shard.suffix + ".damaged")
    log.warning("cache shard %s is unreadable (%s); moved to %s", shard, err, bad.name)
    shard.replace(bad)


class VectorStore:
    """Vectors addressed by the sha256 of what produced them, in append-only shards.

    One store holds one producer (a model, its weights and preprocessing, ...), described in
    `producer.json`. Rows are keyed by content hash, so an image shared by two datasets or two
    protocols is embedded once, and a renamed file is not embedded again. Each `put` adds one
    `shard-*.npz` file (arrays `hashes` and `vectors`) that `numpy.load` reads on its own.
    """

    def __init__(self, directory: Path, producer: dict[str, Any]):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "producer.json").exists():
            write_json(directory / "producer.json", producer)

    def get(self, hashes: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Look up rows: a (n,) bool mask of those found, and their vectors in input order."""
        rows: dict[str, np.ndarray] = {}
        for shard in sorted(self.directory.glob("shard-*.npz")):
            try:
                with np.load(shard) as z:
                    rows.update(zip(z["hashes"].tolist(), z["vectors"], strict=True))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
                _set_aside(shard, err)
        found = np.array([h in rows for h in hashes], dtype=bool)
        if not found.any():
            return found, None
        return found, np.stack([rows[h] for h, f in zip(hashes, found, strict=True) if f])

    def put(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        buffer = io.BytesIO()
        np.savez(buffer, hashes=np.array(hashes), vectors=vectors)
        name = f"shard-{key({'hashes': list(hashes)})}.npz"
        write_atomic(self.directory / name, buffer.getvalue())
        log.debug("stored %d vectors in %s", len(hashes), self.directory / name)


class RecordStore:
    """JSON records addressed by content hash, in append-only shards (see `VectorStore`)."""

    def __init__(self, directory: Path, producer: dict[str, Any]):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "producer.json").exists():
            write_json(directory / "producer.json", producer)

    def get(self, hashes: Sequence[str]) -> dict[str, Any]:
        """The records found, by hash."""
        wanted, found = set(hashes), {}
        for shard in sorted(self.directory.glob("shard-*.json")):
            try:
                records = json.loads(shard.read_text())
            except (OSError, ValueError) as err:
                _set_aside(shard, err)
                continue
            found.update((h, r) for h, r in records.items() if h in wanted)
        return found

    def put(self, records: dict[str, Any]) -> None:
        if records:
            write_json(self.directory / f"shard-{key(sorted(records))}.json", records)
