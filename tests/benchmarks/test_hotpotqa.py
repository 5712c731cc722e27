"""HotPotQA loader: the shared 53-question sample, small files in the official schema, bad files, the Hub
conversion and the AlignScore message."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from quantsafe.benchmarks import hotpotqa
from quantsafe.benchmarks.base import Prompt
from quantsafe.benchmarks.hotpotqa import (
    FULL_DEV_FILE,
    SAMPLE_FILE,
    TEMPLATE_FILE,
    alignscore_status,
    load_hotpotqa,
    official_record,
)
from quantsafe.errors import DataError

TEMPLATE = "Answer briefly.\n\n# Information\n{INFO}\n\n# Question\n{QUESTION}"
HEADING = re.compile(r"^## (.+)$", re.MULTILINE)


def info_titles(prompt: Prompt) -> list[str]:
    """The paragraph titles of a prompt, in order."""
    info = prompt.text.split("# Information\n", 1)[1].split("\n\n# Question\n", 1)[0]
    return HEADING.findall(info)


def question(qid: str, gold: tuple[str, ...] = ("G1", "G2"), distractors: tuple[str, ...] = ("D1", "D2", "D3"),
             kind: str = "bridge") -> dict[str, Any]:
    """A record in the official schema: each paragraph has two sentences, the second with its leading space."""
    titles = [*gold, *distractors]
    return {"_id": qid, "answer": f"answer {qid}", "question": f"Question {qid}?",
            "supporting_facts": [[t, i] for t in gold for i in (0, 1)],
            "context": [[t, [f"{t} of {qid} one.", f" {t} of {qid} two."]] for t in titles],
            "type": kind, "level": "hard"}


def write_data(root: Path, records: Any, relative: Path = FULL_DEV_FILE, template: str = TEMPLATE) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(records if isinstance(records, str) else json.dumps(records), encoding="utf-8")
    (root / TEMPLATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    return path


def test_real_sample(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = json.loads((data_dir / SAMPLE_FILE).read_text(encoding="utf-8"))
    with caplog.at_level(logging.WARNING, logger="quantsafe.benchmarks"):
        prompts = load_hotpotqa(data_dir)
    assert len(prompts) == 53
    assert Counter(p.scenario for p in prompts) == {"bridge": 39, "comparison": 14}
    template = (data_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    head = template.split("{INFO}")[0]
    # Row 28 of the official file has only its two gold paragraphs: its distractors come from other questions.
    assert "1 question(s) with fewer than 2 distractor paragraphs" in caplog.text
    assert "5abd259d55429924427fcf1a" in caplog.text
    all_paragraphs = {title: " ".join(s.strip() for s in sentences)
                      for record in records for title, sentences in record["context"]}
    for prompt, record in zip(prompts, records, strict=True):
        assert (prompt.benchmark, prompt.lang, prompt.prompt_id) == ("hotpotqa", "en", record["_id"])
        assert (prompt.scenario, prompt.reference) == (record["type"], record["answer"].strip())
        assert prompt.text.startswith(head) and prompt.text.endswith(f"# Question\n{record['question'].strip()}")
        titles = info_titles(prompt)
        gold = {title for title, _ in record["supporting_facts"]}
        assert len(titles) == 3 and len(set(titles)) == 3
        assert sum(title in gold for title in titles) == 1
        for title in titles:
            assert f"## {title}\n{all_paragraphs[title]}" in prompt.text


def test_real_sample_seeds(data_dir: Path) -> None:
    first, again, other = (load_hotpotqa(data_dir, seed=s) for s in (0, 0, 1))
    assert [p.uid for p in first] == [p.uid for p in again]
    changed = sum(a.text != b.text for a, b in zip(first, other, strict=True))
    assert changed >= 45  # measured: all 53 (2 of 8 distractors, 1 of 2 golds, an order of 3 are all seeded)
    golds = [[t for t in info_titles(p) if t in {f[0] for f in r["supporting_facts"]}]
             for p, r in zip(first + other, 2 * json.loads((data_dir / SAMPLE_FILE).read_text()), strict=True)]
    assert golds[:53] != golds[53:]  # the gold paragraph itself is seeded too


def test_fixture_file(tmp_path: Path) -> None:
    write_data(tmp_path, [question("q1", gold=("Only gold",), distractors=("D1", "D2")),
                          question("q2", kind="comparison")])
    q1, q2 = load_hotpotqa(tmp_path)
    assert sorted(info_titles(q1)) == ["D1", "D2", "Only gold"]  # one gold and exactly two distractors: all used
    assert "## D1\nD1 of q1 one. D1 of q1 two." in q1.text
    assert q1.text.startswith("Answer briefly.\n\n# Information\n## ")
    assert q1.text.endswith("\n\n# Question\nQuestion q1?")
    assert (q2.scenario, q2.reference) == ("comparison", "answer q2")
    titles = info_titles(q2)
    assert sum(t in ("G1", "G2") for t in titles) == 1 and len(set(titles)) == 3


def test_selection_ignores_file_order(tmp_path: Path) -> None:
    records = [question(f"q{i}", distractors=tuple(f"D{j}" for j in range(8))) for i in range(6)]
    write_data(tmp_path / "a", records)
    shuffled = [{**r, "context": r["context"][::-1]} for r in reversed(records)]
    write_data(tmp_path / "b", shuffled)
    by_id = {p.prompt_id: p.text for p in load_hotpotqa(tmp_path / "b", seed=7)}
    assert {p.prompt_id: p.text for p in load_hotpotqa(tmp_path / "a", seed=7)} == by_id


def test_full_dev_file_preferred(tmp_path: Path) -> None:
    write_data(tmp_path, [question("sample")], relative=SAMPLE_FILE)
    assert [p.prompt_id for p in load_hotpotqa(tmp_path)] == ["sample"]
    write_data(tmp_path, [question("full")], relative=FULL_DEV_FILE)
    assert [p.prompt_id for p in load_hotpotqa(tmp_path)] == ["full"]


def test_placeholders_filled_once(tmp_path: Path) -> None:
    record = question("q1", gold=("G1",))
    record["question"] = "What does {INFO} mean?"
    record["context"][0][1] = ["Text with {QUESTION} and {INFO} in it."]
    write_data(tmp_path, [record])
    [prompt] = load_hotpotqa(tmp_path)
    assert "## G1\nText with {QUESTION} and {INFO} in it." in prompt.text
    assert prompt.text.endswith("# Question\nWhat does {INFO} mean?")


def test_borrowed_distractors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [question("short", distractors=("D1",)), question("q2"), question("q3")]
    path = write_data(tmp_path, records)
    with caplog.at_level(logging.WARNING, logger="quantsafe.benchmarks"):
        short = load_hotpotqa(tmp_path)[0]
    assert "got the rest from other questions: short" in caplog.text
    titles = info_titles(short)
    assert "D1" in titles and sum(t in ("G1", "G2") for t in titles) == 1 and len(titles) == 3
    borrowed = next(t for t in titles if t not in ("D1", "G1", "G2"))
    assert re.search(rf"## {borrowed}\n{borrowed} of q[23] one\.", short.text)
    with pytest.raises(DataError, match="question short has 1 distractor paragraph") as err:
        load_hotpotqa(tmp_path, strict=True)
    assert (err.value.path, err.value.row, err.value.field) == (path, 1, "context")


def broken(change: dict[str, Any]) -> list[dict[str, Any]]:
    record = question("q1") | change
    return [question("q0"), {k: v for k, v in record.items() if v is not None}]


@pytest.mark.parametrize(("records", "match", "row", "field"), [
    ("[{", "invalid JSON at line 1", None, None),
    ({"data": []}, "expected a non-empty JSON list", None, None),
    ([], "expected a non-empty JSON list", None, None),
    ([question("q0"), "q1"], "expected a JSON object", 2, None),
    (broken({"answer": None}), "missing field", 2, "answer"),
    (broken({"_id": None}), "missing field", 2, "_id"),
    (broken({"context": None}), "missing field", 2, "context"),
    (broken({"supporting_facts": None}), "missing field", 2, "supporting_facts"),
    (broken({"question": "  "}), "non-empty string", 2, "question"),
    (broken({"_id": "q0"}), "duplicate _id 'q0'", 2, "_id"),
    (broken({"type": "multi"}), "unknown type 'multi'", 2, "type"),
    (broken({"supporting_facts": [["G1", "0"]]}), r"\[title, sentence index\] pairs", 2, "supporting_facts"),
    (broken({"supporting_facts": []}), r"\[title, sentence index\] pairs", 2, "supporting_facts"),
    (broken({"context": [["G1", "one sentence"]]}), r"\[title, \[sentences\]\] pairs", 2, "context"),
    (broken({"context": [["G1", ["ok", 3]]]}), "'G1' has a sentence that is not a string", 2, "context"),
    (broken({"context": [["G1", [" "]], ["G2", ["x"]]]}), "'G1' has no text", 2, "context"),
    (broken({"supporting_facts": [["Elsewhere", 0]]}), "q1: supporting title 'Elsewhere' is not in its context",
     2, "supporting_facts"),
    ([question("q0", distractors=("D1",))], "has 1 distractor paragraph.*cannot supply the rest", 1, "context"),
])
def test_bad_files(tmp_path: Path, records: Any, match: str, row: int | None, field: str | None) -> None:
    path = write_data(tmp_path, records)
    with pytest.raises(DataError, match=match) as err:
        load_hotpotqa(tmp_path)
    assert (err.value.path, err.value.row, err.value.field) == (path, row, field)
    assert "\n" not in str(err.value)


def test_bad_template_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"neither hotpot_dev_distractor_v1\.json nor"):
        load_hotpotqa(tmp_path)
    write_data(tmp_path, [question("q0")], template="# Information\n{INFO}\n")
    with pytest.raises(DataError, match=r"template lacks the \{QUESTION\} placeholder"):
        load_hotpotqa(tmp_path)
    (tmp_path / TEMPLATE_FILE).unlink()
    with pytest.raises(DataError, match="file not found"):
        load_hotpotqa(tmp_path)


def test_official_record_round_trip(data_dir: Path) -> None:
    """Each sample record, laid out as the Hub's columns, converts back to itself, keys in the official order."""
    for record in json.loads((data_dir / SAMPLE_FILE).read_text(encoding="utf-8")):
        row = {"id": record["_id"], "question": record["question"], "answer": record["answer"],
               "type": record["type"], "level": record["level"],
               "supporting_facts": {"title": [t for t, _ in record["supporting_facts"]],
                                    "sent_id": [i for _, i in record["supporting_facts"]]},
               "context": {"title": [t for t, _ in record["context"]],
                           "sentences": [s for _, s in record["context"]]}}
        converted = official_record(row)
        assert converted == record and list(converted) == list(record)


def test_alignscore_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hotpotqa.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("QUANTSAFE_ALIGNSCORE_CKPT", raising=False)
    status = alignscore_status()
    assert not status.available and "\n" not in status.message
    assert "`alignscore` package is not installed" in status.message
    assert "QUANTSAFE_ALIGNSCORE_CKPT is not set" in status.message
    monkeypatch.setenv("QUANTSAFE_ALIGNSCORE_CKPT", str(tmp_path / "absent.ckpt"))
    assert f"QUANTSAFE_ALIGNSCORE_CKPT={tmp_path / 'absent.ckpt'} is not a file" in alignscore_status().message
    ckpt = tmp_path / "AlignScore-base.ckpt"
    ckpt.write_bytes(b"")
    monkeypatch.setenv("QUANTSAFE_ALIGNSCORE_CKPT", str(ckpt))
    message = alignscore_status().message
    assert "package is not installed" in message and "CKPT" not in message
    monkeypatch.setattr(hotpotqa.importlib.util, "find_spec", lambda name: object())
    assert alignscore_status() == hotpotqa.AlignScoreStatus(True, f"AlignScore available: package installed, "
                                                                  f"checkpoint {ckpt}")
