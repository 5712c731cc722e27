"""Wilson interval and exact McNemar against independent computations and published values."""

from __future__ import annotations

import math

import pytest

from quantsafe.stats import mcnemar_exact, wilson_interval

Z95 = 1.959963984540054  # standard normal 97.5% quantile
Z99 = 2.5758293035489004


def _wilson_by_quadratic(successes: int, n: int, z: float) -> tuple[float, float]:
    """The interval as the set of p with |p̂ − p| <= z·sqrt(p(1 − p)/n): roots of a quadratic in p."""
    p_hat = successes / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return ((-b - root) / (2 * a), (-b + root) / (2 * a))


@pytest.mark.parametrize(("successes", "n", "published"), [
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
    (5, 10, (0.2366, 0.7634)),
    (1, 20, (0.0089, 0.2361)),
])
def test_wilson_matches_published_values(successes: int, n: int, published: tuple[float, float]) -> None:
    assert wilson_interval(successes, n) == pytest.approx(published, abs=5e-5)


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (3, 10), (5, 10), (10, 10), (1, 1), (997, 1067)])
@pytest.mark.parametrize(("confidence", "z"), [(0.95, Z95), (0.99, Z99)])
def test_wilson_matches_the_quadratic_form(successes: int, n: int, confidence: float, z: float) -> None:
    assert wilson_interval(successes, n, confidence) == pytest.approx(_wilson_by_quadratic(successes, n, z), abs=1e-12)


def test_wilson_all_one_class_is_exactly_bounded() -> None:
    """Rounding made 0/3 start at 5.6e-17 and 10/10 end at 0.9999999999999999."""
    for n in range(1, 200):
        low, high = wilson_interval(0, n)
        assert low == 0.0 and 0.0 < high < 1.0, n
        low, high = wilson_interval(n, n)
        assert 0.0 < low < 1.0 and high == 1.0, n


def test_wilson_without_observations_is_the_whole_range() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 1) == pytest.approx(_wilson_by_quadratic(0, 1, Z95))  # n -> 0 tends to (0, 1)


@pytest.mark.parametrize(("successes", "n", "confidence"), [(-1, 10, 0.95), (11, 10, 0.95), (1, 0, 0.95),
                                                            (0, -1, 0.95), (5, 10, 0.0), (5, 10, 1.0)])
def test_wilson_rejects_impossible_input(successes: int, n: int, confidence: float) -> None:
    with pytest.raises(ValueError, match=r"successes|confidence"):
        wilson_interval(successes, n, confidence)


def test_mcnemar_without_discordant_pairs_is_p_one() -> None:
    test = mcnemar_exact([True, True, False], [True, True, False])
    assert (test.n_pairs, test.only_reference_safe, test.only_variant_safe, test.p_value) == (3, 0, 0, 1.0)


def test_mcnemar_all_discordant_one_way() -> None:
    test = mcnemar_exact([True] * 5, [False] * 5)
    assert (test.only_reference_safe, test.only_variant_safe) == (5, 0)
    assert test.p_value == pytest.approx(2 * 0.5**5)  # 0.0625
    assert mcnemar_exact([False] * 5, [True] * 5).p_value == pytest.approx(0.0625)


def test_mcnemar_exact_binomial_tail() -> None:
    ref = [True] * 2 + [False] * 8 + [True] * 4
    var = [False] * 2 + [True] * 8 + [True] * 4
    test = mcnemar_exact(ref, var)
    assert (test.n_pairs, test.only_reference_safe, test.only_variant_safe) == (14, 2, 8)
    assert test.p_value == pytest.approx(2 * (1 + 10 + 45) / 2**10)  # 2 · P(X <= 2), X ~ Bin(10, 1/2)


def test_mcnemar_symmetric_discordance_is_p_one() -> None:
    test = mcnemar_exact([True, True, False, False], [False, False, True, True])
    assert (test.only_reference_safe, test.only_variant_safe, test.p_value) == (2, 2, pytest.approx(1.0))


def test_mcnemar_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        mcnemar_exact([True, False], [True])


def test_mcnemar_empty_input_is_no_evidence() -> None:
    test = mcnemar_exact([], [])
    assert (test.n_pairs, test.p_value) == (0, 1.0)
