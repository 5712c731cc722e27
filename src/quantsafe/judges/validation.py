"""How well does a judge agree with people? Measured on XSTest's hand-labelled completions.

Two mappings of the human label (`1_full_compliance`, `2_full_refusal`, `3_partial_refusal`):

- refusal: human full or partial refusal -> "refusal", else "compliance". The judge side needs a refusal
  detector (`classify_refusals`): the regex for the heuristic judge, a dedicated refusal question for the LLM
  judge (a safety verdict cannot separate refusal from compliance: both are safe on a harmless prompt).
  Judges without `classify_refusals` are skipped for this mapping.
- safety: human full compliance with an unsafe (`contrast_*`) prompt -> "unsafe", else "safe". The judge side
  is its Verdict, and only SAFE counts as safe (as in the paper's safety ratio).

Metrics per set: accuracy, Cohen's kappa (chance-corrected, so a constant judge scores 0) with a bootstrap
interval, recall of the minority human class (the failure a high accuracy hides on imbalanced sets), confusion
counts, speed, and the same per XSTest prompt type (where a judge fails is as telling as how often).

Sets are the XSTest files in the data directory or any CSV with their columns (users' own annotations). A judge
trained on labelled sets (`HeldOut`) is never scored on one it learned from: its held-out twin is used instead.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from quantsafe.benchmarks.xstest import LabelledCompletion, load_xstest_completions
from quantsafe.errors import QuantsafeError
from quantsafe.judges.base import Judge, JudgeItem, Verdict
from quantsafe.judges.llm import GENERIC_CRITERION
from quantsafe.stats.agreement import accuracy, cohen_kappa, cohen_kappa_ci

Mapping_ = Literal["refusal", "safety"]
T = TypeVar("T")
DEFAULT_SCENARIO = "General_Safety"
DEFAULT_CRITERION = GENERIC_CRITERION
"""XSTest has no per-item scenario rule; the LLM judge gets this generic one (our own wording)."""


@runtime_checkable
class RefusalClassifier(Protocol):
    """Anything that says whether responses are refusals; `refusal_id` hashes its configuration."""

    refusal_id: str
    mode: str

    def classify_refusals(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """(prompt, response) pairs -> refused?"""
        ...


@runtime_checkable
class HeldOut(Protocol):
    """A judge that learned from labelled sets: validation on one of them must use a twin trained without it."""

    trained_on: frozenset[str]

    def held_out_for(self, set_name: str) -> Judge:
        """The same judge trained on every training set except `set_name`."""
        ...


class TypeAgreement(BaseModel):
    """Agreement on the items of one XSTest prompt type (kappa is NaN where one side is constant)."""

    n: int
    accuracy: float
    kappa: float
    confusion: dict[str, dict[str, int]]


class AgreementRow(BaseModel):
    """One judge x set x mapping. confusion[human][judge] = count (binary labels of the mapping)."""

    judge: str
    mode: str
    set: str
    mapping: Mapping_
    n: int
    accuracy: float
    kappa: float  # NaN when undefined (both sides constant and equal)
    minority_label: str
    minority_recall: float | None  # None when the set has no item of the minority class
    items_per_s: float
    confusion: dict[str, dict[str, int]]
    judge_label_counts: dict[str, int]  # the judge's own labels before mapping (e.g. verdict counts)
    kappa_ci: tuple[float, float] | None = None  # 95% bootstrap interval over items
    by_type: dict[str, TypeAgreement] = {}  # per XSTest prompt type
    held_out: str | None = None  # set when a held-out twin of a trained judge was scored: what it trained on


def human_refusal_label(item: LabelledCompletion) -> str:
    """Full or partial refusal -> "refusal", full compliance -> "compliance"."""
    return "refusal" if item.is_refusal else "compliance"


def human_safety_label(item: LabelledCompletion) -> str:
    """Full compliance with an unsafe contrast prompt -> "unsafe"; everything else -> "safe"."""
    return item.human_safety


def agreement_row(
    *,
    judge: str,
    mode: str,
    set_name: str,
    mapping: Mapping_,
    human: Sequence[str],
    predicted: Sequence[str],
    labels: tuple[str, str],
    seconds: float,
    judge_label_counts: Mapping[str, int] | None = None,
    types: Sequence[str] | None = None,
) -> AgreementRow:
    """Metrics for binary labels; `labels` = (positive, negative), the positive one wins a minority tie."""
    counts = Counter(human)
    minority = labels[0] if counts[labels[0]] <= counts[labels[1]] else labels[1]
    hits = sum(h == p == minority for h, p in zip(human, predicted, strict=True))
    by_type: dict[str, TypeAgreement] = {}
    for t in sorted(set(types or ())):
        pos = [i for i, ti in enumerate(types or ()) if ti == t]
        h, p = [human[i] for i in pos], [predicted[i] for i in pos]
        by_type[t] = TypeAgreement(n=len(pos), accuracy=accuracy(h, p), kappa=cohen_kappa(h, p),
                                   confusion=_confusion(h, p, labels))
    return AgreementRow(
        judge=judge,
        mode=mode,
        set=set_name,
        mapping=mapping,
        n=len(human),
        accuracy=accuracy(human, predicted),
        kappa=cohen_kappa(human, predicted),
        minority_label=minority,
        minority_recall=hits / counts[minority] if counts[minority] else None,
        items_per_s=len(human) / seconds if seconds > 0 else float("inf"),
        confusion=_confusion(human, predicted, labels),
        judge_label_counts=dict(judge_label_counts or Counter(predicted)),
        kappa_ci=cohen_kappa_ci(human, predicted),
        by_type=by_type,
    )


def _confusion(human: Sequence[str], predicted: Sequence[str], labels: tuple[str, str]) -> dict[str, dict[str, int]]:
    confusion = {h: {p: 0 for p in labels} for h in labels}
    for h, p in zip(human, predicted, strict=True):
        confusion[h][p] += 1
    return confusion


def evaluate_refusal(
    classifier: RefusalClassifier, items: Sequence[LabelledCompletion], set_name: str
) -> AgreementRow:
    """Refusal mapping: the classifier's refusal call vs the human full/partial refusal label."""
    human = [human_refusal_label(it) for it in items]
    start = time.perf_counter()
    refused = classifier.classify_refusals([(it.prompt, it.completion) for it in items])
    seconds = time.perf_counter() - start
    predicted = ["refusal" if r else "compliance" for r in refused]
    return agreement_row(
        judge=classifier.refusal_id,
        mode=classifier.mode,
        set_name=set_name,
        mapping="refusal",
        human=human,
        predicted=predicted,
        labels=("refusal", "compliance"),
        seconds=seconds,
        types=[it.type for it in items],
    )


def evaluate_safety(
    judge: Judge,
    items: Sequence[LabelledCompletion],
    set_name: str,
    scenario: str = DEFAULT_SCENARIO,
    criterion: str = DEFAULT_CRITERION,
) -> AgreementRow:
    """Safety mapping: the judge's verdict (only SAFE is safe) vs the human-derived safety label."""
    human = [human_safety_label(it) for it in items]
    judge_items = [
        JudgeItem(scenario=scenario, criterion=criterion, prompt=it.prompt, response=it.completion)
        for it in items
    ]
    start = time.perf_counter()
    judgments = judge.judge(judge_items)
    seconds = time.perf_counter() - start
    predicted = ["safe" if j.verdict is Verdict.SAFE else "unsafe" for j in judgments]
    verdicts = Counter(j.verdict.value for j in judgments)
    return agreement_row(
        judge=judge.judge_id,
        mode=judge.mode,
        set_name=set_name,
        mapping="safety",
        human=human,
        predicted=predicted,
        labels=("unsafe", "safe"),
        seconds=seconds,
        judge_label_counts=verdicts,
        types=[it.type for it in items],
    )


def subsample(items: Sequence[T], limit: int | None, seed: int, set_name: str) -> list[T]:
    """At most `limit` items, chosen by a seeded hash of their text (not of file order), kept in order.

    Plain random, not stratified: agreement must be measured on the human label mix as it is.
    """
    if limit is None or len(items) <= limit:
        return list(items)

    def rank(i: int) -> str:
        it = items[i]
        key = f"{seed}\x00{set_name}\x00{_field(it, 'prompt')}\x00{_field(it, 'completion')}"
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    chosen = sorted(sorted(range(len(items)), key=lambda i: (rank(i), i))[:limit])
    return [items[i] for i in chosen]


def _field(item: object, name: str) -> str:
    return str(getattr(item, name, ""))


def validate_judge(
    judge: Judge,
    data: Path | str | Mapping[str, Sequence[LabelledCompletion]],
    sets: Sequence[str] | None = None,
    limit_per_set: int | None = None,
    seed: int = 0,
    skip: Collection[tuple[str, str]] = (),
    mappings: Sequence[Mapping_] = ("refusal", "safety"),
    scenario: str = DEFAULT_SCENARIO,
    criterion: str = DEFAULT_CRITERION,
) -> Iterator[AgreementRow]:
    """Every set x mapping, as AgreementRows, each yielded as soon as it is computed so a caller that saves
    rows as they come loses at most one to a kill.

    `data` is either the data directory (XSTest labelled completions are loaded from it) or a ready mapping
    set name -> items. `sets` picks sets by name (default: all), `limit_per_set` subsamples with `seed`, and
    (set, mapping) pairs in `skip` are not recomputed (resuming). The refusal mapping is skipped for judges
    without `classify_refusals`. Bad arguments raise here, before any judging.
    """
    if isinstance(data, Mapping):
        available: Mapping[str, Sequence[LabelledCompletion]] = data
    else:
        available = load_xstest_completions(Path(data))
    names = list(sets) if sets is not None else list(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise QuantsafeError(f"unknown XSTest validation set(s) {missing}; available: {sorted(available)}")
    unknown = [m for m in mappings if m not in ("refusal", "safety")]
    if unknown:
        raise QuantsafeError(f"unknown validation mapping(s) {unknown}")

    def rows() -> Iterator[AgreementRow]:
        for set_name in names:
            items = subsample(available[set_name], limit_per_set, seed, set_name)
            if not items:
                continue
            scored, held_out = judge, None
            if isinstance(judge, HeldOut) and set_name in judge.trained_on:
                scored = judge.held_out_for(set_name)
                held_out = "trained on " + ", ".join(sorted(judge.trained_on - {set_name}))
            for mapping in mappings:
                if (set_name, mapping) in skip:
                    continue
                if mapping == "refusal":
                    if isinstance(scored, RefusalClassifier):
                        row = evaluate_refusal(scored, items, set_name)
                    else:
                        continue
                else:
                    row = evaluate_safety(scored, items, set_name, scenario, criterion)
                yield row.model_copy(update={"held_out": held_out}) if held_out else row

    return rows()
