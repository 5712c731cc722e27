"""OpenSafetyMini loader: real release counts, criteria, template, and clear errors on bad files."""

from __future__ import annotations

import json
import logging
import string
from collections import Counter
from pathlib import Path

import pytest

from quantsafe.benchmarks import (
    EXPECTED_SCENARIO_COUNTS,
    EXPECTED_TOTAL,
    XSAFETY_SCENARIOS,
    check_counts,
    judge_template_path,
    load_criteria,
    load_opensafetymini,
    load_xsafety,
)
from quantsafe.errors import DataError

HEADER = "prompt_id,lang,scenario,prompt\n"
# prompt_id = offset + row in the English XSafety file (paper reference note §2.1).
XSAFETY_OFFSETS = {"Reverse_Exposure": 8599, "Role_Play_Instruction": 8799,
                   "Crimes_And_Illegal_Activities": 9399, "Mental_Health": 9599,
                   "Unsafe_Instruction_Topic": 9799, "Goal_Hijacking": 9999,
                   "Privacy_And_Property": 10399, "Unfairness_And_Discrimination": 10999}


def write_osm(root: Path, body: bytes | str) -> Path:
    path = root / "opensafetymini" / "OpenSafetyMini.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(body, str):
        path.write_text(body, encoding="utf-8")
    else:
        path.write_bytes(body)
    return path


def test_real_counts(data_dir: Path) -> None:
    prompts = load_opensafetymini(data_dir, strict=True)
    assert len(prompts) == EXPECTED_TOTAL == 1067
    assert Counter(p.scenario for p in prompts) == EXPECTED_SCENARIO_COUNTS
    assert check_counts(prompts) == []
    assert {p.lang for p in prompts} == {"en"}
    assert len({p.uid for p in prompts}) == 1067
    assert all(p.text == p.text.strip() and p.text for p in prompts)
    assert prompts[0].human_id.startswith("opensafetymini/en/")


def test_prompts_are_english_xsafety_rows(data_dir: Path) -> None:
    xsafety = {p.prompt_id: " ".join(p.text.split()) for p in load_xsafety(data_dir)}
    for p in load_opensafetymini(data_dir):
        row = int(p.prompt_id) - XSAFETY_OFFSETS[p.scenario]
        assert xsafety[f"{p.scenario}:{row}"] == " ".join(p.text.split()), p.prompt_id


def test_criteria_and_template(data_dir: Path) -> None:
    criteria = load_criteria(data_dir)
    assert list(criteria) == list(XSAFETY_SCENARIOS)
    assert all(text.strip() for text in criteria.values())
    template = judge_template_path(data_dir)
    assert template is not None
    fields = {name for _, name, _, _ in string.Formatter().parse(template.read_text()) if name}
    assert fields == {"SCENARIO", "SCENARIO_INSTRUCTIONS", "PROMPT", "RESPONSE"}


def test_template_absent(tmp_path: Path) -> None:
    assert judge_template_path(tmp_path) is None


def test_subset_warns_then_strict_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_osm(tmp_path, HEADER + "1,en,Insult,a\n2,en,Mental_Health,b\n")
    with caplog.at_level(logging.WARNING):
        prompts = load_opensafetymini(tmp_path)
    assert [p.prompt_id for p in prompts] == ["1", "2"]
    assert "2 prompts in total, expected 1067" in caplog.text
    problems = check_counts(prompts)
    assert "scenario Insult: 1 prompts, none expected" in problems
    assert "scenario Mental_Health: 1 prompts, expected 73" in problems
    with pytest.raises(DataError, match="counts differ") as err:
        load_opensafetymini(tmp_path, strict=True)
    assert err.value.path == path


@pytest.mark.parametrize(("body", "match", "row", "field"), [
    ("prompt_id,lang,prompt\n1,en,a\n", "missing column", None, None),
    ("", "empty", None, None),
    (HEADER, "no data rows", None, None),
    (HEADER + "1,en,Not_A_Scenario,a\n", "unknown scenario 'Not_A_Scenario'", 2, "scenario"),
    (HEADER + "1,en,Insult,a\n2,en,Insult,\n", "empty value", 3, "prompt"),
    (HEADER + "1,en,Insult,a\n1,en,Insult,b\n", "duplicate prompt_id", 3, "prompt_id"),
    (HEADER + "1,en,Insult\n", "expected 4 cells, found 3", 2, None),
])
def test_bad_csv(tmp_path: Path, body: str, match: str, row: int | None, field: str | None) -> None:
    path = write_osm(tmp_path, body)
    with pytest.raises(DataError, match=match) as err:
        load_opensafetymini(tmp_path)
    assert str(err.value).startswith(str(path))
    assert (err.value.row, err.value.field) == (row, field)


def test_non_utf8(tmp_path: Path) -> None:
    path = write_osm(tmp_path, (HEADER + "1,en,Insult,caf\xe9\n").encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        load_opensafetymini(tmp_path)
    assert err.value.path == path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"OpenSafetyMini\.csv: file not found"):
        load_opensafetymini(tmp_path)


def write_criteria(root: Path, data: object) -> Path:
    path = root / "opensafetymini" / "safety_criteria.json"
    path.parent.mkdir(parents=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(("data", "match", "field"), [
    ("{not json", "invalid JSON at line 1", None),
    (["a list"], "expected a JSON object", None),
    ({s: "x" for s in XSAFETY_SCENARIOS[1:]}, "missing scenario", XSAFETY_SCENARIOS[0]),
    ({**{s: "x" for s in XSAFETY_SCENARIOS}, "Extra": "x"}, "unknown scenario", "Extra"),
    ({**{s: "x" for s in XSAFETY_SCENARIOS}, "Insult": ""}, "non-empty string", "Insult"),
])
def test_bad_criteria(tmp_path: Path, data: object, match: str, field: str | None) -> None:
    path = write_criteria(tmp_path, data)
    with pytest.raises(DataError, match=match) as err:
        load_criteria(tmp_path)
    assert (err.value.path, err.value.field) == (path, field)
