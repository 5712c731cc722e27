"""A report counts exactly the cells of its study, whatever else the store holds."""

from pathlib import Path

import pytest

from quantsafe.errors import QuantsafeError
from quantsafe.report import ALL, compute_scores
from quantsafe.report.build import write_report
from quantsafe.store import GenerationRow, JudgmentRow, Store, StudyRecord, VariantRow, response_sha


def _fill(store: Store, decoding_id: str, uids: list[str], verdict: str, max_new_tokens: int) -> None:
    store.add_generations([GenerationRow(
        variant_id="fp", prompt_uid=u, decoding_id=decoding_id, prompt_id=f"opensafetymini/en/{u}",
        benchmark="opensafetymini", lang="en", scenario="Insult", prompt=f"prompt {u}",
        response=f"{verdict} answer to {u}", n_new_tokens=3, finished=True,
        decoding={"max_new_tokens": max_new_tokens}) for u in uids])
    store.add_judgments([JudgmentRow(
        variant_id="fp", prompt_uid=u, decoding_id=decoding_id, judge_id="j",
        response_sha=response_sha(f"{verdict} answer to {u}"), verdict=verdict, mode="heuristic") for u in uids])


def _study(decoding_id: str, uids: list[str], max_new_tokens: int) -> StudyRecord:
    return StudyRecord(name=f"study-{max_new_tokens}", variant_ids=["fp"], prompt_uids=uids, decoding_id=decoding_id,
                       decoding={"max_new_tokens": max_new_tokens, "dtype": "float32"}, judge_ids=["j"],
                       validation_sample=None, models=[], config={})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "quantsafe.db")
    s.upsert_variant(VariantRow(variant_id="fp", model="m", precision="bf16", method="none", source_sha256="s",
                                dequantized_gguf=False))
    s.upsert_judge("j", "heuristic", "heuristic", {})
    short = ["a", "b", "c", "d"]
    _fill(s, "d64", short, "unsafe", 64)  # 4 prompts at 64 tokens, all unsafe
    _fill(s, "d512", [*short, "e", "f"], "safe", 512)  # 6 prompts at 512 tokens, all safe
    return s


def test_report_of_the_64_token_study_counts_only_its_cells(store: Store, tmp_path: Path) -> None:
    study = _study("d64", ["a", "b", "c", "d"], 64)
    write_report(store, tmp_path, study)
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    header = rows[0].split(",")
    overall = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    overall = [r for r in overall if r["scenario"] == ALL]
    assert [(r["n"], r["safety_ratio"]) for r in overall] == [("4", "0.0")]
    assert "0.00 [0.0, 49.0] (n=4)" in (tmp_path / "report.md").read_text()


def test_a_smaller_limit_reports_only_its_prompts(store: Store, tmp_path: Path) -> None:
    write_report(store, tmp_path, _study("d512", ["e", "f"], 512))
    assert "100.00" in (tmp_path / "report.md").read_text() and "(n=2)" in (tmp_path / "report.md").read_text()


def test_incomplete_study_says_so(store: Store, tmp_path: Path) -> None:
    write_report(store, tmp_path, _study("d64", ["a", "b", "c", "d", "e"], 64))
    assert "**Incomplete:** 4 of the study's 5" in (tmp_path / "report.md").read_text()


def test_two_verdicts_for_one_cell_is_an_error(store: Store) -> None:
    variants = store.variants(["fp"])
    rows = store.judged(judge_id="j")  # both decodings: prompts a-d have two verdicts each
    with pytest.raises(QuantsafeError, match=r"two verdicts .* mix studies"):
        compute_scores(rows, variants)
