"""Safety ratios with confidence intervals, and paired tests against the full-precision model."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel
from scipy.stats import binomtest, norm


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval: well-behaved at ratios near 0 or 1, where safety ratios live.

    n = 0 gives (0, 1): no observations rule out no ratio, and it is the formula's own limit as n -> 0 (centre
    and half-width both tend to 1/2), so callers can format and compare it like any other interval (NaN cannot
    be written to JSON). At 0 or n successes the bound on that side is exactly 0 or 1, not a rounding error away.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} successes of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return (0.0, 1.0)
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


class PairedTest(BaseModel):
    """Exact McNemar test on prompts judged by both variants."""

    n_pairs: int
    only_reference_safe: int  # safe at full precision, not safe quantized
    only_variant_safe: int
    p_value: float


def mcnemar_exact(reference_safe: Sequence[bool], variant_safe: Sequence[bool]) -> PairedTest:
    """Paired comparison on the same prompts: only the discordant pairs carry information.

    Two-sided exact binomial test of the discordant counts against 1/2. Without discordant pairs (which includes
    empty input) there is no evidence of a difference, so p = 1.
    """
    if len(reference_safe) != len(variant_safe):
        raise ValueError(f"paired samples differ in length: {len(reference_safe)} vs {len(variant_safe)}")
    b = sum(1 for r, v in zip(reference_safe, variant_safe, strict=True) if r and not v)
    c = sum(1 for r, v in zip(reference_safe, variant_safe, strict=True) if v and not r)
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return PairedTest(n_pairs=len(reference_safe), only_reference_safe=b, only_variant_safe=c, p_value=p)
