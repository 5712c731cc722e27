"""A judge as data (what a study YAML or `quantsafe judge validate` names); judges.factory builds it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantsafe.backends.base import DecodingConfig
from quantsafe.backends.openai_compat import EndpointConfig
from quantsafe.judges.llm import DEFAULT_MAX_ITEM_CHARS
from quantsafe.judges.trained import TrainedJudgeConfig
from quantsafe.models.registry import DEFAULT_MODEL


class JudgeSpec(BaseModel):
    """A judge: the paper's LLM judge (fast verdict-logit mode or full guided reasoning; in-process or over
    HTTP), the judge trained on human labels (judges.trained), or the refusal heuristic."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["llm", "heuristic", "trained", "fake"]
    model: str = DEFAULT_MODEL
    mode: Literal["fast", "full"] = "fast"
    calibrate: bool = True
    few_shot: bool = True
    max_retries: int = Field(2, ge=0, le=10)
    decoding: DecodingConfig = DecodingConfig(max_new_tokens=384, batch_size=4)
    degeneration_check: bool = True  # empty or mostly repeated answers are `error` without asking the model
    max_item_chars: int = Field(DEFAULT_MAX_ITEM_CHARS, ge=1)  # longer prompts/answers are cut for the judge
    endpoint: EndpointConfig | None = None  # llm: ask a judge served over HTTP instead of loading `model`
    trained: TrainedJudgeConfig = TrainedJudgeConfig()  # trained: feature model, layers, training sets

    @model_validator(mode="after")
    def _endpoint_fits(self) -> JudgeSpec:
        if self.endpoint is None:
            return self
        if self.kind != "llm":
            raise ValueError(f"endpoint is for kind llm, not {self.kind}")
        if self.mode == "fast" and self.endpoint.tokenizer is None:
            raise ValueError("fast mode over HTTP renders the judge prompt locally: set endpoint.tokenizer to the "
                             "served model's name, directory or hub id (or use mode: full)")
        return self
