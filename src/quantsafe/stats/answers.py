"""Answer-against-reference metrics for HotPotQA: In-accuracy, exact match and token F1.

Normalisation, exact match and F1 are those of the official HotPotQA script (hotpot_evaluate_v1.py, whose
normalisation is SQuAD v1.1's), so numbers compare with published ones. Its punctuation set is ASCII
`string.punctuation`: curly quotes, dashes and other Unicode punctuation are kept, as in the official script.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CLOSED_ANSWERS = ("yes", "no", "noanswer")  # the official F1 gives no partial credit when either side is one


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(response: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(response) == normalize_answer(gold))


def token_f1(response: str, gold: str) -> float:
    """The official HotPotQA answer F1: harmonic mean of token precision and recall after normalisation.

    When either normalised side is yes/no/noanswer and the two differ, F1 is 0 (so "no" earns nothing for
    "no way"); two empty strings also score 0, as officially.
    """
    pred, ref = normalize_answer(response), normalize_answer(gold)
    if pred != ref and (pred in _CLOSED_ANSWERS or ref in _CLOSED_ANSWERS):
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def in_accuracy(response: str, gold: str) -> float:
    """1.0 when the normalised gold answer occurs in the normalised response as whole words.

    The paper's "contains", on word boundaries: no letter, digit or underscore may touch the match on either
    side, so gold "no" is not found in "not"/"know" and "1" not in "1990" (a plain substring test credits those;
    9 of the first 53 dev answers are yes/no). Unicode punctuation, kept by the normalisation, still counts as a
    boundary, so a quoted "“Paris”" contains "paris". An empty normalised gold is found only in an empty response.
    """
    pred, ref = normalize_answer(response), normalize_answer(gold)
    if not ref:
        return float(not pred)
    return float(re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", pred) is not None)


def answer_metrics(response: str, gold: str) -> dict[str, float]:
    """All three per-item metrics, each in [0, 1]; a benchmark's score is their mean over items."""
    return {"in_accuracy": in_accuracy(response, gold), "exact_match": exact_match(response, gold),
            "f1": token_f1(response, gold)}
