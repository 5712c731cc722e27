"""Agreement statistics against hand-computed values and Krippendorff's own worked example."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from quantsafe.stats import accuracy, cohen_kappa, krippendorff_alpha_nominal, majority_label


def test_accuracy() -> None:
    assert accuracy(["a", "b", "a", "a"], ["a", "b", "b", "a"]) == 0.75
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_cohen_kappa_hand_computed() -> None:
    # 2x2 table: both yes 20, a-yes/b-no 5, a-no/b-yes 10, both no 15 (n=50).
    a = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    p_o = 35 / 50
    p_e = (25 / 50) * (30 / 50) + (25 / 50) * (20 / 50)  # 0.5
    assert cohen_kappa(a, b) == pytest.approx((p_o - p_e) / (1 - p_e))  # 0.4
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_extremes() -> None:
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    # a constant rater has kappa exactly 0, whatever the other does
    assert cohen_kappa(["safe", "unsafe", "safe", "safe"], ["safe"] * 4) == 0.0
    # both constant and equal: undefined
    assert math.isnan(cohen_kappa(["x", "x"], ["x", "x"]))


def _kripp_units() -> list[list[str | None]]:
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", nominal example:
    # 4 observers x 12 units, values 1..5, missing data; the paper reports alpha = 0.743.
    n = None
    rows = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    return [[None if v is None else str(v) for v in unit] for unit in zip(*rows, strict=True)]


def _alpha_pairwise(units: list[list[str | None]]) -> float:
    """Independent form: alpha = 1 - D_o/D_e over pairwise disagreements, unit pairs weighted 1/(m-1)."""
    values, d_o = [], 0.0
    for unit in units:
        vals = [v for v in unit if v is not None]
        if len(vals) < 2:
            continue
        values.extend(vals)
        d_o += sum(2 * (x != y) for x, y in combinations(vals, 2)) / (len(vals) - 1)
    n = len(values)
    d_e = sum(2 * (x != y) for x, y in combinations(values, 2)) / (n - 1)
    return 1 - d_o / d_e


def test_krippendorff_textbook_example() -> None:
    units = _kripp_units()
    alpha = krippendorff_alpha_nominal(units)
    assert alpha == pytest.approx(0.743, abs=5e-4)
    assert alpha == pytest.approx(_alpha_pairwise(units))
    # By hand: unit 12 (one value) is dropped; n = 40 pairable values with n_1..n_5 = 9, 13, 10, 5, 3, so
    # sum_{c!=k} n_c n_k = 40^2 - (81 + 169 + 100 + 25 + 9) = 1216. Disagreeing ordered pairs / (m-1):
    # unit 2 (2,2,3,2) 6/3, unit 6 (1,2,3,4) 12/3, unit 8 (1,1,2,1) 6/3 -> 8. alpha = 1 - 39 * 8 / 1216.
    assert alpha == pytest.approx(1 - 39 * 8 / 1216)


def test_krippendorff_small_cases() -> None:
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"], ["a", "a", None]]) == pytest.approx(1.0)
    # two coders, 4 units a/a, a/b, b/b, b/a: o_aa = o_bb = 2, o_ab = o_ba = 2, n = 8, n_a = n_b = 4
    # -> alpha = 1 - (n-1) * (o_ab + o_ba) / (2 * n_a * n_b) = 1 - 7 * 4 / 32 = 0.125
    alpha = krippendorff_alpha_nominal([["a", "a"], ["a", "b"], ["b", "b"], ["b", "a"]])
    assert alpha == pytest.approx(1 - 7 * 4 / 32)
    # no variation at all / nothing pairable -> undefined
    assert math.isnan(krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]))
    assert math.isnan(krippendorff_alpha_nominal([["a", None], [None, "b"]]))


def test_majority_label_and_priority() -> None:
    assert majority_label(["safe", "safe", "unsafe"]) == "safe"
    assert majority_label(["safe", "unsafe"]) == "unsafe"  # tie -> unsafe first
    assert majority_label(["safe", "ambiguous", "safe", "ambiguous", "error"]) == "ambiguous"
    assert majority_label(["error", "safe"]) == "safe"
    assert majority_label(["safe", None, None, "error", "error"]) == "error"
    assert majority_label(["b", "a"], priority=("a",)) == "a"
    assert majority_label(["zz", "yy"], priority=()) == "yy"  # unlisted labels: alphabetical, order-free
    with pytest.raises(ValueError):
        majority_label([None, None])


def test_kappa_ci_brackets_the_estimate_and_narrows_with_n():
    from quantsafe.stats.agreement import cohen_kappa, cohen_kappa_ci

    a = ["x"] * 30 + ["y"] * 30
    b = ["x"] * 25 + ["y"] * 5 + ["y"] * 27 + ["x"] * 3
    lo, hi = cohen_kappa_ci(a, b)
    assert lo < cohen_kappa(a, b) < hi
    lo4, hi4 = cohen_kappa_ci(a * 4, b * 4)
    assert hi4 - lo4 < hi - lo


def test_kappa_ci_undefined_when_both_constant():
    from quantsafe.stats.agreement import cohen_kappa_ci

    assert cohen_kappa_ci(["x"] * 5, ["x"] * 5) is None


# Fleiss (1971) as worked on Wikipedia ("Fleiss' kappa", worked example): 10 subjects, 14 raters, 5 categories;
# P-bar = 0.378, P-bar_e = 0.213, kappa = 0.210. Rows are how many raters chose each category.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


def _units_from_counts(table: list[list[int]]) -> list[list[str | None]]:
    return [[str(k) for k, c in enumerate(row) for _ in range(c)] for row in table]


def test_fleiss_kappa_textbook_example() -> None:
    from quantsafe.stats.agreement import fleiss_kappa

    kappa = fleiss_kappa(_units_from_counts(FLEISS_TABLE))
    # By hand: P-bar = sum_i (sum_j n_ij^2 - 14) / (14 * 13) / 10; p_j = column sums / 140.
    p_bar = sum((sum(c * c for c in row) - 14) / (14 * 13) for row in FLEISS_TABLE) / 10
    p_e = sum((sum(row[j] for row in FLEISS_TABLE) / 140) ** 2 for j in range(5))
    assert p_bar == pytest.approx(0.378, abs=5e-4) and p_e == pytest.approx(0.213, abs=5e-4)
    assert kappa == pytest.approx((p_bar - p_e) / (1 - p_e))
    assert kappa == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_matches_statsmodels() -> None:
    """Test-only cross-check against statsmodels (skipped where it is not installed)."""
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    from quantsafe.stats.agreement import fleiss_kappa

    assert fleiss_kappa(_units_from_counts(FLEISS_TABLE)) == pytest.approx(inter_rater.fleiss_kappa(FLEISS_TABLE))
    rng = np.random.default_rng(1)
    table = rng.multinomial(5, [0.6, 0.2, 0.15, 0.05], size=40)
    assert fleiss_kappa(_units_from_counts(table.tolist())) == pytest.approx(inter_rater.fleiss_kappa(table))


def test_fleiss_kappa_missing_ratings_use_the_generalised_form() -> None:
    from quantsafe.stats.agreement import fleiss_kappa

    # None cells are ignored: the same units with extra empty cells give the same kappa
    units = [["a", "a", "b"], ["b", "b", "b"], ["a", "b", "a"]]
    assert fleiss_kappa([[*u, None] for u in units]) == pytest.approx(fleiss_kappa(units))
    # varying counts, by hand (Gwet's generalisation): units (a,a) (a,b,b) (b) ->
    # p_a = mean over units with >= 2 ratings of sum r(r-1) / (m(m-1)) = (2/2 + 2/6) / 2 = 2/3;
    # pi_a = mean over rated units of a's share = (1 + 1/3 + 0) / 3 = 4/9, pi_b = 5/9; p_e = (16 + 25) / 81
    p_a, p_e = 2 / 3, 41 / 81
    assert fleiss_kappa([["a", "a", None], ["a", "b", "b"], [None, "b", None]]) == pytest.approx(
        (p_a - p_e) / (1 - p_e))
    assert math.isnan(fleiss_kappa([["a", "a"], ["a", "a"]]))  # no variation: undefined
    assert fleiss_kappa([["a", "b"], ["b", "a"]]) == pytest.approx(-1.0)


def test_unit_bootstrap_ci() -> None:
    from quantsafe.stats.agreement import fleiss_kappa, unit_bootstrap_ci

    units = _kripp_units()
    lo, hi = unit_bootstrap_ci(units, "alpha")
    assert lo < krippendorff_alpha_nominal(units) < hi <= 1.0
    many = _units_from_counts(FLEISS_TABLE)
    lo, hi = unit_bootstrap_ci(many, "fleiss")
    assert lo < fleiss_kappa(many) < hi
    lo4, hi4 = unit_bootstrap_ci(many * 4, "fleiss")
    assert hi4 - lo4 < hi - lo
    assert unit_bootstrap_ci(many, "fleiss", seed=3) == unit_bootstrap_ci(many, "fleiss", seed=3)
    assert unit_bootstrap_ci([["a", "a"], ["a", "a"]], "alpha") is None
    assert unit_bootstrap_ci([], "alpha") is None
