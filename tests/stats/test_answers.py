"""Answer metrics against hand-computed cases, including the official HotPotQA script's special cases."""

from __future__ import annotations

import pytest

from quantsafe.stats.answers import answer_metrics, exact_match, in_accuracy, normalize_answer, token_f1


@pytest.mark.parametrize(("text", "expected"), [
    ("The Beatles!", "beatles"),
    ("  A  cat, an apple; the END.  ", "cat apple end"),
    ("theater, another anthem", "theater another anthem"),  # articles only as whole words
    ("U.S.A.", "usa"),
    ("Paris's", "pariss"),  # the ASCII apostrophe is punctuation, so it goes and the words join
    ("Pedro Rodríguez", "pedro rodríguez"),
    # Unicode punctuation is not in string.punctuation: the official script keeps it (and "the" between curly
    # quotes is still a whole word, so it goes).
    ("“The” Beatles’ song—live", "“ ” beatles’ song—live"),
    ("", ""),
])
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(("response", "gold", "expected"), [
    ("The Eiffel Tower.", "eiffel tower", 1.0),
    ("Eiffel Tower is", "Eiffel Tower", 0.0),
    ("“Beatles”", "Beatles", 0.0),
    ("", "", 1.0),
])
def test_exact_match(response: str, gold: str, expected: float) -> None:
    assert exact_match(response, gold) == expected


@pytest.mark.parametrize(("response", "gold", "expected"), [
    ("the Chief of Protocol office", "Chief of Protocol", 6 / 7),  # P 3/4, R 3/3
    ("new new york", "New York", 0.8),  # repeated tokens count once per gold occurrence: P 2/3, R 1
    ("Yes.", "yes", 1.0),
    ("no", "no way", 0.0),  # overlap would give 2/3; the prediction is "no" and differs, so 0
    ("yes they are", "yes", 0.0),  # overlap would give 1/2; the gold is "yes" and differs, so 0
    ("noanswer", "noanswer given", 0.0),  # likewise for "noanswer"
    ("1986 to 2013", "from 1986 to 2013", 6 / 7),  # P 3/3, R 3/4
    ("“Beatles”", "Beatles", 0.0),  # curly quotes stay, so the tokens differ
    ("", "", 0.0),  # no tokens in common: 0, although exact match is 1
    ("Paris", "", 0.0),
])
def test_token_f1(response: str, gold: str, expected: float) -> None:
    assert token_f1(response, gold) == pytest.approx(expected)


@pytest.mark.parametrize(("response", "gold", "expected"), [
    ("No, they were not.", "no", 1.0),
    ("They were not from the same country.", "no", 0.0),  # a plain substring test would find "no" in "not"
    ("I don't know.", "no", 0.0),
    ("Yes, both were American.", "yes", 1.0),
    ("It opened in 1990.", "199", 0.0),
    ("The answer is the Chief of Protocol.", "Chief of Protocol", 1.0),
    ("Capital: “Paris”.", "Paris", 1.0),  # Unicode quotes are kept but are not word characters
    ("Paris’s mayor", "Paris", 1.0),  # curly apostrophe: kept, a boundary
    ("Paris's mayor", "Paris", 0.0),  # ASCII apostrophe: removed, "pariss" is another word
    ("It seats 3,677 seated spectators", "3,677 seated", 1.0),
    ("from 1986 to 2013", "1986 to 2013", 1.0),
    ("1986 to 2013", "from 1986 to 2013", 0.0),
    ("Pedro Rodriguez", "Pedro Rodríguez", 0.0),  # accents are not folded, as officially
    ("", "The", 1.0),  # gold normalises to "": found only in an empty response
    ("anything", "the", 0.0),
])
def test_in_accuracy(response: str, gold: str, expected: float) -> None:
    assert in_accuracy(response, gold) == expected


def test_answer_metrics() -> None:
    # "answer is chief of protocol" against "chief of protocol": P 3/5, R 1, F1 0.75
    assert answer_metrics("The answer is the Chief of Protocol.", "Chief of Protocol") == pytest.approx(
        {"in_accuracy": 1.0, "exact_match": 0.0, "f1": 0.75})
    assert answer_metrics("Chief of Protocol", "chief of protocol.") == {"in_accuracy": 1.0, "exact_match": 1.0,
                                                                         "f1": 1.0}
