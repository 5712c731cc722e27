"""HotPotQA, distractor setting: each question with one gold and two distractor paragraphs, the paper's prompt.

The official dev file gives every question 10 paragraphs (the 2 named in supporting_facts, 8 distractors); the
paper shows "one ground-truth and two distracting" contexts without saying which (its gap 6), so the choice here
is seeded, recorded by the prompt text (and so by the uid), and independent of file order.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantsafe.benchmarks._files import read_text
from quantsafe.benchmarks.base import BenchmarkDef, Kind, Outcome, Prompt
from quantsafe.benchmarks.download import write_atomic
from quantsafe.benchmarks.sampling import _rank
from quantsafe.errors import DataError, QuantsafeError
from quantsafe.stats.answers import answer_metrics

log = logging.getLogger("quantsafe.benchmarks")

FULL_DEV_FILE = Path("hotpotqa/hotpot_dev_distractor_v1.json")  # the official name; fetch_hotpotqa writes it
SAMPLE_FILE = Path("hotpotqa/hotpot_dev_distractor_first53.json")  # its first 53 records, for offline runs
TEMPLATE_FILE = Path("opensafetymini/prompts/hotpotqa_generation_prompt_template.md")
PLACEHOLDERS = ("{INFO}", "{QUESTION}")
QUESTION_TYPES = ("bridge", "comparison")
DISTRACTORS = 2
HUB_DATASET = "hotpotqa/hotpot_qa"  # the Hub's current id of the `hotpot_qa` dataset
HUB_CONFIG = "distractor"
HUB_SPLIT = "validation"
ALIGNSCORE_CKPT_ENV = "QUANTSAFE_ALIGNSCORE_CKPT"

Paragraph = tuple[str, str]  # (title, text)


@dataclass(frozen=True)
class Question:
    """One record of the official file, validated; `row` is its 1-based position, for error messages."""

    id: str
    question: str
    answer: str
    type: str
    gold_titles: tuple[str, ...]  # distinct supporting_facts titles, in order of first mention
    paragraphs: tuple[Paragraph, ...]  # the context, in file order
    row: int

    @property
    def distractors(self) -> list[Paragraph]:
        """Context paragraphs not named in supporting_facts."""
        return [p for p in self.paragraphs if p[0] not in self.gold_titles]


def _text(path: Path, row: int, record: Mapping[str, Any], field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        what = "missing field" if value is None else "must be a non-empty string"
        raise DataError(path, what, row=row, field=field)
    return value.strip()


def _pairs(path: Path, row: int, record: Mapping[str, Any], field: str, second: type) -> list[tuple[str, Any]]:
    """A non-empty list of [title, value] pairs: supporting_facts [title, sentence index], context [title,
    sentences]."""
    value = record.get(field)
    if value is None:
        raise DataError(path, "missing field", row=row, field=field)
    if not isinstance(value, list) or not value or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], second)
            and not isinstance(p[1], bool) for p in value):
        shape = "[title, sentence index]" if second is int else "[title, [sentences]]"
        raise DataError(path, f"must be a non-empty list of {shape} pairs", row=row, field=field)
    return [(p[0], p[1]) for p in value]


def _paragraph(path: Path, row: int, title: str, sentences: list[Any]) -> Paragraph:
    if not all(isinstance(s, str) for s in sentences):
        raise DataError(path, f"paragraph '{title}' has a sentence that is not a string", row=row, field="context")
    text = " ".join(s.strip() for s in sentences if s.strip())  # sentences after the first carry a leading space
    if not text:
        raise DataError(path, f"paragraph '{title}' has no text", row=row, field="context")
    return title, text


def read_questions(path: Path) -> list[Question]:
    """The records of a file in the official distractor schema (a JSON list of objects), validated."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(path, f"invalid JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(data, list) or not data:
        raise DataError(path, "expected a non-empty JSON list of questions")
    questions: list[Question] = []
    seen: set[str] = set()
    for row, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(path, "expected a JSON object", row=row)
        qid = _text(path, row, record, "_id")
        if qid in seen:
            raise DataError(path, f"duplicate _id '{qid}'", row=row, field="_id")
        seen.add(qid)
        kind = _text(path, row, record, "type")
        if kind not in QUESTION_TYPES:
            raise DataError(path, f"unknown type '{kind}' (known: {', '.join(QUESTION_TYPES)})", row=row, field="type")
        paragraphs = tuple(_paragraph(path, row, title, sentences)
                           for title, sentences in _pairs(path, row, record, "context", list))
        gold = tuple(dict.fromkeys(title for title, _ in _pairs(path, row, record, "supporting_facts", int)))
        titles = {title for title, _ in paragraphs}
        for title in gold:
            if title not in titles:
                raise DataError(path, f"question {qid}: supporting title '{title}' is not in its context",
                                row=row, field="supporting_facts")
        questions.append(Question(id=qid, question=_text(path, row, record, "question"),
                                  answer=_text(path, row, record, "answer"), type=kind, gold_titles=gold,
                                  paragraphs=paragraphs, row=row))
    return questions


def read_template(path: Path) -> str:
    """The paper's brief-answer template; both placeholders must be in it."""
    template = read_text(path)
    for placeholder in PLACEHOLDERS:
        if placeholder not in template:
            raise DataError(path, f"template lacks the {placeholder} placeholder")
    return template


def format_info(paragraphs: Sequence[Paragraph]) -> str:
    """Paragraphs as markdown sub-sections of the template's "# Information": "## title", then the text."""
    return "\n\n".join(f"## {title}\n{text}" for title, text in paragraphs)


def fill_template(template: str, info: str, question: str) -> str:
    """Both placeholders in one pass, so text inside a paragraph can never be taken for a placeholder."""
    values = {"{INFO}": info, "{QUESTION}": question}
    return re.sub(r"\{INFO\}|\{QUESTION\}", lambda m: values[m.group(0)], template)


def _borrowed(question: Question, others: Sequence[Question], need: int, seed: int) -> list[Paragraph]:
    """Distractors from other questions, one per question in seeded order, for a record whose own context is
    short (the official dev file has such records: the sample's row 28 has only its 2 gold paragraphs)."""
    own = {title for title, _ in question.paragraphs}
    found: list[Paragraph] = []
    for other in sorted(others, key=lambda o: _rank(seed, f"{question.id}\x00borrow\x00{o.id}")):
        usable = [p for p in other.distractors if p[0] not in own and p[0] not in {t for t, _ in found}]
        if usable:
            found.append(min(usable, key=lambda p: _rank(seed, f"{question.id}\x00borrow\x00{other.id}\x00{p[0]}")))
            if len(found) == need:
                break
    return found


def select_paragraphs(question: Question, seed: int, others: Sequence[Question] = (),
                      strict: bool = False, source: Path = SAMPLE_FILE) -> tuple[list[Paragraph], str]:
    """(the three paragraphs in prompt order, the gold title) for one question.

    The gold paragraph is drawn uniformly from the supporting titles: no rule in the paper, and always taking the
    answer-bearing (or the bridge) paragraph would bias In-accuracy one way. The two distractors are drawn from the
    question's own non-supporting paragraphs; a record with fewer borrows the rest from `others` (an error when
    strict). Each draw ranks by a seeded hash of (question id, title), so it does not depend on file order.
    """
    def rank(role: str, title: str) -> str:
        return _rank(seed, f"{question.id}\x00{role}\x00{title}")

    gold_title = min(question.gold_titles, key=lambda t: rank("gold", t))
    gold = next(p for p in question.paragraphs if p[0] == gold_title)
    distractors = sorted(question.distractors, key=lambda p: rank("distractor", p[0]))[:DISTRACTORS]
    if len(distractors) < DISTRACTORS:
        where = f"question {question.id} has {len(distractors)} distractor paragraph(s), {DISTRACTORS} needed"
        if strict:
            raise DataError(source, where, row=question.row, field="context")
        distractors += _borrowed(question, [o for o in others if o.id != question.id],
                                 DISTRACTORS - len(distractors), seed)
        if len(distractors) < DISTRACTORS:
            raise DataError(source, f"{where}, and the file's other questions cannot supply the rest",
                            row=question.row, field="context")
    chosen = sorted([gold, *distractors], key=lambda p: rank("order", p[0]))
    return chosen, gold_title


def build_prompts(questions: Sequence[Question], template: str, seed: int = 0, strict: bool = False,
                  source: Path = SAMPLE_FILE) -> list[Prompt]:
    """One prompt per question, in file order: scenario is the question type, reference the gold answer."""
    prompts = []
    short = []
    for question in questions:
        if len(question.distractors) < DISTRACTORS:
            short.append(question.id)
        paragraphs, _ = select_paragraphs(question, seed, questions, strict=strict, source=source)
        text = fill_template(template, format_info(paragraphs), question.question)
        prompts.append(Prompt(benchmark="hotpotqa", prompt_id=question.id, lang="en", scenario=question.type,
                              text=text, reference=question.answer))
    if short:
        log.warning("%s: %d question(s) with fewer than %d distractor paragraphs of their own got the rest from "
                    "other questions: %s", source, len(short), DISTRACTORS, ", ".join(short))
    return prompts


def hotpotqa_file(data_dir: Path) -> Path:
    """The full dev file when it is there (fetched by a user), else the 53-question offline sample."""
    for relative in (FULL_DEV_FILE, SAMPLE_FILE):
        if (Path(data_dir) / relative).is_file():
            return Path(data_dir) / relative
    raise DataError(Path(data_dir) / FULL_DEV_FILE.parent,
                    f"neither {FULL_DEV_FILE.name} nor {SAMPLE_FILE.name} found (fetch_hotpotqa writes the first)")


def load_hotpotqa(data_dir: Path, seed: int = 0, strict: bool = False) -> list[Prompt]:
    """HotPotQA prompts from the data dir; the seed picks each question's paragraphs and their order."""
    path = hotpotqa_file(data_dir)
    template = read_template(Path(data_dir) / TEMPLATE_FILE)
    return build_prompts(read_questions(path), template, seed=seed, strict=strict, source=path)


def official_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A `hotpot_qa` Hub row (columnar supporting_facts {title, sent_id} and context {title, sentences}) in the
    official file's schema and key order."""
    facts, context = row["supporting_facts"], row["context"]
    return {"_id": row["id"], "answer": row["answer"], "question": row["question"],
            "supporting_facts": [[t, int(i)] for t, i in zip(facts["title"], facts["sent_id"], strict=True)],
            "context": [[t, list(s)] for t, s in zip(context["title"], context["sentences"], strict=True)],
            "type": row["type"], "level": row["level"]}


def fetch_hotpotqa(data_dir: Path, overwrite: bool = False) -> Path:
    """Write the whole dev set (7,405 questions, from the Hub with `datasets`) as the official dev file, which the
    loader then prefers to the sample; needs internet and the `hub` extra."""
    target = Path(data_dir) / FULL_DEV_FILE
    if target.exists() and not overwrite:
        return target
    try:
        from datasets import load_dataset
    except ImportError:
        raise QuantsafeError("fetching HotPotQA needs the `datasets` package (pip install 'quantsafe[hub]')") from None
    try:
        rows = load_dataset(HUB_DATASET, HUB_CONFIG, split=HUB_SPLIT)
    except OSError as err:  # no network, or the dataset moved
        raise QuantsafeError(f"cannot fetch {HUB_DATASET} ({HUB_CONFIG}, {HUB_SPLIT}): {err}") from None
    records = [official_record(row) for row in rows]
    try:
        write_atomic(target, json.dumps(records, ensure_ascii=False).encode("utf-8"))
    except OSError as err:
        raise QuantsafeError(f"cannot write {target} ({err.strerror or err})") from None
    return target


@dataclass(frozen=True)
class AlignScoreStatus:
    available: bool
    message: str  # one line: what is there, or exactly what is missing


def alignscore_status() -> AlignScoreStatus:
    """Whether AlignScore could run: the `alignscore` package and a checkpoint file named by
    QUANTSAFE_ALIGNSCORE_CKPT. quantsafe computes no AlignScore itself; this says why the column is empty."""
    missing = []
    if importlib.util.find_spec("alignscore") is None:
        missing.append("the `alignscore` package is not installed (pip install git+https://github.com/yuh-zha/AlignScore)")
    ckpt = os.environ.get(ALIGNSCORE_CKPT_ENV, "").strip()
    if not ckpt:
        missing.append(f"{ALIGNSCORE_CKPT_ENV} is not set (path to AlignScore-base.ckpt or AlignScore-large.ckpt)")
    elif not Path(ckpt).expanduser().is_file():
        missing.append(f"{ALIGNSCORE_CKPT_ENV}={ckpt} is not a file")
    if missing:
        return AlignScoreStatus(False, "AlignScore unavailable: " + "; ".join(missing))
    return AlignScoreStatus(True, f"AlignScore available: package installed, checkpoint {Path(ckpt).expanduser()}")


def _answer_metrics(item: Prompt, outcome: Outcome) -> dict[str, float]:
    """In-accuracy (the paper's metric), exact match and token F1 of one answer against its gold answer."""
    if outcome.response is None or item.reference is None:
        return {}
    return answer_metrics(outcome.response, item.reference)


DEFINITIONS = (BenchmarkDef(name="hotpotqa", kind=Kind.REFERENCE, title="HotPotQA",
                            load=lambda data_dir, o: load_hotpotqa(data_dir, seed=o.seed, strict=o.strict),
                            metrics=_answer_metrics, headline="in_accuracy"),)
