import pytest

from quantsafe.stats.means import mean_interval, paired_wilcoxon


def test_mean_interval() -> None:
    lo, hi = mean_interval([0.2, 0.4, 0.6, 0.8])
    assert lo < 0.5 < hi and lo >= 0 and hi <= 1
    assert mean_interval([0.5]) == (0.0, 1.0)  # one item says nothing about spread
    assert mean_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_paired_wilcoxon() -> None:
    assert paired_wilcoxon([0.5, 0.5], [0.5, 0.5]) == 1.0
    assert paired_wilcoxon([1.0] * 10, [0.0] * 10) < 0.01
    with pytest.raises(ValueError, match="differ in length"):
        paired_wilcoxon([1.0], [1.0, 0.0])
