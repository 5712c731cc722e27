"""Stratified sampling: seeded, order-preserving, covering every scenario."""

from __future__ import annotations

from collections import Counter

import pytest

from quantsafe.benchmarks import Prompt, stratified_sample
from quantsafe.errors import QuantsafeError

SIZES = {"a": 50, "b": 30, "c": 15, "d": 4, "e": 1}


def make_prompts(sizes: dict[str, int] = SIZES, lang: str = "en") -> list[Prompt]:
    return [Prompt(benchmark="toy", prompt_id=f"{scenario}:{i}", lang=lang, scenario=scenario, text=f"t{i}")
            for i in range(max(sizes.values())) for scenario, n in sizes.items() if i < n]


def is_subsequence(sample: list[Prompt], prompts: list[Prompt]) -> bool:
    it = iter(prompts)
    return all(any(p is q for q in it) for p in sample)


def test_no_limits_returns_everything() -> None:
    prompts = make_prompts()
    assert stratified_sample(prompts) == prompts
    assert stratified_sample(prompts, limit=1000) == prompts


def test_limit_per_scenario() -> None:
    prompts = make_prompts()
    sample = stratified_sample(prompts, limit_per_scenario=5, seed=3)
    assert Counter(p.scenario for p in sample) == {"a": 5, "b": 5, "c": 5, "d": 4, "e": 1}
    assert is_subsequence(sample, prompts)


def test_deterministic_and_seeded() -> None:
    prompts = make_prompts()
    first = stratified_sample(prompts, limit=20, seed=7)
    assert first == stratified_sample(list(prompts), limit=20, seed=7)
    assert first != stratified_sample(prompts, limit=20, seed=8)
    assert set(first) == set(stratified_sample(list(reversed(prompts)), limit=20, seed=7))


def test_limit_spreads_budget() -> None:
    prompts = make_prompts()
    sample = stratified_sample(prompts, limit=20, seed=1)
    counts = Counter(p.scenario for p in sample)
    assert sum(counts.values()) == 20
    assert set(counts) == set(SIZES)  # at least one per scenario
    assert counts["a"] > counts["b"] > counts["c"] >= counts["d"] >= counts["e"] == 1
    assert is_subsequence(sample, prompts)


def test_budget_below_scenario_count() -> None:
    sample = stratified_sample(make_prompts(), limit=3, seed=2)
    assert len(sample) == 3
    assert len({p.scenario for p in sample}) == 3


def test_smaller_sample_is_nested() -> None:
    prompts = make_prompts()
    small = stratified_sample(prompts, limit_per_scenario=3, seed=5)
    large = stratified_sample(prompts, limit_per_scenario=10, seed=5)
    assert set(small) <= set(large)


def test_languages_are_separate_strata() -> None:
    prompts = make_prompts({"a": 10}, "en") + make_prompts({"a": 10}, "de")
    sample = stratified_sample(prompts, limit_per_scenario=2)
    assert Counter(p.lang for p in sample) == {"en": 2, "de": 2}


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"limit_per_scenario": -1}])
def test_invalid_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(QuantsafeError, match="must be at least 1"):
        stratified_sample(make_prompts(), **kwargs)
