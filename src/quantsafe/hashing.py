"""Content hashes that key every cached artifact and result row."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

log = logging.getLogger("quantsafe.hashing")


def canonical_json(obj: Any) -> str:
    """Serialise configs deterministically so equal configs hash equally."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short sha256 of the canonical JSON of obj (configs, ids, tuples of both)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Full sha256 of a file, streamed (model files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_file_sha256(paths: Sequence[Path], cache_file: Path) -> dict[Path, str]:
    """sha256 of each file, read again only when its (absolute path, mtime_ns, size) is not in `cache_file`.

    Hashing a model's weights takes seconds per GB and every resolve needs it. The cache is a JSON object
    absolute path -> {mtime_ns, size, sha256}; a missing or corrupt one is rebuilt, and failing to write it
    only costs the next run the re-reading.
    """
    cache = _read_json_object(cache_file)
    hashes: dict[Path, str] = {}
    changed = False
    for path in paths:
        key = str(path.resolve())
        st = path.stat()  # before reading: a file changed while hashed gets a new mtime and is hashed again
        entry = cache.get(key)
        if (isinstance(entry, dict) and entry.get("mtime_ns") == st.st_mtime_ns and entry.get("size") == st.st_size
                and isinstance(entry.get("sha256"), str)):
            hashes[path] = entry["sha256"]
            continue
        hashes[path] = file_sha256(path)
        cache[key] = {"mtime_ns": st.st_mtime_ns, "size": st.st_size, "sha256": hashes[path]}
        changed = True
    if changed:
        _write_json_atomically(cache_file, cache)
    return hashes


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON: start afresh
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one (another process may be resolving too)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        log.warning("cannot write the hash cache %s (%s); files will be hashed again next time", path, err)
