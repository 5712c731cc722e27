"""The annotation tables, kept in the study's own quantsafe.db so labels travel with the answers they judge.

Only hashes of secrets are stored (annotator tokens, session ids): a copied database grants no access.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field

from quantsafe.errors import QuantsafeError
from quantsafe.judges.base import Verdict
from quantsafe.store import Store

LABELS = tuple(v.value for v in Verdict)  # the judges' verdicts, so people and judges compare one to one
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (name TEXT PRIMARY KEY, token_sha TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS annotation_sessions (
    session_sha TEXT PRIMARY KEY, annotator TEXT NOT NULL, csrf TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS annotation_sample (
    study_id TEXT NOT NULL, unit_id TEXT NOT NULL, variant_id TEXT NOT NULL, prompt_uid TEXT NOT NULL,
    decoding_id TEXT NOT NULL, response_sha TEXT NOT NULL, contested INTEGER NOT NULL, disagree INTEGER NOT NULL,
    flip INTEGER NOT NULL, PRIMARY KEY (study_id, unit_id));
CREATE TABLE IF NOT EXISTS human_labels (
    annotator TEXT NOT NULL, variant_id TEXT NOT NULL, prompt_uid TEXT NOT NULL, decoding_id TEXT NOT NULL,
    response_sha TEXT NOT NULL, label TEXT NOT NULL, note TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (annotator, variant_id, prompt_uid, decoding_id, response_sha));
"""


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


Key = Annotated[str, Field(min_length=1)]


class Unit(BaseModel, frozen=True):
    """One generated answer: a judgment's key without the judge."""

    variant_id: Key
    prompt_uid: Key
    decoding_id: Key
    response_sha: Key

    @property
    def unit_id(self) -> str:
        """Opaque id for pages and forms: it must not reveal which variant wrote the answer."""
        return sha256_hex("\x00".join((self.variant_id, self.prompt_uid, self.decoding_id, self.response_sha)))[:20]


class HumanLabel(Unit, frozen=True):
    """One person's label of one answer (the aggregation's input)."""

    annotator: str
    label: Verdict
    note: str = ""


class SampleItem(Unit, frozen=True):
    """A sampled answer; `contested` ones (judges disagree or the verdict flips against full precision) go first."""

    disagree: bool
    flip: bool

    @property
    def contested(self) -> bool:
        return self.disagree or self.flip


class Session(BaseModel):
    annotator: str
    csrf: str
    expires: float


class ShownItem(BaseModel):
    """What an annotator reads of an answer (never its variant)."""

    unit: Unit
    benchmark: str
    lang: str
    scenario: str
    prompt: str
    response: str


class AnnotationStore:
    """The annotation tables of one quantsafe.db, shared by the web app's threads behind one lock."""

    def __init__(self, path: Path | str):
        path = Path(path)
        Store.open(path, create=False).close()  # a missing or foreign database is one line, here
        try:
            self.conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")  # a label is on disk when the page says it is saved
            self.conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise QuantsafeError(f"{path}: cannot open the annotation tables ({exc})") from None
        self.path = path
        self.store = Store(self.conn, path)  # the study's read methods, on the same connection
        self._lock = threading.RLock()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: committed on success, rolled back on error."""
        with self._lock, self.conn:
            yield self.conn

    # annotators and sessions

    def add_annotator(self, name: str, replace: bool = False) -> str:
        """A new personal token (returned once, stored as its hash); `replace` rotates it and ends their sessions."""
        if not NAME_PATTERN.fullmatch(name):
            raise QuantsafeError(f"annotator name '{name}': use 1-64 letters, digits, '_', '.', '@' or '-'")
        token = secrets.token_urlsafe(32)
        with self.tx() as c:
            exists = c.execute("SELECT 1 FROM annotators WHERE name=?", (name,)).fetchone()
            if exists and not replace:
                raise QuantsafeError(f"{self.path}: annotator '{name}' exists (--replace issues a new token)")
            c.execute("INSERT OR REPLACE INTO annotators VALUES (?,?,?)", (name, sha256_hex(token), time.time()))
            c.execute("DELETE FROM annotation_sessions WHERE annotator=?", (name,))
        return token

    def annotators(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.conn.execute("SELECT name FROM annotators ORDER BY name")]

    def check_token(self, token: str) -> str | None:
        """The annotator holding `token`; every stored hash is compared in constant time, none skipped."""
        digest = sha256_hex(token)
        with self._lock:
            rows = self.conn.execute("SELECT name, token_sha FROM annotators").fetchall()
        found = None
        for name, stored in rows:
            if hmac.compare_digest(digest, stored):
                found = name
        return found

    def new_session(self, annotator: str, ttl_s: float, now: float) -> tuple[str, Session]:
        """A session id for the cookie (stored hashed) and its per-session CSRF token."""
        session_id, session = secrets.token_urlsafe(32), Session(annotator=annotator, csrf=secrets.token_urlsafe(32),
                                                                 expires=now + ttl_s)
        with self.tx() as c:
            c.execute("DELETE FROM annotation_sessions WHERE expires <= ?", (now,))
            c.execute("INSERT INTO annotation_sessions VALUES (?,?,?,?)",
                      (sha256_hex(session_id), annotator, session.csrf, session.expires))
        return session_id, session

    def session(self, session_id: str, now: float) -> Session | None:
        """The live session of a cookie value; an expired one is deleted and reads as none."""
        key = sha256_hex(session_id)
        with self._lock:
            row = self.conn.execute("SELECT annotator, csrf, expires FROM annotation_sessions WHERE session_sha=?",
                                    (key,)).fetchone()
        if row is None:
            return None
        if row["expires"] <= now:
            self.end_session(session_id)
            return None
        return Session(annotator=row["annotator"], csrf=row["csrf"], expires=row["expires"])

    def end_session(self, session_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM annotation_sessions WHERE session_sha=?", (sha256_hex(session_id),))

    # the sample

    def set_sample(self, study_id: str, items: Sequence[SampleItem]) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM annotation_sample WHERE study_id=?", (study_id,))
            c.executemany("INSERT INTO annotation_sample VALUES (?,?,?,?,?,?,?,?,?)",
                          [(study_id, i.unit_id, i.variant_id, i.prompt_uid, i.decoding_id, i.response_sha,
                            int(i.contested), int(i.disagree), int(i.flip)) for i in items])

    def sample(self, study_id: str) -> list[SampleItem]:
        """The study's sampled answers whose text is still the stored one (a regenerated answer drops out)."""
        sql = ("SELECT s.* FROM annotation_sample s JOIN generations g ON g.variant_id = s.variant_id AND "
               "g.prompt_uid = s.prompt_uid AND g.decoding_id = s.decoding_id AND g.response_sha = s.response_sha "
               "WHERE s.study_id=? ORDER BY s.unit_id")
        with self._lock:
            rows = self.conn.execute(sql, (study_id,)).fetchall()
        return [SampleItem(**{k: r[k] for k in SampleItem.model_fields}) for r in rows]

    def shown(self, unit: Unit) -> ShownItem | None:
        """The generated answer behind a unit, or None when the store no longer holds that text."""
        with self._lock:
            row = self.conn.execute(
                "SELECT benchmark, lang, scenario, prompt, response FROM generations WHERE variant_id=? AND "
                "prompt_uid=? AND decoding_id=? AND response_sha=?",
                (unit.variant_id, unit.prompt_uid, unit.decoding_id, unit.response_sha)).fetchone()
        return None if row is None else ShownItem(unit=unit, **dict(row))

    def has_answer(self, unit: Unit) -> bool:
        return self.shown(unit) is not None

    # labels

    def put_label(self, label: HumanLabel, now: float | None = None) -> None:
        """Insert or revise one label, committed on its own."""
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO human_labels VALUES (?,?,?,?,?,?,?,?)",
                      (label.annotator, label.variant_id, label.prompt_uid, label.decoding_id, label.response_sha,
                       label.label, label.note, time.time() if now is None else now))

    def put_labels(self, labels: Sequence[HumanLabel]) -> None:
        """Many labels in one transaction (an import is all or nothing)."""
        now = time.time()
        with self.tx() as c:
            c.executemany("INSERT OR REPLACE INTO human_labels VALUES (?,?,?,?,?,?,?,?)",
                          [(x.annotator, x.variant_id, x.prompt_uid, x.decoding_id, x.response_sha, x.label,
                            x.note, now) for x in labels])

    def labels(self, annotator: str | None = None) -> list[HumanLabel]:
        """Everyone's labels, or one annotator's: the only way pages read labels is with their own name."""
        sql, args = "SELECT * FROM human_labels", tuple[str, ...]()
        if annotator is not None:
            sql, args = sql + " WHERE annotator=?", (annotator,)
        with self._lock:
            rows = self.conn.execute(sql + " ORDER BY annotator, variant_id, prompt_uid, decoding_id, response_sha",
                                     args).fetchall()
        return [HumanLabel(**{k: r[k] for k in HumanLabel.model_fields}) for r in rows]


def human_labels(db_path: Path | str) -> list[HumanLabel]:
    """Every human label in a study's store, for agreement statistics (empty when nobody has annotated)."""
    with AnnotationStore(db_path) as annotations:
        return annotations.labels()
