"""Items as every benchmark yields them, and the three kinds of benchmark the runner knows how to score."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from quantsafe.hashing import stable_hash


class Kind(StrEnum):
    """How a benchmark's items become numbers; the runner and the report dispatch on it, never on a name."""

    JUDGED = "judged"  # open-ended answer read by a judge (OpenSafetyMini, XSafety, XSTest)
    CHOICE = "choice"  # multiple choice scored from next-token logits of the option letters (SafetyBench)
    REFERENCE = "reference"  # open-ended answer checked against a gold answer (HotPotQA)


class Prompt(BaseModel):
    """One benchmark item. `uid` keys the store; `human_id` is what people (and sampling) refer to it by."""

    model_config = ConfigDict(frozen=True)

    benchmark: str  # a registered benchmark name (benchmarks/registry.py)
    prompt_id: str  # the dataset's own id (OpenSafetyMini prompt_id, "<scenario>:<row>" for XSafety)
    lang: str
    scenario: str  # scenario or category: what per-scenario tables group by
    text: str  # the whole user turn, few-shot examples or context paragraphs included
    label: str | None = None  # XSTest: "safe" | "unsafe"; None elsewhere
    reference: str | None = None  # the gold answer: HotPotQA's answer text, SafetyBench's correct letter
    choices: tuple[str, ...] = ()  # multiple choice: the option letters this item has, in order ("A", "B", ...)
    prefill: str = ""  # the assistant turn opens with this (SafetyBench: "Answer: ")
    shared_chars: int = 0  # leading characters of `text` that other items repeat (few-shot examples): a backend
    # may encode them once; left out of the uid, since they do not change what is asked

    @property
    def human_id(self) -> str:
        """`benchmark/lang/prompt_id`: stable while a file is edited, so it names a prompt but never keys results."""
        return f"{self.benchmark}/{self.lang}/{self.prompt_id}"

    @property
    def uid(self) -> str:
        """Content hash of everything a generation, verdict or score depends on, so an edited prompt is a new
        prompt; the human id is in it too because releases repeat a text within a scenario (English XSafety does).
        Fields left at their defaults stay out, so the judged benchmarks keep the uids they always had."""
        key: dict[str, Any] = {"id": self.human_id, "scenario": self.scenario, "text": self.text}
        extra = {"reference": self.reference, "choices": list(self.choices), "prefill": self.prefill}
        key |= {k: v for k, v in extra.items() if v}
        return stable_hash(key)


@dataclass(frozen=True)
class BenchmarkOptions:
    """What a loader may be asked for; langs=None means the benchmark's default (English)."""

    langs: tuple[str, ...] | None = None
    strict: bool = False
    seed: int = 0  # loaders that choose (HotPotQA's distractors, SafetyBench's option permutations) choose from it
    permutations: int = 0  # multiple choice: extra copies of each item with its options shuffled (position bias)


class Outcome(BaseModel):
    """What a benchmark's metrics read of one variant's answer to one item (fields of other kinds stay None)."""

    response: str | None = None  # generated answer (judged and reference kinds)
    prediction: str | None = None  # chosen option letter (choice kind)
    refused: bool | None = None  # a refusal classifier's call (judged kind asking the refusal question)


@dataclass(frozen=True)
class BenchmarkDef:
    """A benchmark as data: adding one is one module defining `DEFINITIONS` (found by the registry) and one test.

    `metrics` turns one item's outcome into named numbers (1/0 for hit/miss), averaged per variant and scenario
    and paired against full precision by the report; judged benchmarks asking the safety question have none (the
    safety ratio is computed from verdicts, with the judge's validation and correction).
    """

    name: str
    kind: Kind
    title: str  # as tables print it
    load: Callable[[Path, BenchmarkOptions], list[Prompt]]
    question: Literal["safety", "refusal"] | None = None  # judged kind: what the judge is asked
    languages: tuple[str, ...] = ("en",)
    metrics: Callable[[Prompt, Outcome], dict[str, float]] | None = None
    headline: str | None = None  # the metric the paper reports (tables lead with it)
