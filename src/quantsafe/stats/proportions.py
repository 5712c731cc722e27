"""Safety ratios with confidence intervals, and paired tests against the full-precision model."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel
from scipy.stats import binomtest, norm


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval: well-behaved at ratios near 0 or 1, where safety ratios live."""
    if n == 0:
        return (float("nan"), float("nan"))
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


class PairedTest(BaseModel):
    """Exact McNemar test on prompts judged by both variants."""

    n_pairs: int
    only_reference_safe: int  # safe at full precision, not safe quantized
    only_variant_safe: int
    p_value: float


def mcnemar_exact(reference_safe: Sequence[bool], variant_safe: Sequence[bool]) -> PairedTest:
    """Paired comparison on the same prompts: only the discordant pairs carry information."""
    if len(reference_safe) != len(variant_safe):
        raise ValueError("paired samples must have equal length")
    b = sum(1 for r, v in zip(reference_safe, variant_safe, strict=True) if r and not v)
    c = sum(1 for r, v in zip(reference_safe, variant_safe, strict=True) if v and not r)
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return PairedTest(n_pairs=len(reference_safe), only_reference_safe=b, only_variant_safe=c, p_value=p)
