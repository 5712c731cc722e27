"""Which answers people see, and in which order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from annotation_study import CONTESTED, SCENARIOS, VERDICTS

from quantsafe.annotation import AnnotationStore, annotator_order, choose_sample
from quantsafe.errors import QuantsafeError


def _sample(study_dir: Path, n: int, seed: int = 0) -> list:
    with AnnotationStore(study_dir / "quantsafe.db") as annotations:
        return choose_sample(annotations, annotations.store.study(), n, seed)


def test_contested_answers_are_flagged_and_refusal_items_left_out(study_dir: Path) -> None:
    everything = _sample(study_dir, 100)
    assert len(everything) == 2 * len(VERDICTS)  # both variants of every safety prompt; the xstest item is out
    flags = {(i.variant_id, i.prompt_uid): (i.disagree, i.flip) for i in everything}
    assert flags[("fp", "p0")] == flags[("q4", "p0")] == (False, True)  # safe -> unsafe under quantization
    assert flags[("fp", "p2")] == flags[("q4", "p2")] == (True, False)  # the judges split, the same way on both
    assert {p for (_, p), f in flags.items() if any(f)} == CONTESTED


def test_contested_first_then_one_per_stratum(study_dir: Path) -> None:
    assert {i.prompt_uid for i in _sample(study_dir, 2)} <= CONTESTED
    chosen = _sample(study_dir, 4 + 6)  # 4 contested + one calm answer in each (variant, scenario) stratum
    calm = [i for i in chosen if not i.contested]
    assert sum(i.contested for i in chosen) == 4
    scenario = {p: SCENARIOS[k // 2] for k, p in enumerate(VERDICTS)}
    assert Counter((i.variant_id, scenario[i.prompt_uid]) for i in calm) == Counter(
        (v, s) for v in ("fp", "q4") for s in SCENARIOS)
    assert _sample(study_dir, 10) == chosen  # seeded: the same sample again
    assert any(_sample(study_dir, 5, seed) != _sample(study_dir, 5) for seed in range(1, 6))


def test_each_annotator_has_an_own_order_with_contested_first(study_dir: Path) -> None:
    items = _sample(study_dir, 100)
    orders = {name: annotator_order(items, name, "study") for name in ("alice", "bob")}
    for order in orders.values():
        assert sorted(order, key=lambda i: i.unit_id) == sorted(items, key=lambda i: i.unit_id)
        assert [i.contested for i in order] == [True] * 4 + [False] * 8
    assert orders["alice"] != orders["bob"]
    assert annotator_order(list(reversed(items)), "alice", "study") == orders["alice"]  # stable across requests


def test_bad_sample_requests(study_dir: Path) -> None:
    with pytest.raises(QuantsafeError, match="at least 1"):
        _sample(study_dir, 0)
    with AnnotationStore(study_dir / "quantsafe.db") as annotations, pytest.raises(QuantsafeError, match="fr"):
        choose_sample(annotations, annotations.store.study(), 10, langs=["fr"])
