import sqlite3
from pathlib import Path

import pytest

from quantsafe.benchmarks import Prompt
from quantsafe.errors import QuantsafeError
from quantsafe.store import (
    ChoiceRow,
    GenerationRow,
    JudgmentRow,
    RefusalRow,
    Store,
    StudyRecord,
    VariantRow,
    export_csv,
    response_sha,
)
from quantsafe.store.db import TABLES


def _gen(uid: str, response: str = "r", decoding_id: str = "d1") -> GenerationRow:
    return GenerationRow(variant_id="v1", prompt_uid=uid, decoding_id=decoding_id, prompt_id=f"osm/en/{uid}",
                         benchmark="opensafetymini", lang="en", scenario="Insult", prompt="p", response=response,
                         n_new_tokens=3, finished=True, decoding={"max_new_tokens": 8})


def _judgment(uid: str, response: str, verdict: str = "safe", decoding_id: str = "d1") -> JudgmentRow:
    return JudgmentRow(variant_id="v1", prompt_uid=uid, decoding_id=decoding_id, judge_id="j",
                       response_sha=response_sha(response), verdict=verdict, mode="fast", scores={"safe": -0.1})


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
        s.add_judgments([_judgment("a", "r")])
        assert s.done_judgments("v1", "d1", "j") == {("a", response_sha("r"))}
        joined = s.judged("j")
        assert [(r["prompt_uid"], r["verdict"], r["prompt_id"]) for r in joined] == [("a", "safe", "osm/en/a")]
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        paths = export_csv(s, tmp_path / "csv")
    assert {p.name for p in paths} == {f"{t}.csv" for t in TABLES}
    assert (tmp_path / "csv" / "generations.csv").read_text().count("\n") == 3


def test_a_verdict_counts_only_for_the_text_it_judged(tmp_path: Path) -> None:
    with Store.open(tmp_path / "q.db") as s:
        s.add_generations([_gen("a", "new answer")])
        s.add_judgments([_judgment("a", "old answer", "unsafe")])  # judged a response the store no longer has
        assert s.judged("j") == []
        s.add_judgments([_judgment("a", "new answer", "safe")])
        assert [r["verdict"] for r in s.judged("j")] == ["safe"]


def test_failed_batch_writes_nothing(tmp_path: Path) -> None:
    with Store.open(tmp_path / "q.db") as s:
        bad = _gen("c").model_copy(update={"prompt": None})  # NOT NULL violated mid-batch
        with pytest.raises(sqlite3.IntegrityError):
            s.add_generations([_gen("ok"), bad])
        assert s.done_generations("v1", "d1") == set()


def test_studies_are_recorded_and_the_last_run_is_found(tmp_path: Path) -> None:
    def record(name: str, decoding_id: str) -> StudyRecord:
        return StudyRecord(name=name, variant_ids=["v1"], prompt_uids=["a"], decoding_id=decoding_id, decoding={},
                           judge_ids=["j"], validation_sample=None, models=[], config={})

    with Store.open(tmp_path / "q.db") as s:
        with pytest.raises(QuantsafeError, match="no study recorded"):
            s.study()
        s.record_study(record("short", "d64"))
        s.record_study(record("long", "d512"))
        assert s.study().name == "long" and s.study("short").decoding_id == "d64"
        s.record_study(record("short", "d64"))  # re-run: now the latest
        assert s.study().name == "short"
        with pytest.raises(QuantsafeError, match=r"no study named .x. .*long, short"):
            s.study("x")


def test_not_a_store_is_one_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 50)
    with pytest.raises(QuantsafeError, match=r"junk\.db"):
        Store.open(junk)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE something (x)")
    conn.commit()
    conn.close()
    with pytest.raises(QuantsafeError, match="not a quantsafe results database"):
        Store.open(other)
    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.commit()
    conn.close()
    with pytest.raises(QuantsafeError, match="schema 1"):
        Store.open(old)
    with pytest.raises(QuantsafeError, match="no results database"):
        Store.open(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


def test_items_choices_and_refusals(tmp_path: Path) -> None:
    """The tables of the choice and refusal benchmarks: idempotent, and a refusal call never outlives its answer."""
    item = Prompt(benchmark="safetybench-dev", prompt_id="7", lang="en", scenario="Offensiveness", text="q",
                  reference="B", choices=("A", "B"), prefill="Answer: ")
    with Store.open(tmp_path / "q.db") as s:
        s.add_items([item, item])
        assert s.items([item.uid, "other"]) == {item.uid: item}
        row = ChoiceRow(variant_id="v1", prompt_uid=item.uid, scoring_id="s", prediction="B", valid_mass=0.9,
                        logprobs={"A": -2.0, "B": -0.2})
        s.add_choices([row, row.model_copy(update={"prediction": "A"})])  # a re-run keeps the first
        assert s.done_choices("v1", "s") == {item.uid} and s.done_choices("v1", "other") == set()
        assert s.choices("s", ["v1"], [item.uid]) == [row]
        s.add_generations([_gen("a", "I won't")])
        refusal = RefusalRow(variant_id="v1", prompt_uid="a", decoding_id="d1", refusal_id="r",
                             response_sha=response_sha("I won't"), refused=True)
        s.add_refusals([refusal, refusal])
        assert s.done_refusals("v1", "d1", "r") == {("a", response_sha("I won't"))}
        assert s.refusals("d1", ["r"], ["v1"], ["a"]) == [refusal]
        s.conn.execute("UPDATE generations SET response='Sure', response_sha=? WHERE prompt_uid='a'",
                       (response_sha("Sure"),))
        assert s.refusals("d1", ["r"], ["v1"], ["a"]) == []  # the stored answer changed: its old call is void
