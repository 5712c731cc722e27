"""Multiple-choice scoring from option-letter log-probabilities: token boundary, restriction to valid letters,
batched against one-at-a-time on a real model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from quantsafe.backends.base import Message
from quantsafe.backends.hf import HFBackend
from quantsafe.benchmarks.base import Prompt
from quantsafe.benchmarks.choice import LOW_MASS, score_choices, split_prefill
from quantsafe.benchmarks.safetybench import load_safetybench_dev
from quantsafe.errors import QuantsafeError
from quantsafe.models import DEFAULT_MODEL, load_model, resolve_model


@pytest.mark.parametrize("name", ["smollm2-135m", DEFAULT_MODEL])
def test_letters_after_answer_carry_their_space(name: str) -> None:
    """Why the prefill's trailing space moves into the candidates: "Answer: A" is "Answer", ":", " A"."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model(name).path))

    def ids(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    stem, space = split_prefill("Answer: ")
    assert (stem, space) == ("Answer:", " ")
    for letter in "ABCD":
        assert ids(f"Answer: {letter}") == ids(stem) + ids(space + letter)
        assert len(ids(space + letter)) == 1
        assert ids(f"Answer: {letter}")[: len(ids("Answer: "))] != ids("Answer: ")  # the space is not its own token


def item(i: int, choices: str, reference: str, prefill: str = "Answer: ") -> Prompt:
    return Prompt(benchmark="safetybench-dev", prompt_id=str(i), lang="en", scenario="s", text=f"question {i}",
                  reference=reference, choices=tuple(choices), prefill=prefill)


class FakeBackend:
    """Log-probs from a table per question text; C is always the model's favourite, and it records each call."""

    name = "fake"

    def __init__(self, table: dict[str, dict[str, float]]) -> None:
        self.table = table
        self.calls: list[tuple[int, list[str], str, int]] = []

    def next_token_logprobs(self, conversations: Sequence[list[Message]], candidates: Sequence[str],
                            prefill: str = "", batch_size: int = 8, max_batch_tokens: int = 1,
                            shared_chars: Sequence[int] | None = None) -> list[dict[str, float]]:
        self.calls.append((len(conversations), list(candidates), prefill, batch_size))
        return [{c: self.table[conv[-1]["content"]].get(c.strip(), -20.0) for c in candidates}
                for conv in conversations]


def test_prediction_is_restricted_to_valid_letters() -> None:
    table = {"question 0": {"A": math.log(0.1), "B": math.log(0.3), "C": math.log(0.6)},
             "question 1": {"A": math.log(0.05), "B": math.log(0.05), "C": math.log(0.8), "D": math.log(0.1)},
             "question 2": {"A": math.log(0.4), "B": math.log(0.4)}}
    backend = FakeBackend(table)
    prompts = [item(0, "AB", "B"), item(1, "ABCD", "D"), item(2, "AB", "B")]
    r0, r1, r2 = score_choices(backend, prompts, batch_size=3)
    assert backend.calls == [(3, [" A", " B", " C", " D"], "Answer:", 3)]  # one call; the space opens each letter
    assert (r0.prediction, r0.correct, set(r0.logprobs)) == ("B", True, {"A", "B"})  # C is no option of item 0
    assert r0.valid_mass == pytest.approx(0.4) and r0.low_mass is (LOW_MASS > 0.4)
    assert (r1.prediction, r1.correct, r1.valid_mass, r1.low_mass) == ("C", False, pytest.approx(1.0), False)
    assert (r2.prediction, r2.correct) == ("A", False)  # a tie goes to the first letter, as upstream's index(max)


def test_prefills_are_scored_apart_and_bad_items_refused() -> None:
    backend = FakeBackend({"question 0": {"A": -1.0, "B": -2.0}, "question 1": {"A": -2.0, "B": -1.0}})
    out = score_choices(backend, [item(0, "AB", "A", "Answer:"), item(1, "AB", "B")], batch_size=1)
    assert [r.prediction for r in out] == ["A", "B"]
    assert [(c[1], c[2]) for c in backend.calls] == [(["A", "B"], "Answer:"), ([" A", " B"], "Answer:")]
    with pytest.raises(QuantsafeError, match="reference among them"):
        score_choices(backend, [item(0, "AB", "C")])
    assert score_choices(backend, []) == []


@pytest.mark.slow
def test_real_model_batched_equals_one_at_a_time(data_dir: Path) -> None:
    model, tok = load_model(resolve_model("smollm2-135m"), dtype=torch.float32)  # fp32: batch shape moves bf16
    backend = HFBackend(model, tok, "smollm2-fp32")
    dev = load_safetybench_dev(data_dir)
    prompts = [dev[0], dev[10], dev[16], dev[31]]  # 2- and 4-option questions of four categories
    assert {len(p.choices) for p in prompts} == {2, 4}
    batched = score_choices(backend, prompts, batch_size=4)
    single = score_choices(backend, prompts, batch_size=1)
    for p, b, s in zip(prompts, batched, single, strict=True):
        assert b.prediction in p.choices and set(b.logprobs) == set(p.choices)
        assert 0.0 < b.valid_mass <= 1.0 and b.low_mass is (b.valid_mass < LOW_MASS)
        assert b.prediction == s.prediction
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-3)
