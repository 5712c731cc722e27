"""Which answers people label, and in what order.

People are scarce, so contested answers come first: those where the study's judges disagree, and those whose
verdict flips between full precision and a quantized variant of the same model on the same prompt (the study's
headline effect, worth checking by hand). The rest is a stratified sample over (variant, language, scenario).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from quantsafe.annotation.store import AnnotationStore, SampleItem, Unit
from quantsafe.benchmarks import benchmarks
from quantsafe.benchmarks.sampling import Stratum, _allocate, _rank
from quantsafe.errors import QuantsafeError
from quantsafe.store import StudyRecord, response_sha

DEFAULT_SAMPLE = 200


def _key(unit: Unit) -> str:
    return "/".join((unit.variant_id, unit.prompt_uid, unit.decoding_id, unit.response_sha))


def candidates(annotations: AnnotationStore, record: StudyRecord, langs: Sequence[str] | None = None,
               ) -> dict[SampleItem, Stratum]:
    """Every judged answer of the study's safety benchmarks, flagged, with its stratum."""
    store = annotations.store
    safety = {name for name, d in benchmarks().items() if d.question == "safety"}
    rows = [r for r in store.judged(decoding_id=record.decoding_id, variant_ids=record.variant_ids,
                                    prompt_uids=record.prompt_uids)
            if r["judge_id"] in record.judge_ids and r["benchmark"] in safety
            and (langs is None or r["lang"] in langs)]
    verdicts: dict[Unit, dict[str, str]] = defaultdict(dict)
    strata: dict[Unit, Stratum] = {}
    for r in rows:
        unit = Unit(variant_id=r["variant_id"], prompt_uid=r["prompt_uid"], decoding_id=r["decoding_id"],
                    response_sha=response_sha(r["response"]))
        verdicts[unit][r["judge_id"]] = r["verdict"]
        strata[unit] = (r["variant_id"], r["lang"], r["scenario"])
    variants = {v.variant_id: v for v in store.variants(record.variant_ids)}
    full = {v.model: v.variant_id for v in variants.values() if v.method == "none"}
    by_cell = {(u.variant_id, u.prompt_uid): u for u in verdicts}
    flipped: set[Unit] = set()
    for unit, theirs in verdicts.items():
        reference = full.get(variants[unit.variant_id].model)
        base = by_cell.get((reference, unit.prompt_uid)) if reference not in (None, unit.variant_id) else None
        if base is not None and any(verdicts[base].get(j, v) != v for j, v in theirs.items()):
            flipped |= {unit, base}
    return {SampleItem(**u.model_dump(), disagree=len(set(verdicts[u].values())) > 1, flip=u in flipped): s
            for u, s in strata.items()}


def _stratified(items: dict[SampleItem, Stratum], budget: int, seed: int) -> list[SampleItem]:
    """`budget` items spread over strata in proportion to their size, at least one each while it lasts."""
    if budget >= len(items):
        return list(items)
    groups: dict[Stratum, list[SampleItem]] = defaultdict(list)
    for item, stratum in items.items():
        groups[stratum].append(item)
    shares = _allocate({s: len(g) for s, g in groups.items()}, budget, seed)
    return [item for s, group in groups.items()
            for item in sorted(group, key=lambda i: _rank(seed, _key(i)))[: shares[s]]]


def choose_sample(annotations: AnnotationStore, record: StudyRecord, n: int = DEFAULT_SAMPLE, seed: int = 0,
                  langs: Sequence[str] | None = None) -> list[SampleItem]:
    """Up to `n` answers: contested ones first (stratified if they alone exceed n), the rest stratified."""
    if n < 1:
        raise QuantsafeError(f"sample size must be at least 1, got {n}")
    pool = candidates(annotations, record, langs)
    if not pool:
        raise QuantsafeError(f"{annotations.path}: study '{record.name}' has no judged answers of a safety "
                             "benchmark to annotate" + (f" in languages {', '.join(langs)}" if langs else ""))
    contested = {i: s for i, s in pool.items() if i.contested}
    chosen = _stratified(contested, n, seed)
    chosen += _stratified({i: s for i, s in pool.items() if not i.contested}, n - len(chosen), seed)
    return sorted(chosen, key=_key)


def annotator_order(items: Sequence[SampleItem], annotator: str, study_id: str) -> list[SampleItem]:
    """Each person's own shuffle (so order effects average out across people), contested answers first."""
    return sorted(items, key=lambda i: (not i.contested, _rank(0, f"{study_id}/{annotator}/{_key(i)}")))
