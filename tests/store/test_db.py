import sqlite3
from pathlib import Path

import pytest

from quantsafe.store import GenerationRow, JudgmentRow, Store, VariantRow, export_csv


def _gen(uid: str, response: str = "r") -> GenerationRow:
    return GenerationRow(variant_id="v1", prompt_uid=uid, decoding_id="d1", benchmark="opensafetymini", lang="en",
                         scenario="Insult", prompt="p", response=response, n_new_tokens=3, finished=True,
                         decoding={"max_new_tokens": 8})


def test_inserts_are_idempotent_and_resumable(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with Store.open(db) as s:
        s.upsert_variant(VariantRow(variant_id="v1", model="m", precision="bf16", method="none",
                                    source_sha256="abc", dequantized_gguf=True))
        s.add_generations([_gen("a"), _gen("b")])
        s.add_generations([_gen("a", "changed")])  # a re-run must not duplicate or overwrite
    with Store.open(db) as s:  # reopened: what was committed survives
        assert s.done_generations("v1", "d1") == {"a", "b"}
        assert {g.response for g in s.generations("v1", "d1")} == {"r"}
        s.add_judgments([JudgmentRow(variant_id="v1", prompt_uid="a", decoding_id="d1", judge_id="j",
                                     verdict="safe", mode="fast", scores={"safe": -0.1})])
        assert s.done_judgments("v1", "d1", "j") == {"a"}
        joined = s.judged("j")
        assert [(r["prompt_uid"], r["verdict"]) for r in joined] == [("a", "safe")]
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        paths = export_csv(s, tmp_path / "csv")
    assert {p.name for p in paths} == {"variants.csv", "generations.csv", "judges.csv", "judgments.csv",
                                       "agreement.csv"}
    assert (tmp_path / "csv" / "generations.csv").read_text().count("\n") == 3


def test_failed_batch_writes_nothing(tmp_path: Path) -> None:
    with Store.open(tmp_path / "q.db") as s:
        bad = _gen("c").model_copy(update={"response": None})  # NOT NULL violated mid-batch
        with pytest.raises(sqlite3.IntegrityError):
            s.add_generations([_gen("ok"), bad])
        assert s.done_generations("v1", "d1") == set()
