"""Prompts as every benchmark yields them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantsafe.hashing import stable_hash


class Prompt(BaseModel):
    """One benchmark item. `uid` keys the store; `human_id` is what people (and sampling) refer to it by."""

    model_config = ConfigDict(frozen=True)

    benchmark: str  # "opensafetymini" | "xsafety" | "xstest"
    prompt_id: str  # the dataset's own id (OpenSafetyMini prompt_id, "<scenario>:<row>" for XSafety)
    lang: str
    scenario: str
    text: str
    label: str | None = None  # XSTest: "safe" | "unsafe"; None elsewhere

    @property
    def human_id(self) -> str:
        """`benchmark/lang/prompt_id`: stable while a file is edited, so it names a prompt but never keys results."""
        return f"{self.benchmark}/{self.lang}/{self.prompt_id}"

    @property
    def uid(self) -> str:
        """Content hash of everything a generation or verdict depends on, so an edited prompt is a new prompt;
        the human id is in it too because releases repeat a text within a scenario (English XSafety does)."""
        return stable_hash({"id": self.human_id, "scenario": self.scenario, "text": self.text})
