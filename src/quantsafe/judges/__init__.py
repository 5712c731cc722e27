"""Judges: LLM-as-a-judge (full / fast), the refusal-regex baseline, a fake for tests, and validation."""

from quantsafe.judges.base import Judge, JudgeItem, Judgment, Verdict
from quantsafe.judges.fake import FakeJudge
from quantsafe.judges.heuristic import RefusalHeuristicJudge, is_refusal
from quantsafe.judges.llm import DEFAULT_FEW_SHOT, FewShotExample, LLMJudge
from quantsafe.judges.parse import ParsedAnswer, parse_judge_output, parse_verdict
from quantsafe.judges.template import JudgeTemplate, default_template, load_template, refusal_template
from quantsafe.judges.validation import AgreementRow, RefusalClassifier, validate_judge

__all__ = [
    "DEFAULT_FEW_SHOT",
    "AgreementRow",
    "FakeJudge",
    "FewShotExample",
    "Judge",
    "JudgeItem",
    "JudgeTemplate",
    "Judgment",
    "LLMJudge",
    "ParsedAnswer",
    "RefusalClassifier",
    "RefusalHeuristicJudge",
    "Verdict",
    "default_template",
    "is_refusal",
    "load_template",
    "parse_judge_output",
    "parse_verdict",
    "refusal_template",
    "validate_judge",
]
