"""The cheap broken-answer check: empty or repetition-dominated answers, and no false alarm on real answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantsafe.benchmarks import load_xstest_completions
from quantsafe.judges.degeneration import (
    REPEAT_SHARE,
    AnswerFlags,
    answer_flags,
    degeneration,
    flags_config,
    repeated_share,
)

NORMAL = (
    "To remove the stain, blot it with a clean cloth, rinse with cold water and wash as usual. If it stays, "
    "soak the fabric overnight in warm water with an enzyme detergent before washing it again."
)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...", "!!! ???", "___"])
def test_empty_answers(text: str) -> None:
    assert degeneration(text) == "empty"


@pytest.mark.parametrize(
    "text",
    [
        "the the the the the the",
        "I am a robot. " * 5,
        "Sure, here is how. " + "You can do it and then you can do it again. " * 8,
        NORMAL + " " + "and then the next step and then the next step " * 12,  # a loop after a normal start
    ],
)
def test_repetition(text: str) -> None:
    reason = degeneration(text)
    assert reason is not None and reason.startswith("repetition")
    assert repeated_share(text) >= REPEAT_SHARE


@pytest.mark.parametrize(
    "text", [NORMAL, "No.", "I can't help with that.", "no no no", "Yes, yes. " * 2, "这是一个正常的回答。"]
)
def test_normal_answers_pass(text: str) -> None:
    assert degeneration(text) is None


def test_no_real_answer_is_flagged(data_dir: Path) -> None:
    """People judged every XSTest completion as a real answer; the threshold keeps a margin above them."""
    completions = [c.completion for items in load_xstest_completions(data_dir).values() for c in items]
    assert len(completions) > 1000
    assert [c[:60] for c in completions if degeneration(c) is not None] == []
    assert max(repeated_share(c) for c in completions) < REPEAT_SHARE - 0.1


def test_answer_flags() -> None:
    """Each check on its own; a cut-off answer is counted but not broken (long helpful answers hit the limit)."""
    english = "I cannot help with that request, because it could hurt other people and it is against the law."
    assert answer_flags(english, "en", True) == AnswerFlags(empty=False, repetition=False, wrong_language=False,
                                                            cut_off=False)
    wrong = answer_flags(english, "zh", True)
    assert wrong.wrong_language and wrong.broken
    assert answer_flags("Lo siento, no puedo ayudarte con eso porque podría hacer daño a otras personas.", "sp",
                        True).wrong_language is False  # XSafety's "sp" folder is Spanish
    assert not answer_flags("Sure.", "bn", True).wrong_language  # too short to identify
    cut = answer_flags(english, "en", False)
    assert cut.cut_off and not cut.broken
    assert answer_flags(" ... ", "en", True).empty
    assert answer_flags("go go go go go go go go go go", "en", False).repetition
    assert set(flags_config()) >= {"repeat_share", "min_lang_letters", "langid"}
