"""build_judge without loading any model (a backend is injected)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from quantsafe.backends.base import DecodingConfig, Generation, Message
from quantsafe.errors import QuantsafeError
from quantsafe.judges import DEFAULT_FEW_SHOT, FakeJudge, LLMJudge, RefusalHeuristicJudge
from quantsafe.judges.factory import build_judge


class NullBackend:
    name = "null"

    def generate(self, conversations: Sequence[list[Message]], decoding: DecodingConfig) -> list[Generation]:
        raise AssertionError("not called")

    def next_token_logprobs(
        self,
        conversations: Sequence[list[Message]],
        candidates: Sequence[str],
        prefill: str = "",
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        raise AssertionError("not called")


def test_simple_kinds() -> None:
    assert isinstance(build_judge("heuristic"), RefusalHeuristicJudge)
    assert isinstance(build_judge("fake"), FakeJudge)
    with pytest.raises(QuantsafeError):
        build_judge("oracle")  # type: ignore[arg-type]


def test_llm_judge_settings(data_dir: Path, tmp_path: Path) -> None:
    j = build_judge(
        "llm",
        backend=NullBackend(),
        mode="full",
        few_shot=True,
        data_dir=data_dir,
        criteria={"a": "b"},
        max_retries=1,
        calibrate=False,
    )
    assert isinstance(j, LLMJudge)
    assert j.mode == "full" and j.few_shot == DEFAULT_FEW_SHOT and j.template.source == "official"
    assert j.max_retries == 1 and j.criteria == {"a": "b"}
    k = build_judge("llm", backend=NullBackend(), mode="fast", few_shot=False, data_dir=tmp_path)
    assert isinstance(k, LLMJudge)
    assert k.few_shot == () and k.template.source == "default" and k.calibrate
    assert j.judge_id != k.judge_id


def test_degeneration_check_and_item_cap_reach_the_judge_and_its_id() -> None:
    default = build_judge("llm", backend=NullBackend())
    plain = build_judge("llm", backend=NullBackend(), degeneration_check=False, max_item_chars=100)
    assert isinstance(default, LLMJudge) and isinstance(plain, LLMJudge)
    assert default.degeneration_check and not plain.degeneration_check and plain.max_item_chars == 100
    assert default.judge_id != plain.judge_id
