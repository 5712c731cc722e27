"""The backend contract: anything that can chat-generate and score next tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

Message = dict[str, str]
"""One chat turn, {"role": ..., "content": ...}."""

DEFAULT_MAX_BATCH_TOKENS = 16384
"""Padded tokens per forward batch: bounds memory when a batch holds long items."""


class DecodingConfig(BaseModel):
    """Decoding settings; hashed into every generation's key and stored beside every response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    system_prompt: str | None = None
    batch_size: int = Field(8, ge=1)
    max_batch_tokens: int = Field(
        DEFAULT_MAX_BATCH_TOKENS, ge=1,
        description="cap on rows x (longest prompt + max_new_tokens) per batch; a longer item runs alone",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="cut the last user message so the prompt fits (the model's context always applies)",
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def key_fields(self) -> dict[str, object]:
        """Every setting, batching included: the seed is reset per batch and padding moves bf16 greedy outputs,
        so batch composition changes what comes out."""
        return self.model_dump()


class Generation(BaseModel):
    """One response with what produced it."""

    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    finished: bool  # hit EOS (True) or ran out of max_new_tokens (False)
    truncated: bool = False  # the last user message was cut to fit the context / max_prompt_tokens


@runtime_checkable
class Backend(Protocol):
    """A loaded model. `name` identifies the weights (variant id) for caching."""

    name: str

    def generate(
        self, conversations: Sequence[list[Message]], decoding: DecodingConfig,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Chat-generate one response per conversation, in input order; `on_batch(k)` as k more are done."""
        ...

    def next_token_logprobs(
        self, conversations: Sequence[list[Message]], candidates: Sequence[str], prefill: str = "",
        batch_size: int = 8, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        shared_chars: Sequence[int] | None = None,
    ) -> list[dict[str, float]]:
        """Log-probability of each candidate's whole token sequence right after the assistant turn opens with
        prefill; `shared_chars[i]`: how many leading characters of conversation i's last message recur across
        items (few-shot examples), which a backend may encode once."""
        ...
