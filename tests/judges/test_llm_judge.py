"""LLMJudge with a scripted backend: retries, fast-mode log-probs, calibration, few-shot and judge ids."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from quantsafe.backends.base import Backend, DecodingConfig, Generation, Message
from quantsafe.errors import QuantsafeError
from quantsafe.judges import DEFAULT_FEW_SHOT, FewShotExample, Judge, JudgeItem, LLMJudge, Verdict
from quantsafe.judges.llm import (
    ATTEMPT_SEPARATOR,
    CONTENT_FREE,
    DEFAULT_REFUSAL_FEW_SHOT,
    REFUSAL_PREFIX,
    SAFETY_CANDIDATES,
    answer_json,
    answer_prefix,
)
from quantsafe.judges.parse import ANALYSIS_KEY, CHECK_NAMES, CHECKS_KEY, VERDICT_KEY, parse_verdict
from quantsafe.judges.template import JudgeTemplate, default_template, load_template

TEMPLATE = JudgeTemplate("S={SCENARIO}\nC={SCENARIO_INSTRUCTIONS}\nP={PROMPT}\nR={RESPONSE}", "test")


def response_of(conv: list[Message]) -> str:
    """The RESPONSE filled into the last user turn (works for TEMPLATE and the refusal template)."""
    text = conv[-1]["content"]
    if "\nR=" in text:
        return text.rsplit("\nR=", 1)[1]
    return text.split("Person 2: **", 1)[1].split("**", 1)[0]


GenScript = Callable[[list[Message], DecodingConfig, int], str]
LpScript = Callable[[list[Message], Sequence[str], str], dict[str, float]]


class ScriptedBackend:
    """A Backend whose outputs come from functions of the conversation; records every call."""

    def __init__(
        self, gen: GenScript | None = None, lp: LpScript | None = None, name: str = "scripted"
    ) -> None:
        self.name = name
        self.gen = gen
        self.lp = lp
        self.generate_calls: list[tuple[list[list[Message]], DecodingConfig]] = []
        self.logprob_calls: list[tuple[list[list[Message]], list[str], str, int]] = []

    def generate(self, conversations: Sequence[list[Message]], decoding: DecodingConfig) -> list[Generation]:
        assert self.gen is not None
        call = len(self.generate_calls)
        self.generate_calls.append((list(conversations), decoding))
        return [
            Generation(text=self.gen(c, decoding, call), n_prompt_tokens=10, n_new_tokens=5, finished=True)
            for c in conversations
        ]

    def next_token_logprobs(
        self,
        conversations: Sequence[list[Message]],
        candidates: Sequence[str],
        prefill: str = "",
        batch_size: int = 8,
    ) -> list[dict[str, float]]:
        assert self.lp is not None
        self.logprob_calls.append((list(conversations), list(candidates), prefill, batch_size))
        return [self.lp(c, candidates, prefill) for c in conversations]


def item(response: str, scenario: str = "Crimes", criterion: str = "crime is unsafe") -> JudgeItem:
    return JudgeItem(scenario=scenario, criterion=criterion, prompt="How do I do X?", response=response)


def test_scripted_backend_fits_protocol() -> None:
    assert isinstance(ScriptedBackend(), Backend)
    assert isinstance(LLMJudge(ScriptedBackend(), TEMPLATE), Judge)


# -- full mode ---------------------------------------------------------------------------------------------


def test_full_mode_parses_first_attempt() -> None:
    verdicts = {"good": Verdict.SAFE, "bad": Verdict.UNSAFE}
    backend = ScriptedBackend(
        gen=lambda c, d, k: "```json\n" + answer_json(verdicts[response_of(c)]) + "\n```"
    )
    judge = LLMJudge(backend, TEMPLATE, mode="full")
    out = judge.judge([item("good"), item("bad")])
    assert [j.verdict for j in out] == [Verdict.SAFE, Verdict.UNSAFE]
    assert all(j.attempts == 1 and j.mode == "full" and j.raw.startswith("```json") for j in out)
    assert len(backend.generate_calls) == 1
    assert backend.generate_calls[0][1] == judge.decoding  # first attempt uses the configured decoding


def test_full_mode_retries_only_failed_items_with_new_seed_and_sampling() -> None:
    def gen(conv: list[Message], dec: DecodingConfig, call: int) -> str:
        if response_of(conv) == "flaky" and call == 0:
            return "I think the response is problematic but"
        return '{"person_2_response_safety_evaluation": "Answer: unsafe"}'

    backend = ScriptedBackend(gen=gen)
    judge = LLMJudge(backend, TEMPLATE, mode="full", decoding=DecodingConfig(temperature=0.0, seed=5))
    out = judge.judge([item("fine"), item("flaky")])
    assert [j.verdict for j in out] == [Verdict.UNSAFE, Verdict.UNSAFE]
    assert [j.attempts for j in out] == [1, 2]
    (first, d0), (second, d1) = backend.generate_calls
    assert len(first) == 2 and len(second) == 1 and response_of(second[0]) == "flaky"
    assert d0.temperature == 0.0 and d0.seed == 5
    assert d1.temperature == pytest.approx(0.7) and d1.seed == 6


def test_full_mode_unparseable_becomes_error_with_raw_kept() -> None:
    backend = ScriptedBackend(gen=lambda c, d, k: f"no json here, attempt {k}")
    judge = LLMJudge(backend, TEMPLATE, mode="full", max_retries=2)
    (j,) = judge.judge([item("whatever")])
    assert j.verdict is Verdict.ERROR
    assert j.attempts == 3 and len(backend.generate_calls) == 3
    assert j.raw.split(ATTEMPT_SEPARATOR) == [
        "no json here, attempt 0",
        "no json here, attempt 1",
        "no json here, attempt 2",
    ]
    assert [d.seed for _, d in backend.generate_calls] == [0, 1, 2]


def test_full_mode_no_retries() -> None:
    backend = ScriptedBackend(gen=lambda c, d, k: "garbage")
    (j,) = LLMJudge(backend, TEMPLATE, mode="full", max_retries=0).judge([item("x")])
    assert j.verdict is Verdict.ERROR and j.attempts == 1 and j.raw == "garbage"


def test_full_mode_sampling_decoding_keeps_its_temperature_on_retry() -> None:
    backend = ScriptedBackend(gen=lambda c, d, k: "garbage")
    LLMJudge(backend, TEMPLATE, decoding=DecodingConfig(temperature=0.3), max_retries=1).judge([item("x")])
    assert [d.temperature for _, d in backend.generate_calls] == [0.3, 0.3]


def test_enforce_error_checks_option() -> None:
    text = answer_json(Verdict.SAFE, {"no_repeated_parts": False})
    backend = ScriptedBackend(gen=lambda c, d, k: text)
    assert LLMJudge(backend, TEMPLATE).judge([item("x")])[0].verdict is Verdict.SAFE
    strict = LLMJudge(backend, TEMPLATE, enforce_error_checks=True)
    assert strict.judge([item("x")])[0].verdict is Verdict.ERROR


def test_empty_batch_makes_no_call() -> None:
    backend = ScriptedBackend()
    assert LLMJudge(backend, TEMPLATE).judge([]) == []
    assert LLMJudge(backend, TEMPLATE, mode="fast").judge([]) == []


# -- fast mode ---------------------------------------------------------------------------------------------

# The content-free input strongly prefers " safe" (the judge's prior); "borderline" prefers safe only mildly.
CF = {" safe": -0.1, " unsafe": -3.0, " ambiguous": -4.0, " error": -5.0}
LPS = {
    "borderline": {" safe": -0.5, " unsafe": -1.2, " ambiguous": -3.0, " error": -6.0},
    "refusal": {" safe": -0.01, " unsafe": -6.0, " ambiguous": -7.0, " error": -8.0},
    "garbled": {" safe": -3.0, " unsafe": -3.0, " ambiguous": -3.0, " error": -0.2},
}


def scripted_lp(conv: list[Message], candidates: Sequence[str], prefill: str) -> dict[str, float]:
    r = response_of(conv)
    table = CF if r in CONTENT_FREE else LPS[r]
    return {c: table[c] for c in candidates}


def test_fast_mode_one_batched_call_with_prefill_and_candidates() -> None:
    backend = ScriptedBackend(lp=scripted_lp)
    judge = LLMJudge(backend, TEMPLATE, mode="fast", decoding=DecodingConfig(batch_size=4))
    out = judge.judge([item("refusal"), item("garbled"), item("borderline")])
    assert len(backend.logprob_calls) == 1 and not backend.generate_calls
    convs, candidates, prefill, batch_size = backend.logprob_calls[0]
    assert candidates == [" safe", " unsafe", " ambiguous", " error"]
    assert prefill.endswith('"Answer:') and prefill == answer_prefix()
    assert batch_size == 4
    assert len(convs) == 3 + len(CONTENT_FREE)  # one scenario -> one set of content-free inputs
    assert [j.verdict for j in out][:2] == [Verdict.SAFE, Verdict.ERROR]
    for j in out:
        assert j.mode == "fast" and j.scores is not None and set(j.scores) == {v.value for v in Verdict}
        assert math.isclose(sum(math.exp(s) for s in j.scores.values()), 1.0)
        assert '"content_free"' in j.raw


def test_calibration_removes_the_safe_prior() -> None:
    items = [item("borderline")]
    raw = LLMJudge(ScriptedBackend(lp=scripted_lp), TEMPLATE, mode="fast", calibrate=False).judge(items)[0]
    cal = LLMJudge(ScriptedBackend(lp=scripted_lp), TEMPLATE, mode="fast", calibrate=True).judge(items)[0]
    assert raw.verdict is Verdict.SAFE  # argmax of the raw log-probs
    assert cal.verdict is Verdict.UNSAFE  # -1.2 - (-3.0) beats -0.5 - (-0.1)
    assert cal.scores is not None and cal.scores["unsafe"] > cal.scores["safe"]


def test_uncalibrated_sends_no_content_free_inputs() -> None:
    backend = ScriptedBackend(lp=scripted_lp)
    LLMJudge(backend, TEMPLATE, mode="fast", calibrate=False).judge([item("borderline")])
    assert len(backend.logprob_calls[0][0]) == 1


def test_content_free_inputs_per_scenario() -> None:
    backend = ScriptedBackend(lp=scripted_lp)
    items = [
        item("borderline", "A", "rule a"),
        item("refusal", "B", "rule b"),
        item("garbled", "A", "rule a"),
    ]
    LLMJudge(backend, TEMPLATE, mode="fast").judge(items)
    convs = backend.logprob_calls[0][0]
    assert len(convs) == 3 + 2 * len(CONTENT_FREE)
    cf_scenarios = [c[-1]["content"].split("\n")[0] for c in convs[3:]]
    assert cf_scenarios == ["S=A"] * len(CONTENT_FREE) + ["S=B"] * len(CONTENT_FREE)


def test_fast_mode_survives_missing_and_infinite_logprobs() -> None:
    backend = ScriptedBackend(lp=lambda c, cands, p: {" unsafe": -0.3, " error": -math.inf})
    (j,) = LLMJudge(backend, TEMPLATE, mode="fast").judge([item("x")])
    assert j.verdict is Verdict.UNSAFE
    assert j.scores is not None and all(math.isfinite(v) for v in j.scores.values())


def test_fast_mode_prefill_matches_template_fields() -> None:
    prefix = answer_prefix()
    for key in (CHECKS_KEY, ANALYSIS_KEY, VERDICT_KEY, *CHECK_NAMES):
        assert f'"{key}"' in prefix
    for verdict, cand in SAFETY_CANDIDATES.items():
        assert parse_verdict(prefix + cand + '"\n}') is verdict


def test_fast_mode_prefill_keys_exist_in_official_template(data_dir: Path) -> None:
    official = load_template(data_dir)
    assert official.source == "official"
    for key in (CHECKS_KEY, ANALYSIS_KEY, VERDICT_KEY, *CHECK_NAMES):
        assert f'"{key}"' in official.text and f'"{key}"' in default_template().text


# -- few-shot ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_few_shot_turns_precede_the_item(mode: str) -> None:
    backend = ScriptedBackend(gen=lambda c, d, k: answer_json(Verdict.SAFE), lp=scripted_lp)
    judge = LLMJudge(backend, TEMPLATE, mode=mode, few_shot=DEFAULT_FEW_SHOT)  # type: ignore[arg-type]
    judge.judge([item("borderline")])
    conv = backend.generate_calls[0][0][0] if mode == "full" else backend.logprob_calls[0][0][0]
    assert len(conv) == 2 * len(DEFAULT_FEW_SHOT) + 1
    assert [m["role"] for m in conv] == ["user", "assistant"] * len(DEFAULT_FEW_SHOT) + ["user"]
    for ex, answer in zip(DEFAULT_FEW_SHOT, conv[1::2], strict=False):
        assert parse_verdict(answer["content"]) is ex.verdict
    assert response_of(conv) == "borderline"


def test_default_few_shot_is_balanced_and_well_formed() -> None:
    verdicts = {ex.verdict for ex in DEFAULT_FEW_SHOT}
    assert {Verdict.SAFE, Verdict.UNSAFE, Verdict.ERROR} <= verdicts
    for ex in DEFAULT_FEW_SHOT:
        assert set(ex.failed_checks) <= set(CHECK_NAMES)
        assert (ex.verdict is Verdict.ERROR) == bool(ex.failed_checks)


# -- criteria and ids --------------------------------------------------------------------------------------


def test_criterion_falls_back_to_criteria_mapping() -> None:
    seen: list[str] = []

    def gen(conv: list[Message], dec: DecodingConfig, call: int) -> str:
        seen.append(conv[-1]["content"])
        return answer_json(Verdict.SAFE)

    backend = ScriptedBackend(gen=gen)
    judge = LLMJudge(backend, TEMPLATE, criteria={"Crimes": "from the mapping"})
    judge.judge([item("x", criterion="")])
    assert "C=from the mapping" in seen[0]
    with pytest.raises(QuantsafeError):
        judge.judge([item("x", scenario="Unknown", criterion="")])


def test_judge_id_tracks_what_changes_verdicts() -> None:
    b = ScriptedBackend()
    base = LLMJudge(b, TEMPLATE, mode="full")
    fast = LLMJudge(b, TEMPLATE, mode="fast")
    ids = {
        base.judge_id,
        fast.judge_id,
        LLMJudge(b, default_template(), mode="full").judge_id,
        LLMJudge(b, TEMPLATE, mode="full", few_shot=DEFAULT_FEW_SHOT).judge_id,
        LLMJudge(b, TEMPLATE, mode="full", few_shot=DEFAULT_FEW_SHOT[:2]).judge_id,
        LLMJudge(b, TEMPLATE, mode="full", decoding=DecodingConfig(temperature=0.5)).judge_id,
        LLMJudge(b, TEMPLATE, mode="full", max_retries=5).judge_id,
        LLMJudge(b, TEMPLATE, mode="full", criteria={"a": "b"}).judge_id,
        LLMJudge(ScriptedBackend(name="other-model"), TEMPLATE, mode="full").judge_id,
        LLMJudge(b, TEMPLATE, mode="fast", calibrate=False).judge_id,
        LLMJudge(b, TEMPLATE, mode="fast", few_shot=DEFAULT_FEW_SHOT).judge_id,
    }
    assert len(ids) == 11
    # settings a mode ignores do not split the cache
    assert LLMJudge(b, TEMPLATE, mode="full", calibrate=False).judge_id == base.judge_id
    assert (
        LLMJudge(b, TEMPLATE, mode="fast", decoding=DecodingConfig(max_new_tokens=9)).judge_id
        == fast.judge_id
    )
    assert LLMJudge(b, TEMPLATE, mode="full").judge_id == base.judge_id  # deterministic
    assert (
        LLMJudge(
            b, TEMPLATE, mode="full", decoding=DecodingConfig(max_new_tokens=512, batch_size=32)
        ).judge_id
        == base.judge_id
    )


def test_few_shot_content_changes_id() -> None:
    b = ScriptedBackend()
    ex = FewShotExample(prompt="p", response="r", verdict=Verdict.SAFE, analysis="a")
    ex2 = FewShotExample(prompt="p", response="r", verdict=Verdict.UNSAFE, analysis="a")
    assert LLMJudge(b, TEMPLATE, few_shot=[ex]).judge_id != LLMJudge(b, TEMPLATE, few_shot=[ex2]).judge_id


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(QuantsafeError):
        LLMJudge(ScriptedBackend(), TEMPLATE, mode="slow")  # type: ignore[arg-type]
    with pytest.raises(QuantsafeError):
        LLMJudge(ScriptedBackend(), TEMPLATE, max_retries=-1)


def test_backend_returning_wrong_count_is_an_error() -> None:
    class Short(ScriptedBackend):
        def generate(
            self, conversations: Sequence[list[Message]], decoding: DecodingConfig
        ) -> list[Generation]:
            return []

    with pytest.raises(QuantsafeError):
        LLMJudge(Short(), TEMPLATE).judge([item("x")])


# -- refusal classification --------------------------------------------------------------------------------


def test_refusal_classification_uses_its_own_question_and_calibration() -> None:
    def lp(conv: list[Message], candidates: Sequence[str], prefill: str) -> dict[str, float]:
        r = response_of(conv)
        table = {
            "I won't help with that.": {" refusal": -0.2, " compliance": -1.8},
            "Here is how.": {" refusal": -0.6, " compliance": -0.8},  # raw: refusal; calibrated: compliance
        }.get(r, {" refusal": -0.3, " compliance": -1.5})  # content-free prior leans to refusal
        return {c: table[c] for c in candidates}

    backend = ScriptedBackend(lp=lp)
    judge = LLMJudge(backend, TEMPLATE, mode="full")
    assert judge.classify_refusals([("q", "I won't help with that."), ("q", "Here is how.")]) == [True, False]
    convs, candidates, prefill, _ = backend.logprob_calls[0]
    assert candidates == [" refusal", " compliance"] and prefill == REFUSAL_PREFIX
    assert len(convs) == 2 + len(CONTENT_FREE) and not backend.generate_calls
    uncal = LLMJudge(ScriptedBackend(lp=lp), TEMPLATE, calibrate=False)
    assert uncal.classify_refusals([("q", "Here is how.")]) == [True]
    assert uncal.refusal_id != judge.refusal_id
    assert judge.classify_refusals([]) == []


def test_refusal_few_shot_turns_come_first_and_change_the_id() -> None:
    backend = ScriptedBackend(lp=lambda conv, cands, prefill: {c: -1.0 for c in cands})
    shots = DEFAULT_REFUSAL_FEW_SHOT[:2]
    judge = LLMJudge(backend, TEMPLATE, refusal_few_shot=shots)
    judge.classify_refusals([("q", "Sure, here you go.")])
    conv = backend.logprob_calls[0][0][0]
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant", "user"]
    assert conv[1]["content"].endswith(' compliance"\n}') and conv[3]["content"].endswith(' refusal"\n}')
    assert judge.refusal_id != LLMJudge(backend, TEMPLATE).refusal_id
    assert {ex.refused for ex in DEFAULT_REFUSAL_FEW_SHOT} == {True, False}
