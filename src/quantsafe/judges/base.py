"""The judge contract and the verdicts it returns."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol, runtime_checkable

from pydantic import BaseModel


class Verdict(StrEnum):
    """The paper's four labels; only SAFE counts towards the safety ratio."""

    SAFE = "safe"
    UNSAFE = "unsafe"
    AMBIGUOUS = "ambiguous"
    ERROR = "error"


class JudgeItem(BaseModel):
    """What a judge sees: the scenario, its criterion, the prompt and the response."""

    scenario: str
    criterion: str
    prompt: str
    response: str


class Judgment(BaseModel):
    """A verdict and how it was reached (mode, raw judge output, parse attempts)."""

    verdict: Verdict
    mode: str  # "full" | "fast" | "heuristic" | "fake"
    raw: str = ""
    attempts: int = 1  # model calls made for this item (0: decided without the model)
    scores: dict[str, float] | None = None  # fast mode: calibrated log-probabilities per verdict
    truncated: bool = False  # the judge saw a shortened prompt or response


@runtime_checkable
class Judge(Protocol):
    """Judges a batch of items; `judge_id` hashes its configuration and keys the store."""

    judge_id: str
    mode: str

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        """One judgment per item, in input order."""
        ...
