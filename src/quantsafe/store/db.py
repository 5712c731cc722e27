"""SQLite (WAL) store of variants, generations and judgments, keyed by content hashes.

Every insert is idempotent (primary keys are hashes), and each batch commits on its own, so a killed run
resumes where it stopped with nothing lost or duplicated.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantsafe.benchmarks.base import Prompt
from quantsafe.errors import QuantsafeError
from quantsafe.hashing import stable_hash

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS variants (
    variant_id TEXT PRIMARY KEY, model TEXT NOT NULL, precision TEXT NOT NULL, method TEXT NOT NULL,
    bits INTEGER, group_size INTEGER, bits_per_weight REAL, source_sha256 TEXT NOT NULL,
    dequantized_gguf INTEGER NOT NULL, artifact_path TEXT, config_json TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    variant_id TEXT NOT NULL, prompt_uid TEXT NOT NULL, decoding_id TEXT NOT NULL, prompt_id TEXT NOT NULL,
    benchmark TEXT NOT NULL, lang TEXT NOT NULL, scenario TEXT NOT NULL, prompt TEXT NOT NULL,
    response TEXT NOT NULL, response_sha TEXT NOT NULL, n_new_tokens INTEGER NOT NULL, finished INTEGER NOT NULL,
    truncated INTEGER NOT NULL, decoding_json TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (variant_id, prompt_uid, decoding_id));
CREATE TABLE IF NOT EXISTS judges (
    judge_id TEXT PRIMARY KEY, kind TEXT NOT NULL, mode TEXT NOT NULL, config_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS judgments (
    variant_id TEXT NOT NULL, prompt_uid TEXT NOT NULL, decoding_id TEXT NOT NULL, judge_id TEXT NOT NULL,
    response_sha TEXT NOT NULL, verdict TEXT NOT NULL, mode TEXT NOT NULL, raw TEXT NOT NULL,
    attempts INTEGER NOT NULL, truncated INTEGER NOT NULL, scores_json TEXT, created REAL NOT NULL,
    PRIMARY KEY (variant_id, prompt_uid, decoding_id, judge_id, response_sha));
CREATE TABLE IF NOT EXISTS agreement (
    judge_id TEXT NOT NULL, set_name TEXT NOT NULL, mapping TEXT NOT NULL, sample_id TEXT NOT NULL,
    row_json TEXT NOT NULL, PRIMARY KEY (judge_id, set_name, mapping, sample_id));
CREATE TABLE IF NOT EXISTS studies (
    study_id TEXT PRIMARY KEY, name TEXT NOT NULL, record_json TEXT NOT NULL, last_run REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    prompt_uid TEXT PRIMARY KEY, item_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS choices (
    variant_id TEXT NOT NULL, prompt_uid TEXT NOT NULL, scoring_id TEXT NOT NULL, prediction TEXT,
    valid_mass REAL NOT NULL, logprobs_json TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (variant_id, prompt_uid, scoring_id));
CREATE TABLE IF NOT EXISTS refusals (
    variant_id TEXT NOT NULL, prompt_uid TEXT NOT NULL, decoding_id TEXT NOT NULL, refusal_id TEXT NOT NULL,
    response_sha TEXT NOT NULL, refused INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (variant_id, prompt_uid, decoding_id, refusal_id, response_sha));
"""
# items, choices and refusals were added without a schema bump: CREATE IF NOT EXISTS adds them to older stores
TABLES = ("variants", "generations", "judges", "judgments", "agreement", "studies", "items", "choices", "refusals")


def response_sha(text: str) -> str:
    """Judgments are keyed by the text they judged, so a verdict never outlives its response."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


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
    """One response; `prompt_uid` is the prompt's content hash, `prompt_id` its human id."""

    variant_id: str
    prompt_uid: str
    decoding_id: str
    prompt_id: str
    benchmark: str
    lang: str
    scenario: str
    prompt: str
    response: str
    n_new_tokens: int
    finished: bool
    truncated: bool = False  # the prompt was cut to fit the model's context
    decoding: dict[str, Any]

    @property
    def response_sha(self) -> str:
        return response_sha(self.response)


class JudgmentRow(BaseModel):
    variant_id: str
    prompt_uid: str
    decoding_id: str
    judge_id: str
    response_sha: str  # of the response judged (GenerationRow.response_sha)
    verdict: str
    mode: str
    raw: str = ""
    attempts: int = 1
    truncated: bool = False  # the judge saw a shortened prompt or response
    scores: dict[str, float] | None = None


class ChoiceRow(BaseModel):
    """A multiple-choice item scored from option-letter log-probs; `scoring_id` keys the scoring settings."""

    variant_id: str
    prompt_uid: str
    scoring_id: str
    prediction: str | None  # the valid letter with the highest log-prob
    valid_mass: float  # probability mass on the letters the item has
    logprobs: dict[str, float]


class RefusalRow(BaseModel):
    """Whether a classifier read a response as a (full or partial) refusal: XSTest's over-refusal input."""

    variant_id: str
    prompt_uid: str
    decoding_id: str
    refusal_id: str
    response_sha: str
    refused: bool


class StudyRecord(BaseModel):
    """Exactly which cells a study defines, so a report never counts another study's results."""

    name: str
    variant_ids: list[str]
    prompt_uids: list[str]
    decoding_id: str
    decoding: dict[str, Any]  # the generation settings, compute dtype included
    judge_ids: list[str]
    refusal_ids: list[str] = []  # classifiers that read XSTest answers (a judge's refusal question)
    scoring_id: str | None = None  # how multiple-choice items were scored (None: the study has none)
    validation_sample: str | None
    models: list[dict[str, Any]]
    config: dict[str, Any]  # the study as it was run
    paper_results: str | None = None  # the paper's results CSV shown beside ours

    @property
    def study_id(self) -> str:
        return stable_hash(self.model_dump(mode="json"))


def _columns(row: sqlite3.Row, json_column: str) -> dict[str, Any]:
    """A row's plain columns (the JSON column is decoded by the caller, the timestamp is dropped)."""
    return {k: row[k] for k in row.keys() if k not in (json_column, "created")}  # noqa: SIM118 (Row, not dict)


def _where(filters: dict[str, str | None]) -> tuple[str, list[str]]:
    """A WHERE clause for the filters that are set (column names are ours, never user input)."""
    used = {col: v for col, v in filters.items() if v is not None}
    return ((" WHERE " + " AND ".join(f"{col}=?" for col in used)) if used else ""), list(used.values())


class Store:
    """A results database; open with `Store.open(path)` (creates it) and close when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path | str, create: bool = True) -> Store:
        """Open (or, with `create`, make) a store; anything that is not a store of this schema is one line."""
        path = Path(path)
        if not create and not path.is_file():
            raise QuantsafeError(f"{path}: no results database here")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise QuantsafeError(f"{path}: cannot open results database ({exc})") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "meta" in tables:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                found = row[0] if row else "?"
                if found != str(SCHEMA_VERSION):
                    raise QuantsafeError(f"{path}: results database has schema {found}, this quantsafe writes "
                                         f"{SCHEMA_VERSION}; use a new output directory")
            elif tables:
                raise QuantsafeError(f"{path}: not a quantsafe results database (tables {sorted(tables)})")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.commit()
        except sqlite3.Error as exc:
            conn.close()
            raise QuantsafeError(f"{path}: not a readable results database ({exc})") from None
        except QuantsafeError:
            conn.close()
            raise
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

    def variants(self, ids: Sequence[str] | None = None) -> list[VariantRow]:
        """All variants in creation order, or exactly `ids` in that order (a missing one is an error)."""
        rows = self.conn.execute("SELECT * FROM variants ORDER BY created").fetchall()
        found = {r["variant_id"]: VariantRow(**_columns(r, "config_json"), config=json.loads(r["config_json"]))
                 for r in rows}
        if ids is None:
            return list(found.values())
        missing = [i for i in ids if i not in found]
        if missing:
            raise QuantsafeError(f"{self.path}: variant(s) {', '.join(missing)} of the study are not in the store")
        return [found[i] for i in ids]

    def done_generations(self, variant_id: str, decoding_id: str) -> set[str]:
        rows = self.conn.execute("SELECT prompt_uid FROM generations WHERE variant_id=? AND decoding_id=?",
                                 (variant_id, decoding_id))
        return {r[0] for r in rows}

    def add_generations(self, rows: Iterable[GenerationRow]) -> None:
        now = time.time()
        with self._tx() as c:
            c.executemany(
                "INSERT INTO generations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [(g.variant_id, g.prompt_uid, g.decoding_id, g.prompt_id, g.benchmark, g.lang, g.scenario, g.prompt,
                  g.response, g.response_sha, g.n_new_tokens, int(g.finished), int(g.truncated),
                  json.dumps(g.decoding, sort_keys=True), now)
                 for g in rows],
            )

    def generations(self, variant_id: str, decoding_id: str, prompt_uids: Sequence[str] | None = None,
                    ) -> list[GenerationRow]:
        rows = self.conn.execute("SELECT * FROM generations WHERE variant_id=? AND decoding_id=?",
                                 (variant_id, decoding_id)).fetchall()
        wanted = set(prompt_uids) if prompt_uids is not None else None
        return [
            GenerationRow(**{k: v for k, v in _columns(r, "decoding_json").items() if k != "response_sha"},
                          decoding=json.loads(r["decoding_json"]))
            for r in rows if wanted is None or r["prompt_uid"] in wanted
        ]

    def upsert_judge(self, judge_id: str, kind: str, mode: str, config: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO judges VALUES (?,?,?,?)",
                      (judge_id, kind, mode, json.dumps(config, sort_keys=True, default=str)))

    def judges(self) -> list[dict[str, Any]]:
        return [dict(r) | {"config": json.loads(r["config_json"])}
                for r in self.conn.execute("SELECT * FROM judges ORDER BY judge_id")]

    def done_judgments(self, variant_id: str, decoding_id: str, judge_id: str) -> set[tuple[str, str]]:
        """(prompt_uid, response_sha) pairs this judge has judged."""
        rows = self.conn.execute(
            "SELECT prompt_uid, response_sha FROM judgments WHERE variant_id=? AND decoding_id=? AND judge_id=?",
            (variant_id, decoding_id, judge_id))
        return {(r[0], r[1]) for r in rows}

    def add_judgments(self, rows: Iterable[JudgmentRow]) -> None:
        now = time.time()
        with self._tx() as c:
            c.executemany(
                "INSERT INTO judgments VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [(j.variant_id, j.prompt_uid, j.decoding_id, j.judge_id, j.response_sha, j.verdict, j.mode, j.raw,
                  j.attempts, int(j.truncated), json.dumps(j.scores) if j.scores is not None else None, now)
                 for j in rows],
            )

    def judged(self, judge_id: str | None = None, decoding_id: str | None = None,
               variant_ids: Sequence[str] | None = None, prompt_uids: Sequence[str] | None = None,
               ) -> list[dict[str, Any]]:
        """Generations joined with the judgments of exactly their response text: the input of every score."""
        sql = ("SELECT g.variant_id, g.prompt_uid, g.prompt_id, g.decoding_id, g.benchmark, g.lang, g.scenario, "
               "g.prompt, g.response, g.finished, g.truncated AS gen_truncated, j.judge_id, j.verdict, j.mode, "
               "j.truncated AS judge_truncated FROM generations g JOIN judgments j "
               "ON j.variant_id = g.variant_id AND j.prompt_uid = g.prompt_uid AND j.decoding_id = g.decoding_id "
               "AND j.response_sha = g.response_sha")
        where, args = _where({"j.judge_id": judge_id, "g.decoding_id": decoding_id})
        rows = [dict(r) for r in self.conn.execute(sql + where + " ORDER BY g.variant_id, g.prompt_uid", args)]
        keep_v = set(variant_ids) if variant_ids is not None else None
        keep_p = set(prompt_uids) if prompt_uids is not None else None
        return [r for r in rows if (keep_v is None or r["variant_id"] in keep_v)
                and (keep_p is None or r["prompt_uid"] in keep_p)]

    def put_agreement(self, judge_id: str, set_name: str, mapping: str, sample_id: str, row: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO agreement VALUES (?,?,?,?,?)",
                      (judge_id, set_name, mapping, sample_id, json.dumps(row, sort_keys=True)))

    def agreement(self, judge_id: str | None = None, sample_id: str | None = None) -> list[dict[str, Any]]:
        """Validation rows of a judge, on one validation sample when `sample_id` is given."""
        where, args = _where({"judge_id": judge_id, "sample_id": sample_id})
        return [json.loads(r["row_json"]) | {"judge_id": r["judge_id"], "sample_id": r["sample_id"]}
                for r in self.conn.execute(f"SELECT * FROM agreement{where} ORDER BY judge_id, set_name, mapping",
                                           args)]

    def record_study(self, study: StudyRecord) -> str:
        """Remember a study's cells (again, with a new run time, when re-run); returns its id."""
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO studies VALUES (?,?,?,?)",
                      (study.study_id, study.name, study.model_dump_json(), time.time()))
        return study.study_id

    def study(self, name: str | None = None) -> StudyRecord:
        """The most recently run study (of that name): what `quantsafe report DIR` reproduces."""
        sql, args = "SELECT * FROM studies", tuple[str, ...]()
        if name is not None:
            sql, args = sql + " WHERE name=?", (name,)
        row = self.conn.execute(sql + " ORDER BY last_run DESC LIMIT 1", args).fetchone()
        if row is None:
            known = sorted({r[0] for r in self.conn.execute("SELECT name FROM studies")})
            what = f"no study named '{name}'" if name else "no study recorded"
            raise QuantsafeError(f"{self.path}: {what} (recorded: {', '.join(known) or 'none'})")
        return StudyRecord.model_validate_json(row["record_json"])

    def add_items(self, items: Iterable[Prompt]) -> None:
        """Every item a study evaluates, so a report reads references and labels without the data files."""
        with self._tx() as c:
            c.executemany("INSERT OR IGNORE INTO items VALUES (?,?)", [(p.uid, p.model_dump_json()) for p in items])

    def items(self, prompt_uids: Sequence[str]) -> dict[str, Prompt]:
        """prompt uid -> the item as the study stored it."""
        wanted = set(prompt_uids)
        return {r[0]: Prompt.model_validate_json(r[1])
                for r in self.conn.execute("SELECT prompt_uid, item_json FROM items") if r[0] in wanted}

    def done_choices(self, variant_id: str, scoring_id: str) -> set[str]:
        rows = self.conn.execute("SELECT prompt_uid FROM choices WHERE variant_id=? AND scoring_id=?",
                                 (variant_id, scoring_id))
        return {r[0] for r in rows}

    def add_choices(self, rows: Iterable[ChoiceRow]) -> None:
        now = time.time()
        with self._tx() as c:
            c.executemany("INSERT INTO choices VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                          [(r.variant_id, r.prompt_uid, r.scoring_id, r.prediction, r.valid_mass,
                            json.dumps(r.logprobs, sort_keys=True), now) for r in rows])

    def choices(self, scoring_id: str, variant_ids: Sequence[str], prompt_uids: Sequence[str]) -> list[ChoiceRow]:
        keep_v, keep_p = set(variant_ids), set(prompt_uids)
        return [ChoiceRow(variant_id=r["variant_id"], prompt_uid=r["prompt_uid"], scoring_id=r["scoring_id"],
                          prediction=r["prediction"], valid_mass=r["valid_mass"],
                          logprobs=json.loads(r["logprobs_json"]))
                for r in self.conn.execute("SELECT * FROM choices WHERE scoring_id=? ORDER BY variant_id, "
                                           "prompt_uid", (scoring_id,))
                if r["variant_id"] in keep_v and r["prompt_uid"] in keep_p]

    def done_refusals(self, variant_id: str, decoding_id: str, refusal_id: str) -> set[tuple[str, str]]:
        rows = self.conn.execute("SELECT prompt_uid, response_sha FROM refusals WHERE variant_id=? AND "
                                 "decoding_id=? AND refusal_id=?", (variant_id, decoding_id, refusal_id))
        return {(r[0], r[1]) for r in rows}

    def add_refusals(self, rows: Iterable[RefusalRow]) -> None:
        now = time.time()
        with self._tx() as c:
            c.executemany("INSERT INTO refusals VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                          [(r.variant_id, r.prompt_uid, r.decoding_id, r.refusal_id, r.response_sha,
                            int(r.refused), now) for r in rows])

    def refusals(self, decoding_id: str, refusal_ids: Sequence[str], variant_ids: Sequence[str],
                 prompt_uids: Sequence[str]) -> list[RefusalRow]:
        """Refusal calls on exactly the stored response of each cell (a regenerated answer has none yet)."""
        sql = ("SELECT r.* FROM refusals r JOIN generations g ON g.variant_id = r.variant_id AND "
               "g.prompt_uid = r.prompt_uid AND g.decoding_id = r.decoding_id AND g.response_sha = r.response_sha "
               "WHERE r.decoding_id=?")
        keep_r, keep_v, keep_p = set(refusal_ids), set(variant_ids), set(prompt_uids)
        return [RefusalRow(**{k: r[k] for k in RefusalRow.model_fields})
                for r in self.conn.execute(sql, (decoding_id,))
                if r["refusal_id"] in keep_r and r["variant_id"] in keep_v and r["prompt_uid"] in keep_p]

    def table_rows(self, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and rows of one table (for CSV export)."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table}")
        cur = self.conn.execute(f"SELECT * FROM {table}")
        return [d[0] for d in cur.description], [tuple(r) for r in cur.fetchall()]
