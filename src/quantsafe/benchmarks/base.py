"""Items as every benchmark yields them, and the three kinds of benchmark the runner knows how to score."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

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
