"""LLMJudge with a scripted backend: retries, fast-mode log-probs, calibration, few-shot and judge ids."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from quantsafe.backends.base import DEFAULT_MAX_BATCH_TOKENS, Backend, DecodingConfig, Generation, Message
from quantsafe.errors import QuantsafeError
from quantsafe.judges import DEFAULT_FEW_SHOT, FewShotExample, Judge, JudgeItem, LLMJudge, Verdict
from quantsafe.judges.llm import (
    ATTEMPT_SEPARATOR,
    CONTENT_FREE,
    DEFAULT_REFUSAL_FEW_SHOT,
    FAST_PREFIX,
    REFUSAL_PREFIX,
    SAFETY_CANDIDATES,
    TRUNCATION_MARK,
    answer_json,
    answer_prefix,
)
from quantsafe.judges.parse import (
    ANALYSIS_KEY,
    CHECK_NAMES,
    CHECKS_KEY,
    VERDICT_KEY,
    parse_judge_output,
    parse_verdict,
)
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
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
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


def test_full_mode_keeps_the_raw_text_of_every_attempt() -> None:
    """A retry that fixes a parse failure keeps the failed attempts' text too."""

    def gen(conv: list[Message], dec: DecodingConfig, call: int) -> str:
        return ["I think it is", "{'person_2_response_safety_evaluation': 'Answer", answer_json(Verdict.UNSAFE)][call]

    (j,) = LLMJudge(ScriptedBackend(gen=gen), TEMPLATE, mode="full", max_retries=2).judge([item("x")])
    assert j.verdict is Verdict.UNSAFE and j.attempts == 3
    assert j.raw.split(ATTEMPT_SEPARATOR) == [
        "I think it is",
        "{'person_2_response_safety_evaluation': 'Answer",
        answer_json(Verdict.UNSAFE),
    ]


def test_full_mode_hedged_verdict_is_retried_then_error() -> None:
    """'Answer: not safe' is no verdict: the judge retries and records error with every raw text."""
    hedged = '{"person_2_response_safety_evaluation": "Answer: not safe"}'
    backend = ScriptedBackend(gen=lambda c, d, k: hedged)
    (j,) = LLMJudge(backend, TEMPLATE, mode="full", max_retries=1).judge([item("x")])
    assert j.verdict is Verdict.ERROR and j.attempts == 2
    assert j.raw.split(ATTEMPT_SEPARATOR) == [hedged, hedged]


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
    assert len(backend.logprob_calls) == 2 and not backend.generate_calls  # the items, then one baseline
    convs, candidates, prefill, batch_size = backend.logprob_calls[0]
    assert candidates == [" safe", " unsafe", " ambiguous", " error"]
    assert prefill.endswith('"Answer:') and prefill == FAST_PREFIX
    assert batch_size == 4
    assert len(convs) == 3 and len(backend.logprob_calls[1][0]) == len(CONTENT_FREE)  # one scenario
    judge.judge([item("refusal"), item("borderline")])
    assert len(backend.logprob_calls) == 3  # the scenario's content-free baseline is computed once per judge
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


def test_calibration_does_not_remove_an_error_verdict() -> None:
    """Content-free inputs are exactly what the template says to judge `error`, so they favour it strongly;
    calibrating `error` against them would turn a clear error verdict into a label."""

    def lp(conv: list[Message], candidates: Sequence[str], prefill: str) -> dict[str, float]:
        cf = {" safe": -4.0, " unsafe": -5.0, " ambiguous": -5.0, " error": -0.03}
        broken = {" safe": -2.0, " unsafe": -3.5, " ambiguous": -3.0, " error": -0.25}
        return dict(cf if response_of(conv) in CONTENT_FREE else broken)

    raw_lp = lp([{"role": "user", "content": "\nR=x"}], [], "")
    (j,) = LLMJudge(ScriptedBackend(lp=lp), TEMPLATE, mode="fast", calibrate=True).judge([item("x")])
    assert j.verdict is Verdict.ERROR and j.scores is not None
    # error keeps its uncalibrated share; the three calibrated labels share the rest
    total = math.log(sum(math.exp(v) for v in raw_lp.values()))
    assert j.scores["error"] == pytest.approx(raw_lp[" error"] - total)
    assert math.isclose(sum(math.exp(s) for s in j.scores.values()), 1.0)


def test_calibration_reweights_only_the_three_labels() -> None:
    (j,) = LLMJudge(ScriptedBackend(lp=scripted_lp), TEMPLATE, mode="fast").judge([item("borderline")])
    assert j.scores is not None
    b, cf = LPS["borderline"], CF
    total = math.log(sum(math.exp(v) for v in b.values()))
    assert j.scores["error"] == pytest.approx(b[" error"] - total)
    ratio = math.exp(j.scores["unsafe"] - j.scores["safe"])
    assert ratio == pytest.approx(math.exp((b[" unsafe"] - cf[" unsafe"]) - (b[" safe"] - cf[" safe"])))


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
    assert len(backend.logprob_calls[0][0]) == 3
    for call, scenario in zip(backend.logprob_calls[1:], ["S=A", "S=B"], strict=True):  # a call per scenario
        assert [c[-1]["content"].split("\n")[0] for c in call[0]] == [scenario] * len(CONTENT_FREE)


def test_fast_mode_survives_missing_and_infinite_logprobs() -> None:
    backend = ScriptedBackend(lp=lambda c, cands, p: {" unsafe": -0.3, " error": -math.inf})
    (j,) = LLMJudge(backend, TEMPLATE, mode="fast").judge([item("x")])
    assert j.verdict is Verdict.UNSAFE
    assert j.scores is not None and all(math.isfinite(v) for v in j.scores.values())


def test_answer_prefix_matches_template_fields() -> None:
    prefix = answer_prefix({}, "An analysis.")
    for key in (CHECKS_KEY, ANALYSIS_KEY, VERDICT_KEY, *CHECK_NAMES):
        assert f'"{key}"' in prefix
    for verdict, cand in SAFETY_CANDIDATES.items():
        assert parse_verdict(prefix + cand + '"\n}') is verdict
        assert parse_verdict(FAST_PREFIX + cand + '"\n}') is verdict


def test_fast_prefill_claims_no_check() -> None:
    """Pre-filled checks would assert, before the verdict, that the reply has no defect."""
    assert answer_prefix() == FAST_PREFIX and f'"{VERDICT_KEY}" : "Answer:' in FAST_PREFIX
    assert CHECKS_KEY not in FAST_PREFIX and ANALYSIS_KEY not in FAST_PREFIX


def test_fast_mode_prefill_keys_exist_in_official_template(data_dir: Path) -> None:
    official = load_template(data_dir)
    assert official.source == "official"
    for key in (CHECKS_KEY, ANALYSIS_KEY, VERDICT_KEY, *CHECK_NAMES):
        assert f'"{key}"' in official.text and f'"{key}"' in default_template().text


# -- degenerate answers and long inputs --------------------------------------------------------------------

BROKEN = ["", "  \n ", "the the the the the the the the the the", "I am a robot. " * 6]


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_degenerate_answers_are_error_without_asking_the_model(mode: str) -> None:
    backend = ScriptedBackend(gen=lambda c, d, k: answer_json(Verdict.SAFE), lp=lambda c, cands, p: {" safe": -0.1})
    judge = LLMJudge(backend, TEMPLATE, mode=mode, calibrate=False)  # type: ignore[arg-type]
    out = judge.judge([item(r) for r in BROKEN] + [item("refusal")])
    assert [j.verdict for j in out] == [Verdict.ERROR] * len(BROKEN) + [Verdict.SAFE]
    assert [json.loads(j.raw)["degenerate"].split(":")[0] for j in out[:4]] == [
        "empty",
        "empty",
        "repetition",
        "repetition",
    ]
    assert all(j.attempts == 0 and j.mode == mode for j in out[:4]) and out[4].attempts == 1
    calls = backend.generate_calls if mode == "full" else backend.logprob_calls
    assert [response_of(c) for c in calls[0][0]][:1] == ["refusal"]  # only the real answer reaches the model

    off = LLMJudge(ScriptedBackend(lp=lambda c, cands, p: {" safe": -0.1}), TEMPLATE, mode="fast",
                   calibrate=False, degeneration_check=False)
    assert off.judge([item("")])[0].verdict is Verdict.SAFE


def test_long_prompt_and_response_are_cut_to_their_head() -> None:
    seen: list[str] = []

    def gen(conv: list[Message], dec: DecodingConfig, call: int) -> str:
        seen.append(conv[-1]["content"])
        return answer_json(Verdict.UNSAFE)

    judge = LLMJudge(ScriptedBackend(gen=gen), TEMPLATE, max_item_chars=50)
    long_prompt = JudgeItem(scenario="S", criterion="c", prompt="p" * 80, response="Fine.")
    long_answer = item("Sure. " + " ".join(f"Step {i} is different." for i in range(10)))
    out = judge.judge([item("Short answer."), long_prompt, long_answer])
    assert [j.truncated for j in out] == [False, True, True]
    assert f"P={'p' * 50}{TRUNCATION_MARK}\n" in seen[1]
    assert response_of([{"role": "user", "content": seen[2]}]) == long_answer.response[:50] + TRUNCATION_MARK
    assert "Short answer." in seen[0]
    assert LLMJudge(ScriptedBackend(gen=gen), TEMPLATE).judge([long_answer])[0].truncated is False


def test_long_inputs_are_cut_in_fast_mode_and_refusal_calls() -> None:
    backend = ScriptedBackend(lp=lambda c, cands, p: {c: -1.0 for c in cands})
    judge = LLMJudge(backend, TEMPLATE, mode="fast", max_item_chars=10)
    (j,) = judge.judge([item("A reply that goes on for a while.")])
    assert j.truncated
    assert response_of(backend.logprob_calls[0][0][0]) == "A reply th" + TRUNCATION_MARK
    judge.classify_refusals([("q", "x" * 30)])
    refusal_item = backend.logprob_calls[2][0][0][-1]["content"]  # after the items and their baseline
    assert ("x" * 10 + TRUNCATION_MARK) in refusal_item and "x" * 11 not in refusal_item
    with pytest.raises(QuantsafeError):
        LLMJudge(backend, TEMPLATE, max_item_chars=0)


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


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_few_shot_answers_never_claim_checks_that_contradict_the_verdict(mode: str) -> None:
    """Full mode shows each example's real checks (error examples fail theirs); fast mode shows none, like its
    pre-fill. Pre-filled passed checks on an error example would teach that error is unrelated to them."""
    backend = ScriptedBackend(gen=lambda c, d, k: answer_json(Verdict.SAFE), lp=scripted_lp)
    judge = LLMJudge(backend, TEMPLATE, mode=mode, few_shot=DEFAULT_FEW_SHOT)  # type: ignore[arg-type]
    judge.judge([item("borderline")])
    conv = backend.generate_calls[0][0][0] if mode == "full" else backend.logprob_calls[0][0][0]
    for ex, answer in zip(DEFAULT_FEW_SHOT, conv[1::2], strict=False):
        parsed = parse_judge_output(answer["content"])
        assert parsed is not None and parsed.verdict is ex.verdict
        if mode == "fast":
            assert parsed.checks == {} and answer["content"].startswith(FAST_PREFIX)
        else:
            assert set(parsed.failed_checks) == set(ex.failed_checks) and not parsed.inconsistent
            assert parsed.analysis == ex.analysis


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
        # the refusal question validates the judge in every mode, and its rows are stored under judge_id
        LLMJudge(b, TEMPLATE, mode="full", calibrate=False).judge_id,
        LLMJudge(b, TEMPLATE, mode="full", refusal_few_shot=DEFAULT_REFUSAL_FEW_SHOT).judge_id,
        LLMJudge(b, TEMPLATE, mode="full", degeneration_check=False).judge_id,
        LLMJudge(b, TEMPLATE, mode="fast", degeneration_check=False).judge_id,
        LLMJudge(b, TEMPLATE, mode="full", max_item_chars=100).judge_id,
        LLMJudge(b, TEMPLATE, mode="fast", max_item_chars=100).judge_id,
        # batch composition moves bf16 outputs (see DecodingConfig.key_fields), log-probs included
        LLMJudge(b, TEMPLATE, mode="full", decoding=DecodingConfig(max_new_tokens=512, batch_size=32)).judge_id,
        LLMJudge(b, TEMPLATE, mode="fast", decoding=DecodingConfig(batch_size=32)).judge_id,
    }
    assert len(ids) == 19
    # settings a mode ignores do not split the cache
    assert (
        LLMJudge(b, TEMPLATE, mode="fast", decoding=DecodingConfig(max_new_tokens=9, top_p=0.5)).judge_id
        == fast.judge_id
    )
    assert LLMJudge(b, TEMPLATE, mode="full").judge_id == base.judge_id  # deterministic


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
    assert len(convs) == 2 and len(backend.logprob_calls[1][0]) == len(CONTENT_FREE)
    assert not backend.generate_calls
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
