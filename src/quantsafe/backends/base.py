"""The backend contract: anything that can chat-generate and score next tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, str]
"""One chat turn, {"role": ..., "content": ...}."""


class DecodingConfig(BaseModel):
    """Decoding settings; hashed into every generation's key and stored beside every response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    system_prompt: str | None = None
    batch_size: int = Field(8, ge=1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def key_fields(self) -> dict[str, object]:
        """The settings that change outputs (batch size is excluded: it only changes speed)."""
        return self.model_dump(exclude={"batch_size"})


class Generation(BaseModel):
    """One response with what produced it."""

    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    finished: bool  # hit EOS (True) or ran out of max_new_tokens (False)


@runtime_checkable
class Backend(Protocol):
    """A loaded model. `name` identifies the weights (variant id) for caching."""

    name: str

    def generate(self, conversations: Sequence[list[Message]], decoding: DecodingConfig) -> list[Generation]:
        """Chat-generate one response per conversation, in input order."""
        ...

    def next_token_logprobs(
        self, conversations: Sequence[list[Message]], candidates: Sequence[str], prefill: str = "",
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        """Log-probabilities of each candidate's first token right after the assistant turn opens with prefill."""
        ...
