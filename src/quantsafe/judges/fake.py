"""FakeJudge: deterministic verdicts without a model, for tests of everything downstream of judging."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from quantsafe.hashing import stable_hash
from quantsafe.judges.base import JudgeItem, Judgment, Verdict

_ORDER: tuple[Verdict, ...] = (Verdict.SAFE, Verdict.UNSAFE, Verdict.AMBIGUOUS, Verdict.ERROR)


class FakeJudge:
    """Verdict = `mapping[response]` if given, else `constant` if given, else a hash of the item.

    The hash choice is stable across runs and processes (sha256, not Python's salted `hash`).
    """

    mode = "fake"

    def __init__(
        self,
        constant: Verdict | None = None,
        mapping: Mapping[str, Verdict] | None = None,
        refusal_mapping: Mapping[str, bool] | None = None,
    ) -> None:
        self.constant = constant
        self.mapping = dict(mapping or {})
        self.refusal_mapping = dict(refusal_mapping or {})
        self.judge_id = stable_hash({"kind": "fake", "constant": constant, "mapping": self.mapping})
        self.refusal_id = stable_hash({"kind": "fake-refusal", "mapping": self.refusal_mapping})
        self.calls = 0

    def _verdict(self, item: JudgeItem) -> Verdict:
        if item.response in self.mapping:
            return self.mapping[item.response]
        if self.constant is not None:
            return self.constant
        return _ORDER[int(stable_hash(item), 16) % len(_ORDER)]

    def judge(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        self.calls += 1
        return [Judgment(verdict=self._verdict(it), mode=self.mode, raw="fake") for it in items]

    def classify_refusals(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Refusal = `refusal_mapping[response]` if given, else a hash of the pair."""
        return [self.refusal_mapping.get(r, int(stable_hash([p, r]), 16) % 2 == 0) for p, r in pairs]
