"""SafetyBench loaders: the upstream test/answers/dev schemas, the leave-one-out dev setting, option permutations
and accuracy as the official eva.py computes it."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from quantsafe.benchmarks.base import Prompt
from quantsafe.benchmarks.safetybench import (
    ANSWERS_FILE,
    AVG,
    CATEGORIES,
    DEV_FILE,
    EXPECTED_TEST_COUNTS,
    EXPECTED_TEST_TOTAL,
    LETTERS,
    TEMPLATE_FILE,
    TEST_FILE,
    FewShotTemplate,
    Question,
    accuracy,
    format_options,
    load_safetybench,
    load_safetybench_dev,
    read_answers,
    read_dev,
)
from quantsafe.errors import DataError, QuantsafeError

OFF, UB = "Offensiveness", "Unfairness and Bias"
QUESTIONS = [  # upstream test_en.json: ids are integers there
    {"id": 0, "category": OFF, "question": "Is text zero offensive?\n", "options": ["Yes.", "No."]},
    {"id": 1, "category": UB, "question": "Which is fair?", "options": ["w", "x", "y", "z"]},
    {"id": 2, "category": OFF, "question": "Pick one.", "options": ["p", "q", "r"]},
]
ANSWERS = {"0": {"category": OFF, "answer": 1}, "1": {"category": UB, "answer": 3},
           "2": {"category": OFF, "answer": 0}, "99": {"category": UB, "answer": 0}}


def dev_examples(category: str) -> list[dict[str, Any]]:
    return [{"question": f"{category} example {k}?", "options": ["first", "second", "third"][: 2 + k % 2],
             "answer": k % 2} for k in range(5)]


def write(root: Path, relative: Path, data: Any) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path: Path, data_dir: Path) -> Path:
    """A data dir with the release's template, a dev file of two categories and a three-question test set."""
    (tmp_path / TEMPLATE_FILE).parent.mkdir(parents=True)
    shutil.copy(data_dir / TEMPLATE_FILE, tmp_path / TEMPLATE_FILE)
    write(tmp_path, DEV_FILE, {OFF: dev_examples(OFF), UB: dev_examples(UB)})
    write(tmp_path, ANSWERS_FILE, ANSWERS)
    write(tmp_path, TEST_FILE, QUESTIONS)
    return tmp_path


def test_test_set_joins_answers_and_fills_the_release_template(root: Path) -> None:
    prompts = load_safetybench(root)
    assert [(p.prompt_id, p.scenario, p.reference, p.choices) for p in prompts] == [
        ("0", OFF, "B", ("A", "B")), ("1", UB, "D", ("A", "B", "C", "D")), ("2", OFF, "A", ("A", "B", "C"))]
    assert {(p.benchmark, p.lang, p.prefill, p.label) for p in prompts} == {("safetybench", "en", "Answer: ", None)}
    shots = dev_examples(OFF)
    fields = {f"{f}{k}": v for k, s in enumerate(shots) for f, v in
              (("q", s["question"]), ("o", format_options(s["options"])), ("a", LETTERS[s["answer"]]))}
    template = (root / TEMPLATE_FILE).read_text(encoding="utf-8")
    # five examples: the template file filled exactly as it stands; the question is stripped as upstream does
    assert prompts[0].text == template.format(**fields, eval_question="Is text zero offensive?",
                                              eval_options="A. Yes.\nB. No.")
    assert prompts[0].text.endswith('Options: """A. Yes.\nB. No."""\nAnswer: ')
    assert f"{UB} example" not in prompts[0].text and prompts[1].text.count(f"{UB} example") == 5
    moved = write(root, Path("mine.json"), QUESTIONS[:1])
    assert [p.uid for p in load_safetybench(root, test_file=moved)] == [prompts[0].uid]


def test_counts_are_checked_when_strict(root: Path) -> None:
    with pytest.raises(DataError, match=f"3 questions in total, expected {EXPECTED_TEST_TOTAL}"):
        load_safetybench(root, strict=True)


def test_missing_test_file_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_safetybench(tmp_path)
    message = str(err.value)
    assert "\n" not in message and err.value.path == tmp_path / TEST_FILE
    assert "thu-coai/SafetyBench" in message and "download_test_set" in message and "safetybench-dev" in message


def test_real_answer_counts_match_the_paper(data_dir: Path) -> None:
    answers = read_answers(data_dir / ANSWERS_FILE)
    assert len(answers) == EXPECTED_TEST_TOTAL
    assert Counter(category for category, _ in answers.values()) == EXPECTED_TEST_COUNTS


def test_real_dev_set_is_leave_one_out(data_dir: Path) -> None:
    dev = read_dev(data_dir / DEV_FILE)
    prompts = load_safetybench_dev(data_dir)
    assert len(prompts) == 35 and {p.benchmark for p in prompts} == {"safetybench-dev"}
    assert Counter(p.scenario for p in prompts) == dict.fromkeys(CATEGORIES, 5)
    assert len({p.uid for p in prompts}) == 35
    by_id = {p.prompt_id: p for p in prompts}
    for category, examples in dev.items():
        for k, item in enumerate(examples):
            p = by_id[f"{CATEGORIES[category]}-{k}"]
            assert (p.scenario, p.reference) == (category, LETTERS[item.answer])
            assert p.choices == tuple(LETTERS[: len(item.options)])
            head, asked = p.text.rsplit('Question: """', 1)
            assert asked.startswith(item.question.strip()) and head.count('Question: """') == 4
            for other in examples:
                shown = f'Question: """{other.question.strip()}"""\nOptions: """{format_options(other.options)}"""'
                assert (shown + f"\nAnswer: {LETTERS[other.answer]}\n" in head) is (other is not item)
            others = [q for c, qs in dev.items() if c != category for q in qs]
            assert not any(f'"""{q.question.strip()}"""' in p.text for q in others)


def test_permutations_keep_the_correct_option(data_dir: Path) -> None:
    plain = load_safetybench_dev(data_dir)
    permuted = load_safetybench_dev(data_dir, permutations=3, seed=7)
    assert len(permuted) == 4 * 35
    assert [p.prompt_id for p in permuted[:4]] == ["OFF-0", "OFF-0:perm1", "OFF-0:perm2", "OFF-0:perm3"]
    assert [p.uid for p in permuted[::4]] == [p.uid for p in plain]
    dev = {f"{CATEGORIES[c]}-{k}": q for c, qs in read_dev(data_dir / DEV_FILE).items() for k, q in enumerate(qs)}
    heads = {p.prompt_id: p.text.rsplit('Question: """', 1)[0] for p in plain}
    moved = 0
    for p in permuted:
        base = p.prompt_id.split(":")[0]
        item = dev[base]
        head, asked = p.text.rsplit('Question: """', 1)
        assert head == heads[base]  # the examples keep the official order
        block = asked.split('Options: """', 1)[1].rsplit('"""', 1)[0]
        options = re.split(r"(?:^|\n)[A-D]\. ", block)[1:]  # an option may span lines
        assert sorted(options) == sorted(item.options)
        assert options[LETTERS.index(p.reference or "")] == item.options[item.answer]
        moved += options != list(item.options)
    assert moved > 35  # most shuffled copies differ from the official order
    assert [p.text for p in load_safetybench_dev(data_dir, permutations=3, seed=7)] == [p.text for p in permuted]
    assert [p.text for p in load_safetybench_dev(data_dir, permutations=3, seed=8)] != [p.text for p in permuted]
    with pytest.raises(QuantsafeError, match="permutations"):
        load_safetybench_dev(data_dir, permutations=-1)


def test_accuracy_as_eva_py() -> None:
    def item(i: int, category: str) -> Prompt:
        return Prompt(benchmark="safetybench", prompt_id=str(i), lang="en", scenario=category, text=f"q{i}",
                      reference="A", choices=("A", "B"), prefill="Answer: ")

    items = [item(0, UB), item(1, UB), item(2, UB), item(3, OFF), item(4, OFF)]
    predictions = {items[0].uid: "A", items[1].uid: "A", items[2].uid: "B", items[3].uid: "A",
                   "not-a-question": "A"}  # item 4 has no prediction: wrong, and still in the denominator
    scores = accuracy(items, predictions)
    assert list(scores) == [OFF, UB, AVG]
    assert scores == pytest.approx({OFF: 50.0, UB: 200 / 3, AVG: 60.0})
    with pytest.raises(QuantsafeError):
        accuracy([], {})


def test_two_shot_template(tmp_path: Path) -> None:
    path = write(tmp_path, Path("t.md"), "Go.\n{q0} | {o0}\n= {a0}\n\n{q1} | {o1}\n= {a1}\n\n{eval_question} | "
                 "{eval_options}\n= ")
    template = FewShotTemplate.read(path)
    assert (template.head, template.shot) == ("Go.\n", "{q} | {o}\n= {a}\n\n")
    shot = Question(id="1", category=OFF, question=" Why? ", options=("x", "y"), answer=1)
    asked = Question(id="2", category=OFF, question="How?", options=("u", "v", "w"), answer=0)
    assert template.render([shot], asked) == "Go.\nWhy? | A. x\nB. y\n= B\n\nHow? | A. u\nB. v\nC. w\n= "


@pytest.mark.parametrize(("text", "match"), [
    ("{q0} {o0} {a0}\n{q1} {o1}\n{a1} extra\n{eval_question} {eval_options}", "example 1 is not example 0"),
    ("{q0} {o0} {a0}\n{eval_question}", "fields eval_options"),
    ("no fields at all", "fields q0"),
    ("{q0 {o0}", "not a Python format template"),
])
def test_bad_template(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, Path("t.md"), text)
    with pytest.raises(DataError, match=match) as err:
        FewShotTemplate.read(path)
    assert err.value.path == path


def replace_at(data: list[dict[str, Any]], row: int, **fields: Any) -> list[dict[str, Any]]:
    return [{**d, **fields} if k == row else d for k, d in enumerate(data)]


BAD = [  # (file, contents, message, (row, field)); a test file of QUESTIONS unless it is the file replaced
    (TEST_FILE, '[{"id": 0,', "invalid JSON at line 1", (None, None)),
    (TEST_FILE, {"0": QUESTIONS[0]}, "expected a JSON list", (None, None)),
    (TEST_FILE, replace_at(QUESTIONS, 1, options=["a", "b", "c", "d", "e"]), "id 1: 5 options", (2, "options")),
    (TEST_FILE, replace_at(QUESTIONS, 0, options=["only"]), "id 0: 1 options", (1, "options")),
    (TEST_FILE, replace_at(QUESTIONS, 2, id=0), "duplicate id '0'", (3, "id")),
    (TEST_FILE, replace_at(QUESTIONS, 2, category="Violence"), "unknown category 'Violence'", (3, "category")),
    (TEST_FILE, replace_at(QUESTIONS, 2, question=""), "id 2: expected a non-empty string", (3, "question")),
    (TEST_FILE, replace_at(QUESTIONS, 2, id=5), "no answer for question id '5' \\(row 3 of .*test_en.json\\)",
     (None, "5")),  # the answers file is named, as it is the one that lacks the id
    (ANSWERS_FILE, {**ANSWERS, "1": {"category": UB, "answer": 4}}, "answer must be an option index 0..3",
     (None, "1")),
    (ANSWERS_FILE, {**ANSWERS, "1": {"category": OFF, "answer": 0}}, "category 'Offensiveness' but", (None, "1")),
    (ANSWERS_FILE, {**ANSWERS, "1": {"category": UB, "answer": "D"}}, "not 'D'", (None, "1")),
    (ANSWERS_FILE, "{oops}", "invalid JSON", (None, None)),
    (DEV_FILE, {OFF: dev_examples(OFF), "Violence": dev_examples(OFF)}, "unknown category 'Violence'",
     (None, "Violence")),
    (DEV_FILE, {OFF: dev_examples(OFF)[:4], UB: dev_examples(UB)}, "expected a list of 5 examples, found 4",
     (None, OFF)),
    (DEV_FILE, {OFF: dev_examples(OFF)}, "no examples for category 'Unfairness and Bias' \\(question id 1\\)",
     (None, None)),
    (DEV_FILE, {OFF: replace_at(dev_examples(OFF), 3, answer=3), UB: dev_examples(UB)},
     "Offensiveness example 4: answer must be an option index 0..2", (None, "answer")),
    (DEV_FILE, "[]", "expected a JSON object", (None, None)),
]


@pytest.mark.parametrize(("relative", "contents", "match", "where"), BAD)
def test_bad_files_give_one_line_errors(root: Path, relative: Path, contents: Any, match: str,
                                        where: tuple[int | None, str | None]) -> None:
    path = write(root, relative, contents)
    with pytest.raises(DataError, match=match) as err:
        load_safetybench(root)
    named = root / ANSWERS_FILE if "no answer" in match else path
    assert (err.value.path, (err.value.row, err.value.field)) == (named, where)
    assert "\n" not in str(err.value)


def test_bad_dev_file_fails_the_dev_setting_too(root: Path) -> None:
    write(root, DEV_FILE, {OFF: replace_at(dev_examples(OFF), 0, options="Yes.")})
    with pytest.raises(DataError, match="Offensiveness example 1: expected a list of strings"):
        load_safetybench_dev(root)
