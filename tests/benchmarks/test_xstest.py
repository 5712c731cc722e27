"""XSTest loaders: the 450 prompts, the human-labelled completions, and the safety reading of their labels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from quantsafe.benchmarks import LabelledCompletion, load_xstest_completions, load_xstest_prompts
from quantsafe.errors import DataError

COMPLETION_HEADER = "id,type,prompt,completion,annotation_1,annotation_2,agreement,final_label\n"


def test_real_prompts(data_dir: Path) -> None:
    prompts = load_xstest_prompts(data_dir, strict=True)
    assert len(prompts) == 450
    assert Counter(p.label for p in prompts) == {"safe": 250, "unsafe": 200}
    assert all((p.label == "unsafe") == p.scenario.startswith("contrast_") for p in prompts)
    assert len({p.scenario for p in prompts}) == 18
    assert prompts[0].human_id == "xstest/en/1"


def test_real_completions(data_dir: Path) -> None:
    completions = load_xstest_completions(data_dir)
    assert {name: len(items) for name, items in completions.items()} == {
        "gpt4": 450, "llama2orig": 450, "mistralinstruct_even_ids": 225}
    # Measured: GPT-4 and Llama-2 refuse almost every unsafe prompt; Mistral fully complies with 66.
    unsafe = {name: sum(c.human_safety == "unsafe" for c in items) for name, items in completions.items()}
    assert unsafe == {"gpt4": 1, "llama2orig": 0, "mistralinstruct_even_ids": 66}
    refusals = {name: sum(c.is_refusal for c in items) for name, items in completions.items()}
    assert refusals == {"gpt4": 220, "llama2orig": 349, "mistralinstruct_even_ids": 36}
    mistral = completions["mistralinstruct_even_ids"]
    assert all(int(c.id.removeprefix("v2-")) % 2 == 0 for c in mistral)
    assert sum(c.prompt_is_unsafe for c in mistral) == 102
    by_id = {p.prompt_id: p for p in load_xstest_prompts(data_dir)}
    for items in completions.values():  # completion "v2-<n>" answers prompt <n>
        assert all(by_id[c.id.removeprefix("v2-")].scenario == c.type for c in items)


@pytest.mark.parametrize(("type_", "label", "refusal", "safety"), [
    ("contrast_homonyms", "1_full_compliance", False, "unsafe"),
    ("contrast_homonyms", "3_partial_refusal", True, "safe"),
    ("contrast_homonyms", "2_full_refusal", True, "safe"),
    ("homonyms", "1_full_compliance", False, "safe"),
    ("homonyms", "2_full_refusal", True, "safe"),
])
def test_labelled_completion_semantics(type_: str, label: str, refusal: bool, safety: str) -> None:
    item = LabelledCompletion.model_validate(
        {"id": "v2-1", "type": type_, "prompt": "p", "completion": "c", "final_label": label})
    assert item.is_refusal is refusal
    assert item.prompt_is_unsafe is type_.startswith("contrast_")
    assert item.human_safety == safety


def write(root: Path, relative: str, body: str) -> Path:
    path = root / "xstest" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


def test_empty_completion_is_kept(tmp_path: Path) -> None:
    write(tmp_path, "labelled_completions/m.csv",
          COMPLETION_HEADER + "v2-1,contrast_x,p,,1_full_compliance,1_full_compliance,TRUE,2_full_refusal\n")
    [item] = load_xstest_completions(tmp_path)["m"]
    assert item.completion == ""
    assert item.human_safety == "safe"


@pytest.mark.parametrize(("body", "match", "row", "field"), [
    (COMPLETION_HEADER + "v2-1,homonyms,p,c,a,b,TRUE,4_other\n", "unknown label '4_other'", 2, "final_label"),
    (COMPLETION_HEADER + "v2-1,homonyms,,c,a,b,TRUE,2_full_refusal\n", "empty value", 2, "prompt"),
    ("id,type,prompt,completion\nv2-1,homonyms,p,c\n", "missing column.*final_label", None, None),
    ("", "file is empty", None, None),
])
def test_bad_completions(tmp_path: Path, body: str, match: str, row: int | None, field: str | None) -> None:
    path = write(tmp_path, "labelled_completions/m.csv", body)
    with pytest.raises(DataError, match=match) as err:
        load_xstest_completions(tmp_path)
    assert (err.value.path, err.value.row, err.value.field) == (path, row, field)


def test_missing_completions(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        load_xstest_completions(tmp_path)
    (tmp_path / "xstest" / "labelled_completions").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no \.csv files"):
        load_xstest_completions(tmp_path)


@pytest.mark.parametrize(("body", "match", "row", "field"), [
    ("id,prompt,type,label\n1,p,homonyms,maybe\n", "safe or unsafe, not 'maybe'", 2, "label"),
    ("id,prompt,type,label\n1,p,homonyms,safe\n1,q,homonyms,safe\n", "duplicate id", 3, "id"),
    ("id,prompt,label\n1,p,safe\n", "missing column.*type", None, None),
])
def test_bad_prompts(tmp_path: Path, body: str, match: str, row: int | None, field: str | None) -> None:
    path = write(tmp_path, "xstest_prompts.csv", body)
    with pytest.raises(DataError, match=match) as err:
        load_xstest_prompts(tmp_path)
    assert (err.value.path, err.value.row, err.value.field) == (path, row, field)


def test_prompt_subset(tmp_path: Path) -> None:
    write(tmp_path, "xstest_prompts.csv", "id,prompt,type,label,focus,note\n1,p,homonyms,safe,,\n")
    assert len(load_xstest_prompts(tmp_path)) == 1
    with pytest.raises(DataError, match="1 prompts, expected 450"):
        load_xstest_prompts(tmp_path, strict=True)


def test_missing_prompts_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"xstest_prompts\.csv: file not found"):
        load_xstest_prompts(tmp_path)
