"""Means of per-item scores that are not 0/1 (token F1), with an interval and a paired test."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import t, wilcoxon


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean, clipped to [0, 1] (the scores it serves are shares); n < 2 gives (0, 1)."""
    n = len(values)
    if n < 2:
        return (0.0, 1.0)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return (max(0.0, mean - half), min(1.0, mean + half))


def paired_wilcoxon(reference: Sequence[float], variant: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p on the same items (no normality assumed: F1 piles up at 0 and 1);
    no differing pair is no evidence of a difference, p = 1."""
    if len(reference) != len(variant):
        raise ValueError(f"paired samples differ in length: {len(reference)} vs {len(variant)}")
    if all(a == b for a, b in zip(reference, variant, strict=True)):
        return 1.0
    return float(wilcoxon(variant, reference, zero_method="wilcox").pvalue)
