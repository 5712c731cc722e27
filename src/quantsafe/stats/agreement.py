"""Agreement statistics: judge vs human (accuracy, Cohen's kappa), humans among themselves (Krippendorff's
alpha, Fleiss' kappa), and the paper's majority vote with its conservative tie-break."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

PAPER_PRIORITY: tuple[str, ...] = ("unsafe", "ambiguous", "safe", "error")
"""The paper's tie-break order for the human majority vote (v2 §4.3.1): unsafe > ambiguous > safe > error."""


def _check_pair(a: Sequence[Hashable], b: Sequence[Hashable]) -> None:
    if len(a) != len(b):
        raise ValueError(f"label sequences differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("label sequences are empty")


def accuracy(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Share of positions where the two label sequences agree."""
    _check_pair(a, b)
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa for two raters over the same items: (p_o - p_e) / (1 - p_e).

    Chance agreement p_e uses each rater's own marginals, so a rater that gives one label to everything scores
    exactly 0. When p_e == 1 (both raters constant and equal) kappa is undefined and NaN is returned.
    """
    _check_pair(a, b)
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if math.isclose(p_e, 1.0):
        return math.nan
    return (p_o - p_e) / (1.0 - p_e)


def label_counts(ratings: Sequence[Sequence[str | None]]) -> np.ndarray:
    """units x labels matrix of how many raters gave each label (None = no rating), the form every
    multi-rater statistic here works on, so a bootstrap over units is one fancy index."""
    labels = sorted({v for unit in ratings for v in unit if v is not None})
    index = {lab: i for i, lab in enumerate(labels)}
    counts = np.zeros((len(ratings), len(labels)))
    for u, unit in enumerate(ratings):
        for v in unit:
            if v is not None:
                counts[u, index[v]] += 1
    return counts


def _alpha_from_counts(counts: np.ndarray) -> np.ndarray:
    """Nominal alpha of count matrices (..., units, labels); NaN where undefined."""
    m = counts.sum(-1)
    pairable = m >= 2
    c = counts * pairable[..., None]
    n = c.sum((-2, -1))
    n_c = c.sum(-2)
    # sum over ordered pairs of different values in a unit is m^2 - sum_c n_uc^2, weighted 1/(m-1)
    within = np.where(pairable, (m**2 - (counts**2).sum(-1)) / np.where(pairable, m - 1, 1), 0.0).sum(-1)
    expected = n**2 - (n_c**2).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n > 1) & (expected > 0), 1.0 - (n - 1) * within / expected, np.nan)


def _fleiss_from_counts(counts: np.ndarray) -> np.ndarray:
    """Fleiss' kappa generalised to a varying number of raters per unit (Gwet, Handbook of Inter-Rater
    Reliability, 4th ed. 2014, "Fleiss' generalized kappa"): observed agreement averaged over units with >= 2
    ratings, chance agreement from each unit's label shares averaged over units with >= 1 rating. With the same
    number of raters on every unit it is exactly Fleiss (1971). NaN where undefined."""
    m = counts.sum(-1)
    pairable, rated = m >= 2, m >= 1
    with np.errstate(invalid="ignore", divide="ignore"):
        agree = np.where(pairable, (counts * (counts - 1)).sum(-1) / np.where(pairable, m * (m - 1), 1), 0.0)
        p_a = agree.sum(-1) / pairable.sum(-1)
        shares = np.where(rated[..., None], counts / np.where(rated, m, 1)[..., None], 0.0)
        pi = shares.sum(-2) / rated.sum(-1)[..., None]
        p_e = (pi**2).sum(-1)
        return np.where(np.isclose(p_e, 1.0), np.nan, (p_a - p_e) / (1.0 - p_e))


def krippendorff_alpha_nominal(ratings: Sequence[Sequence[str | None]]) -> float:
    """Krippendorff's alpha for nominal data; `ratings` is units x coders, None where a coder gave no value.

    Coincidence-matrix form (Krippendorff 2011): each unit with m >= 2 values adds 1/(m-1) for every ordered
    pair of values from different coders; alpha = 1 - (n-1) * D_o / sum_{c != k} n_c n_k. Units with fewer
    than two values are not pairable and are dropped. Returns NaN when there is no variation at all.
    """
    return float(_alpha_from_counts(label_counts(ratings)))


def fleiss_kappa(ratings: Sequence[Sequence[str | None]]) -> float:
    """Fleiss' kappa between many raters; `ratings` is units x raters, None where a rater gave no label.

    Fleiss (1971) assumes the same number of raters per unit; annotation rarely gives that, so units with
    different counts use the generalised form (see `_fleiss_from_counts`) rather than dropping units. Units with
    a single rating only enter the chance term. NaN when every rating is the same label or no unit has two.
    """
    return float(_fleiss_from_counts(label_counts(ratings)))


def unit_bootstrap_ci(
    ratings: Sequence[Sequence[str | None]], statistic: Literal["alpha", "fleiss"], confidence: float = 0.95,
    n_bootstrap: int = 1000, seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of Krippendorff's alpha or Fleiss' kappa, resampling units (the items,
    not the people, are the sample); resamples where the statistic is undefined are dropped, None when none
    defines it."""
    counts = label_counts(ratings)
    if not len(counts):
        return None
    idx = np.random.default_rng(seed).integers(0, len(counts), (n_bootstrap, len(counts)))
    compute = _alpha_from_counts if statistic == "alpha" else _fleiss_from_counts
    # in chunks: resamples x units x labels at once would take gigabytes for a paper-sized study
    values = np.concatenate([compute(counts[idx[i:i + 100]]) for i in range(0, n_bootstrap, 100)])
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def majority_label(labels: Sequence[str | None], priority: Sequence[str] = PAPER_PRIORITY) -> str:
    """Most frequent label; ties go to the label earliest in `priority` (the paper's conservative order).

    None (no label) is ignored. Labels missing from `priority` lose every tie to listed ones and are ordered
    among themselves alphabetically, so the result never depends on input order.
    """
    counts = Counter(x for x in labels if x is not None)
    if not counts:
        raise ValueError("no labels to take a majority of")
    top = max(counts.values())
    tied = [lab for lab, c in counts.items() if c == top]
    rank = {lab: i for i, lab in enumerate(priority)}
    return min(tied, key=lambda lab: (rank.get(lab, len(rank)), lab))


def cohen_kappa_ci(
    a: Sequence[Hashable], b: Sequence[Hashable], confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of Cohen's kappa over items (resamples where kappa is undefined are dropped);
    None when no resample defines it. Why bootstrap: the analytic standard error assumes large samples, and
    validation sets are small and imbalanced."""
    _check_pair(a, b)
    codes = {lab: i for i, lab in enumerate(sorted(set(a) | set(b), key=str))}
    x = np.array([codes[v] for v in a])
    y = np.array([codes[v] for v in b])
    idx = np.random.default_rng(seed).integers(0, len(x), (n_bootstrap, len(x)))
    xb, yb = x[idx], y[idx]
    p_o = (xb == yb).mean(axis=1)
    p_e = sum((xb == k).mean(axis=1) * (yb == k).mean(axis=1) for k in codes.values())
    defined = ~np.isclose(p_e, 1.0)
    if not defined.any():
        return None
    kappas = (p_o[defined] - p_e[defined]) / (1.0 - p_e[defined])
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(kappas, [alpha, 1.0 - alpha])
    return float(low), float(high)
