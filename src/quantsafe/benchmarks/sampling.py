"""Seeded, stratified subsets of a benchmark, so a quick run still covers every scenario."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

from quantsafe.benchmarks.base import Prompt
from quantsafe.errors import QuantsafeError

Stratum = tuple[str, str, str]  # (benchmark, lang, scenario): per scenario, and per language for XSafety


def _rank(seed: int, key: str) -> str:
    """A seeded pseudo-random order that depends only on the key, not on input order or other strata."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _allocate(sizes: dict[Stratum, int], budget: int, seed: int) -> dict[Stratum, int]:
    """Split `budget` over strata: 1 each while it lasts, the rest by size (largest remainder)."""
    strata = sorted(sizes)
    if budget < len(strata):
        lucky = sorted(strata, key=lambda s: _rank(seed, "/".join(s)))[:budget]
        return {s: int(s in lucky) for s in strata}
    spare = {s: sizes[s] - 1 for s in strata}
    rest, pool = budget - len(strata), sum(spare.values())
    quotas = {s: rest * spare[s] / pool if pool else 0.0 for s in strata}
    shares = {s: 1 + int(quotas[s]) for s in strata}
    leftover = budget - sum(shares.values())
    for s in sorted(strata, key=lambda s: (int(quotas[s]) - quotas[s], s))[:leftover]:
        shares[s] += 1
    return shares


def stratified_sample(
    prompts: Sequence[Prompt], limit_per_scenario: int | None = None, limit: int | None = None, seed: int = 0
) -> list[Prompt]:
    """A deterministic subset in the original order.

    `limit_per_scenario` caps each (benchmark, lang, scenario) stratum; `limit` then caps the total,
    spread over strata in proportion to their size with at least one each while the budget allows.
    Selection ranks prompts by a seeded hash of their human id (not their text, so an edited prompt keeps its
    place), so a smaller sample is a subset of a larger one with the same seed, and adding data elsewhere does not
    change a stratum's picks.
    """
    for name, value in (("limit_per_scenario", limit_per_scenario), ("limit", limit)):
        if value is not None and value < 1:
            raise QuantsafeError(f"{name} must be at least 1, got {value}")
    groups: dict[Stratum, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[(prompt.benchmark, prompt.lang, prompt.scenario)].append(index)
    ranked = {s: sorted(indices, key=lambda i: (_rank(seed, prompts[i].human_id), i))[:limit_per_scenario]
              for s, indices in groups.items()}
    if limit is not None and limit < sum(len(indices) for indices in ranked.values()):
        shares = _allocate({s: len(indices) for s, indices in ranked.items()}, limit, seed)
        ranked = {s: indices[: shares[s]] for s, indices in ranked.items()}
    keep = sorted(i for indices in ranked.values() for i in indices)
    return [prompts[i] for i in keep]
