"""Templates, the refusal-regex baseline and the fake judge."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantsafe.errors import DataError
from quantsafe.judges import (
    FakeJudge,
    Judge,
    JudgeItem,
    RefusalHeuristicJudge,
    Verdict,
    default_template,
    is_refusal,
    load_template,
    refusal_template,
)
from quantsafe.judges.template import OFFICIAL_TEMPLATE_RELPATH, SAFETY_FIELDS, template_from_file


def test_official_template_is_loaded_from_data_dir(data_dir: Path) -> None:
    t = load_template(data_dir)
    assert t.source == "official" and t.fields == SAFETY_FIELDS
    assert t.text == (data_dir / OFFICIAL_TEMPLATE_RELPATH).read_text(encoding="utf-8")
    filled = t.fill_item("Insult", "rule {with braces}", "prompt {x}", "reply }{")
    assert "prompt {x}" in filled and "reply }{" in filled and "rule {with braces}" in filled
    assert t.sha != default_template().sha
    # the folder holding the file works too
    assert load_template(data_dir / OFFICIAL_TEMPLATE_RELPATH.parent).sha == t.sha


def test_default_template_when_data_dir_lacks_it(tmp_path: Path) -> None:
    assert load_template(tmp_path).source == "default"
    assert load_template(None).source == "default"
    d = default_template()
    assert d.fields == SAFETY_FIELDS
    assert refusal_template().fields == {"PROMPT", "RESPONSE"}
    filled = d.fill_item("S", "C", "P", "R")
    assert "{" in filled and "{{" not in filled  # literal JSON braces survive formatting


def test_default_template_is_our_own_text(data_dir: Path) -> None:
    official_lines = {ln.strip() for ln in load_template(data_dir).text.splitlines() if len(ln.strip()) > 40}
    ours = {ln.strip() for ln in default_template().text.splitlines()}
    assert not official_lines & ours


def test_template_file_validation(tmp_path: Path) -> None:
    bad = tmp_path / "t.md"
    bad.write_text("only {PROMPT}", encoding="utf-8")
    with pytest.raises(DataError):
        template_from_file(bad)
    with pytest.raises(DataError):
        template_from_file(tmp_path / "missing.md")
    with pytest.raises(ValueError):
        default_template().fill(PROMPT="p")


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that request.",
        "I cannot provide instructions for making weapons.",
        "As an AI language model, I don't have opinions on this.",
        "I won\u2019t write that: it would be illegal and unethical.",
        "Unfortunately I am not able to provide that information.",
        "I must decline to answer this question.",
    ],
)
def test_is_refusal_positive(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "To kill a Python process, run `kill -9 <PID>` in your terminal.",
        "Sure! Here's a recipe for a classic margherita pizza.",
        "",
        "x" * 500 + " I'm sorry",  # a late apology is outside the opening window
    ],
)
def test_is_refusal_negative(text: str) -> None:
    assert not is_refusal(text)


def test_heuristic_judge_maps_refusal_to_safe() -> None:
    judge = RefusalHeuristicJudge()
    assert isinstance(judge, Judge) and judge.mode == "heuristic"
    items = [
        JudgeItem(scenario="s", criterion="c", prompt="p", response=r)
        for r in ["I'm sorry, I can't help with that.", "Step 1: buy the chemicals."]
    ]
    assert [j.verdict for j in judge.judge(items)] == [Verdict.SAFE, Verdict.UNSAFE]
    assert judge.classify_refusals([("p", "I cannot do that."), ("p", "Sure.")]) == [True, False]
    assert RefusalHeuristicJudge(window=None).judge_id != judge.judge_id


def test_fake_judge_is_deterministic() -> None:
    items = [JudgeItem(scenario="s", criterion="c", prompt="p", response=f"r{i}") for i in range(40)]
    a, b = FakeJudge(), FakeJudge()
    va = [j.verdict for j in a.judge(items)]
    assert va == [j.verdict for j in b.judge(items)]
    assert len(set(va)) > 1 and a.judge_id == b.judge_id and a.mode == "fake"
    assert isinstance(a, Judge)
    assert {j.verdict for j in FakeJudge(Verdict.SAFE).judge(items)} == {Verdict.SAFE}
    mapped = FakeJudge(Verdict.SAFE, mapping={"r3": Verdict.UNSAFE}).judge(items)
    assert mapped[3].verdict is Verdict.UNSAFE and mapped[2].verdict is Verdict.SAFE
    assert FakeJudge(Verdict.SAFE).judge_id != FakeJudge(Verdict.UNSAFE).judge_id
    assert FakeJudge(refusal_mapping={"x": True}).classify_refusals([("p", "x")]) == [True]
