"""SQLite (WAL) store of variants, generations and judgments, keyed by content hashes.

Every insert is idempotent (primary keys are hashes), and each batch commits on its own, so a killed run
resumes where it stopped with nothing lost or duplicated.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS variants (
    variant_id TEXT PRIMARY KEY, model TEXT NOT NULL, precision TEXT NOT NULL, method TEXT NOT NULL,
    bits INTEGER, group_size INTEGER, bits_per_weight REAL, source_sha256 TEXT NOT NULL,
    dequantized_gguf INTEGER NOT NULL, artifact_path TEXT, config_json TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    variant_id TEXT NOT NULL, prompt_uid TEXT NOT NULL, decoding_id TEXT NOT NULL,
    benchmark TEXT NOT NULL, lang TEXT NOT NULL, scenario TEXT NOT NULL, prompt TEXT NOT NULL,
    response TEXT NOT NULL, n_new_tokens INTEGER NOT NULL, finished INTEGER NOT NULL,
    decoding_json TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (variant_id, prompt_uid, decoding_id));
CREATE TABLE IF NOT EXISTS judges (
    judge_id TEXT PRIMARY KEY, kind TEXT NOT NULL, mode TEXT NOT NULL, config_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS judgments (
    variant_id TEXT NOT NULL, prompt_uid TEXT NOT NULL, decoding_id TEXT NOT NULL, judge_id TEXT NOT NULL,
    verdict TEXT NOT NULL, mode TEXT NOT NULL, raw TEXT NOT NULL, attempts INTEGER NOT NULL,
    scores_json TEXT, created REAL NOT NULL,
    PRIMARY KEY (variant_id, prompt_uid, decoding_id, judge_id));
CREATE TABLE IF NOT EXISTS agreement (
    judge_id TEXT NOT NULL, set_name TEXT NOT NULL, mapping TEXT NOT NULL, row_json TEXT NOT NULL,
    PRIMARY KEY (judge_id, set_name, mapping));
"""


class VariantRow(BaseModel):
    """One evaluated model variant (full precision or quantized)."""

    variant_id: str
    model: str
    precision: str  # "bf16", "int4", ...
    method: str  # "none", "rtn", "gptq", ...
    bits: int | None = None
    group_size: int | None = None
    bits_per_weight: float | None = None
    source_sha256: str
    dequantized_gguf: bool
    artifact_path: str | None = None
    config: dict[str, Any] = {}


class GenerationRow(BaseModel):
    variant_id: str
    prompt_uid: str
    decoding_id: str
    benchmark: str
    lang: str
    scenario: str
    prompt: str
    response: str
    n_new_tokens: int
    finished: bool
    decoding: dict[str, Any]


class JudgmentRow(BaseModel):
    variant_id: str
    prompt_uid: str
    decoding_id: str
    judge_id: str
    verdict: str
    mode: str
    raw: str = ""
    attempts: int = 1
    scores: dict[str, float] | None = None


def _columns(row: sqlite3.Row, json_column: str) -> dict[str, Any]:
    """A row's plain columns (the JSON column is decoded by the caller, the timestamp is dropped)."""
    return {k: row[k] for k in row.keys() if k not in (json_column, "created")}  # noqa: SIM118 (Row, not dict)


class Store:
    """A results database; open with `Store.open(path)` (creates it) and close when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path | str) -> Store:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        conn.commit()
        return cls(conn, path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.conn:  # commits on success, rolls back on error: a batch is all or nothing
            yield self.conn

    def upsert_variant(self, v: VariantRow) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO variants VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (v.variant_id, v.model, v.precision, v.method, v.bits, v.group_size, v.bits_per_weight,
                 v.source_sha256, int(v.dequantized_gguf), v.artifact_path, json.dumps(v.config, sort_keys=True),
                 time.time()),
            )

    def variants(self) -> list[VariantRow]:
        rows = self.conn.execute("SELECT * FROM variants ORDER BY created").fetchall()
        return [VariantRow(**_columns(r, "config_json"), config=json.loads(r["config_json"])) for r in rows]

    def done_generations(self, variant_id: str, decoding_id: str) -> set[str]:
        rows = self.conn.execute("SELECT prompt_uid FROM generations WHERE variant_id=? AND decoding_id=?",
                                 (variant_id, decoding_id))
        return {r[0] for r in rows}

    def add_generations(self, rows: Iterable[GenerationRow]) -> None:
        now = time.time()
        with self._tx() as c:
            c.executemany(
                "INSERT INTO generations VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [(g.variant_id, g.prompt_uid, g.decoding_id, g.benchmark, g.lang, g.scenario, g.prompt,
                  g.response, g.n_new_tokens, int(g.finished), json.dumps(g.decoding, sort_keys=True), now)
                 for g in rows],
            )

    def generations(self, variant_id: str, decoding_id: str, prompt_uids: Sequence[str] | None = None,
                    ) -> list[GenerationRow]:
        rows = self.conn.execute("SELECT * FROM generations WHERE variant_id=? AND decoding_id=?",
                                 (variant_id, decoding_id)).fetchall()
        wanted = set(prompt_uids) if prompt_uids is not None else None
        return [
            GenerationRow(**_columns(r, "decoding_json"), decoding=json.loads(r["decoding_json"]))
            for r in rows if wanted is None or r["prompt_uid"] in wanted
        ]

    def upsert_judge(self, judge_id: str, kind: str, mode: str, config: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO judges VALUES (?,?,?,?)",
                      (judge_id, kind, mode, json.dumps(config, sort_keys=True, default=str)))

    def judges(self) -> list[dict[str, Any]]:
        return [dict(r) | {"config": json.loads(r["config_json"])}
                for r in self.conn.execute("SELECT * FROM judges ORDER BY judge_id")]

    def done_judgments(self, variant_id: str, decoding_id: str, judge_id: str) -> set[str]:
        rows = self.conn.execute(
            "SELECT prompt_uid FROM judgments WHERE variant_id=? AND decoding_id=? AND judge_id=?",
            (variant_id, decoding_id, judge_id))
        return {r[0] for r in rows}

    def add_judgments(self, rows: Iterable[JudgmentRow]) -> None:
        now = time.time()
        with self._tx() as c:
            c.executemany(
                "INSERT INTO judgments VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [(j.variant_id, j.prompt_uid, j.decoding_id, j.judge_id, j.verdict, j.mode, j.raw, j.attempts,
                  json.dumps(j.scores) if j.scores is not None else None, now) for j in rows],
            )

    def judged(self, judge_id: str | None = None) -> list[dict[str, Any]]:
        """Generations joined with their judgments: the input of every score and report."""
        sql = ("SELECT g.variant_id, g.prompt_uid, g.decoding_id, g.benchmark, g.lang, g.scenario, g.prompt, "
               "g.response, j.judge_id, j.verdict, j.mode FROM generations g JOIN judgments j "
               "USING (variant_id, prompt_uid, decoding_id)")
        args: tuple[str, ...] = ()
        if judge_id is not None:
            sql += " WHERE j.judge_id=?"
            args = (judge_id,)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY g.variant_id, g.prompt_uid", args)]

    def put_agreement(self, judge_id: str, set_name: str, mapping: str, row: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO agreement VALUES (?,?,?,?)",
                      (judge_id, set_name, mapping, json.dumps(row, sort_keys=True)))

    def agreement(self, judge_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM agreement"
        args: tuple[str, ...] = ()
        if judge_id is not None:
            sql, args = sql + " WHERE judge_id=?", (judge_id,)
        return [json.loads(r["row_json"]) | {"judge_id": r["judge_id"]} for r in self.conn.execute(sql, args)]

    def table_rows(self, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and rows of one table (for CSV export)."""
        if table not in {"variants", "generations", "judges", "judgments", "agreement"}:
            raise ValueError(f"unknown table {table}")
        cur = self.conn.execute(f"SELECT * FROM {table}")
        return [d[0] for d in cur.description], [tuple(r) for r in cur.fetchall()]
