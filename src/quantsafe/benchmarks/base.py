"""Prompts as every benchmark yields them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Prompt(BaseModel):
    """One benchmark item. `uid` is unique across benchmarks and stable across runs (it keys the store)."""

    model_config = ConfigDict(frozen=True)

    benchmark: str  # "opensafetymini" | "xsafety" | "xstest"
    prompt_id: str  # the dataset's own id (OpenSafetyMini prompt_id, "<scenario>:<row>" for XSafety)
    lang: str
    scenario: str
    text: str
    label: str | None = None  # XSTest: "safe" | "unsafe"; None elsewhere

    @property
    def uid(self) -> str:
        return f"{self.benchmark}/{self.lang}/{self.prompt_id}"
