"""Responses of a model server kept on disk, so a rerun or a resumed run never sends a request twice."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantsafe.hashing import canonical_json


class RequestCache:
    """SQLite (WAL) map from sha256(endpoint path, request body) to the response JSON.

    Only successful responses go in, each as soon as it arrives, so a killed run loses at most the requests in
    flight. The key holds the body (model name included) but not the server's address: the same model restarted
    on another port answers from the same cache. Requests come from a thread pool, hence one connection behind a
    lock. `hits` and `misses` count look-ups since this object was made.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses "
                         "(key TEXT PRIMARY KEY, endpoint TEXT NOT NULL, response TEXT NOT NULL)")

    @staticmethod
    def key(endpoint: str, body: Mapping[str, Any]) -> str:
        return hashlib.sha256(canonical_json([endpoint, body]).encode("utf-8")).hexdigest()

    def get(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?",
                                   (self.key(endpoint, body),)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        response: dict[str, Any] = json.loads(row[0])
        return response

    def put(self, endpoint: str, body: Mapping[str, Any], response: Mapping[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (key, endpoint, response) VALUES (?, ?, ?)",
                             (self.key(endpoint, body), endpoint, json.dumps(response, ensure_ascii=False)))

    def __len__(self) -> int:
        with self._lock:
            count: int = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        return count

    def close(self) -> None:
        with self._lock:
            self._db.close()
