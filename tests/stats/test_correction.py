import math

import numpy as np
import pytest

from quantsafe.stats.correction import corrected_safety_ratio, judge_error_rates, rogan_gladen


def confusion(tp: int, fn: int, fp: int, tn: int) -> dict[str, dict[str, int]]:
    """confusion[human][judge] with "safe" as the positive label."""
    return {"safe": {"safe": tp, "unsafe": fn}, "unsafe": {"safe": fp, "unsafe": tn}}


def test_rogan_gladen_known_value_and_clipping():
    assert rogan_gladen(0.6, 0.9, 0.8) == pytest.approx(0.4 / 0.7)
    assert rogan_gladen(0.05, 0.9, 0.8) == 0.0  # below the judge's false-positive rate
    assert rogan_gladen(0.99, 0.9, 0.8) == 1.0
    with pytest.raises(ValueError):
        rogan_gladen(0.5, 0.5, 0.5)


def test_perfect_judge_changes_nothing():
    r = corrected_safety_ratio(30, 100, confusion(50, 0, 0, 50))
    assert r.corrected == pytest.approx(0.3)
    assert r.sensitivity == r.specificity == 1.0
    assert r.ci_low is not None and r.ci_high is not None
    assert r.ci_low < 0.3 < r.ci_high


def test_error_rates_read_from_confusion():
    assert judge_error_rates(confusion(45, 5, 8, 32)) == (45, 50, 32, 40)


def test_weak_judge_gives_a_note_not_a_number():
    r = corrected_safety_ratio(60, 100, confusion(55, 45, 45, 55))  # J = 0.1
    assert r.corrected is None and r.ci_low is None
    assert "too weak" in r.note and r.youden_j == pytest.approx(0.1)


def test_no_unsafe_validation_items_cannot_correct():
    r = corrected_safety_ratio(60, 100, {"safe": {"safe": 40, "unsafe": 2}, "unsafe": {"safe": 0, "unsafe": 0}})
    assert r.corrected is None and "unsafe" in r.note


def test_interval_widens_with_fewer_validation_items():
    big = corrected_safety_ratio(40, 200, confusion(450, 50, 40, 360))
    small = corrected_safety_ratio(40, 200, confusion(9, 1, 1, 7))
    assert big.corrected == pytest.approx(small.corrected, abs=0.05)
    assert (small.ci_high - small.ci_low) > (big.ci_high - big.ci_low)


def test_bootstrap_interval_covers_the_truth():
    """Simulated judge with se=0.85, sp=0.9 on a true safe share of 0.3: the 95% interval covers it in most runs."""
    rng = np.random.default_rng(1)
    pi, se, sp, covered, runs = 0.3, 0.85, 0.9, 0, 100
    for run in range(runs):
        truth = rng.random(300) < pi
        judged = np.where(truth, rng.random(300) < se, rng.random(300) >= sp)
        tp = int(rng.binomial(120, se))
        tn = int(rng.binomial(80, sp))
        r = corrected_safety_ratio(int(judged.sum()), 300, confusion(tp, 120 - tp, 80 - tn, tn), n_bootstrap=1000,
                                   seed=run)
        covered += r.ci_low <= pi <= r.ci_high
    assert covered >= 88


def test_raw_ratio_and_bad_counts():
    assert corrected_safety_ratio(3, 4, confusion(9, 1, 1, 9)).raw == 0.75
    with pytest.raises(ValueError):
        corrected_safety_ratio(5, 4, confusion(9, 1, 1, 9))
    assert not math.isnan(corrected_safety_ratio(0, 4, confusion(9, 1, 1, 9)).corrected or 0)
