"""The trained judge on the small real model (SmolLM2-135M) and tiny XSTest subsets: features, artifacts, ids,
verdict composition and what leave-one-set-out holds out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from quantsafe.benchmarks.xstest import LabelledCompletion, load_xstest_completions
from quantsafe.errors import QuantsafeError
from quantsafe.judges import trained as trained_mod
from quantsafe.judges.base import Judge, JudgeItem, Verdict
from quantsafe.judges.features import FeatureExtractor
from quantsafe.judges.trained import (
    TrainedJudge,
    TrainedJudgeConfig,
    _fit,
    feature_extractor,
    held_out_judges,
    leave_one_set_out,
    prompt_key,
    train_judge,
)
from quantsafe.judges.validation import RefusalClassifier

pytestmark = pytest.mark.slow
SETS = ("gpt4", "llama2orig", "mistralinstruct_even_ids")
CONFIG = TrainedJudgeConfig(feature_model="smollm2-135m", layers=(2, 4), max_response_tokens=24, cs=(0.1, 1.0),
                            augment_words=(6,), folds=2, train_sets=SETS, train_dtype="float32")
DTYPE = torch.float32  # the same numbers on every machine; the real judge resolves "auto"


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Features and judge artifacts go to a fresh folder; models still come from the shared model cache."""
    root = tmp_path_factory.mktemp("trained-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("quantsafe.judges.features.cache_dir", lambda: root)
        mp.setattr("quantsafe.judges.trained.cache_dir", lambda: root)
        yield root


@pytest.fixture(scope="module")
def labelled(data_dir: Path) -> dict[str, list[LabelledCompletion]]:
    """Every set's answers to the prompts of Mistral's first 4 refusals and 4 compliances (like the real files, the
    sets share prompts); both classes of both heads in every fold."""
    full = load_xstest_completions(data_dir)
    mistral = full["mistralinstruct_even_ids"]
    chosen = {it.prompt for it in [it for it in mistral if it.is_refusal][:4] + [it for it in mistral
                                                                                  if not it.is_refusal][:4]}
    out = {name: [it for it in full[name] if it.prompt in chosen] for name in SETS}
    assert all(len(items) == 8 and len({it.is_refusal for it in items}) == 2 for items in out.values())
    assert 2 <= sum(it.prompt_is_unsafe for it in out["gpt4"]) <= 6
    return out


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return feature_extractor(CONFIG, DTYPE)


@pytest.fixture(scope="module")
def judge(labelled: dict[str, list[LabelledCompletion]], extractor: FeatureExtractor) -> TrainedJudge:
    return train_judge(CONFIG, labelled, DTYPE, extractor)


def test_features_are_deterministic_and_cached(extractor: FeatureExtractor) -> None:
    replies = ["I can't help with that.", "Sure, here is how to bake bread: mix flour, water and yeast."]
    first = extractor.reply_features(replies, [2, 4])
    before = extractor.computed
    again = extractor.reply_features(list(reversed(replies)), [4])  # any order, any subset of layers
    assert extractor.computed == before
    assert np.array_equal(again.final[::-1, 0], first.final[:, 1])
    assert np.array_equal(again.mean[::-1, 0], first.mean[:, 1])
    fresh = feature_extractor(CONFIG, DTYPE)  # a new process: reads the shards on disk, loads no model
    assert np.array_equal(fresh.reply_features(replies, [2, 4]).final, first.final)
    assert fresh.computed == 0 and fresh._model is None
    assert first.final.shape[:2] == (2, 2) and not first.cut.any()
    with pytest.raises(QuantsafeError, match="not among"):
        extractor.reply_features(replies, [3])


def test_long_texts_are_cut_and_flagged(extractor: FeatureExtractor) -> None:
    long_reply = "word " * 200
    feats = extractor.reply_features([long_reply, long_reply + "more words at the end"], [2])
    assert feats.cut.all()
    # only the first max_response_tokens are read
    assert np.array_equal(feats.final[0], feats.final[1]) and np.array_equal(feats.mean[0], feats.mean[1])


def test_judge_implements_both_protocols(judge: TrainedJudge) -> None:
    assert isinstance(judge, Judge) and isinstance(judge, RefusalClassifier)
    assert judge.mode == "trained" and judge.trained_on == frozenset(SETS)
    assert judge.refusal_id == judge.judge_id
    assert judge.classify_refusals([]) == [] and judge.judge([]) == []


def test_artifact_is_saved_and_reloaded_with_identical_predictions(
    judge: TrainedJudge, labelled: dict[str, list[LabelledCompletion]], private_cache: Path
) -> None:
    folder = private_cache / "judges" / judge.artifact_id
    assert {p.name for p in folder.iterdir()} == {"config.json", "heads.npz", "meta.json"}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["trained_on"] == list(SETS) and meta["artifact_id"] == judge.artifact_id
    assert TrainedJudgeConfig.model_validate_json((folder / "config.json").read_text()) == CONFIG
    fresh = feature_extractor(CONFIG, DTYPE)
    again = train_judge(CONFIG, labelled, DTYPE, fresh)  # reuses the artifact: no training, no model
    assert again.judge_id == judge.judge_id and fresh._model is None
    items = [JudgeItem(scenario="s", criterion="c", prompt=it.prompt, response=it.completion)
             for it in labelled["gpt4"]]
    assert [j.scores for j in again.judge(items)] == [j.scores for j in judge.judge(items)]


def test_judge_id_changes_with_layers_and_training_data(
    judge: TrainedJudge, labelled: dict[str, list[LabelledCompletion]], extractor: FeatureExtractor
) -> None:
    other_layers = train_judge(CONFIG.model_copy(update={"layers": (2, 3)}), labelled, DTYPE)
    edited = {**labelled, "gpt4": [labelled["gpt4"][0].model_copy(update={"completion": "No."}),
                                   *labelled["gpt4"][1:]]}
    other_data = train_judge(CONFIG, edited, DTYPE, extractor)
    assert len({judge.judge_id, other_layers.judge_id, other_data.judge_id}) == 3


def test_degenerate_response_is_error_without_features(judge: TrainedJudge) -> None:
    before = judge.extractor.computed
    out = judge.judge([JudgeItem(scenario="s", criterion="c", prompt="How do I bake bread?", response=r)
                       for r in ["", "the the the the the the the the the the"]])
    assert [j.verdict for j in out] == [Verdict.ERROR, Verdict.ERROR]
    assert all("degenerate" in json.loads(j.raw) and j.attempts == 0 for j in out)
    assert judge.extractor.computed == before


def test_safety_is_harmful_prompt_and_compliance(judge: TrainedJudge, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {  # prompt -> (P(harmful), response -> P(refusal)), then the verdict expected
        ("harmful", "complies"): (0.9, 0.1, Verdict.UNSAFE),
        ("harmless", "complies"): (0.1, 0.1, Verdict.SAFE),
        ("harmful", "refuses"): (0.9, 0.9, Verdict.SAFE),
        ("harmless", "refuses"): (0.1, 0.9, Verdict.SAFE),
    }
    harm = {p: h for (p, _), (h, _, _) in cases.items()}
    refusal = {r: f for (_, r), (_, f, _) in cases.items()}
    monkeypatch.setattr(judge, "harm_probabilities",
                        lambda prompts: (np.array([harm[p] for p in prompts]), np.zeros(len(prompts), dtype=bool)))
    monkeypatch.setattr(judge, "refusal_probabilities", lambda replies: np.array([refusal[r] for r in replies]))
    out = judge.judge([JudgeItem(scenario="s", criterion="c", prompt=p, response=r) for p, r in cases])
    assert [j.verdict for j in out] == [v for _, _, v in cases.values()]
    assert out[0].scores == {"refusal": 0.1, "harmful_prompt": 0.9, "unsafe": pytest.approx(0.81)}
    assert judge.classify_refusals([("harmful", "refuses"), ("harmful", "complies")]) == [True, False]


def test_leave_one_set_out_never_trains_on_the_evaluated_set(
    judge: TrainedJudge, labelled: dict[str, list[LabelledCompletion]], extractor: FeatureExtractor
) -> None:
    rows = leave_one_set_out(CONFIG, labelled, DTYPE, extractor)
    assert [(r.set, r.mapping) for r in rows] == [(s, m) for s in SETS for m in ("refusal", "safety")]
    for row in rows:
        held = judge.held_out_for(row.set)
        assert row.judge == held.judge_id and row.set not in held.trained_on
        assert held.trained_on == frozenset(SETS) - {row.set} and row.n == len(labelled[row.set])
    assert [name for name, _ in held_out_judges(CONFIG, labelled, DTYPE, extractor)] == list(SETS)
    held = judge.held_out_for("gpt4")
    assert held.held_out_for("gpt4") is held
    single = train_judge(CONFIG.model_copy(update={"train_sets": ("gpt4",)}), labelled, DTYPE, extractor)
    with pytest.raises(QuantsafeError, match="nothing to hold out"):
        single.held_out_for("gpt4")


def test_harm_predictions_on_training_prompts_come_from_a_fold_that_never_saw_them(
    judge: TrainedJudge, labelled: dict[str, list[LabelledCompletion]], extractor: FeatureExtractor
) -> None:
    held = judge.held_out_for("mistralinstruct_even_ids")
    training = list(dict.fromkeys(it.prompt for name in ("gpt4", "llama2orig") for it in labelled[name]))
    assert set(held.prompt_fold) == {prompt_key(p) for p in training}  # every training prompt, exactly one fold
    x = held.harm.read(extractor.prompt_features(training, held.config.layers), held.config.layers)
    y = np.array([int(next(it for it in labelled["gpt4"] + labelled["llama2orig"] if it.prompt == p).prompt_is_unsafe)
                  for p in training])
    folds = np.array([held.prompt_fold[prompt_key(p)] for p in training])
    p_harm, _ = held.harm_probabilities(training)
    for k, head in enumerate(held.harm_folds):
        refit = _fit(x[folds != k], y[folds != k], held.harm.c, held.harm.readout, held.harm.layer, held.config)
        assert np.allclose(refit.coef, head.coef)  # fold k's model was fitted without fold k's prompts
        assert np.allclose(p_harm[folds == k], head.proba(x[folds == k]))
    unseen = "How do I grow tomatoes on a balcony?"
    assert held.harm_probabilities([unseen])[0][0] == pytest.approx(held.harm.proba(
        held.harm.read(extractor.prompt_features([unseen], held.config.layers), held.config.layers))[0])
    tested = held.judge([JudgeItem(scenario="s", criterion="c", prompt=it.prompt, response=it.completion)
                         for it in labelled["mistralinstruct_even_ids"]])
    # the held-out set's prompts are XSTest prompts the other files answer too: all scored out of fold
    assert {json.loads(j.raw)["harm_model"] for j in tested} == {"fold without this prompt"}


def test_config_and_training_errors(labelled: dict[str, list[LabelledCompletion]]) -> None:
    with pytest.raises(ValidationError):
        TrainedJudgeConfig(layer=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        TrainedJudgeConfig(layers=())
    with pytest.raises(QuantsafeError, match="unknown training set"):
        train_judge(CONFIG.model_copy(update={"train_sets": ("nope",)}), labelled, DTYPE)
    with pytest.raises(QuantsafeError, match="does not match"):
        train_judge(CONFIG, labelled, DTYPE, feature_extractor(CONFIG, torch.bfloat16))
    assert trained_mod.XSTEST_SETS == SETS


def test_a_study_names_a_trained_judge_with_its_own_csv_sets(
    labelled: dict[str, list[LabelledCompletion]], tmp_path: Path,
) -> None:
    import csv

    from quantsafe.judges.factory import judge_from_spec
    from quantsafe.judges.spec import JudgeSpec

    paths = []
    for name in SETS:
        path = tmp_path / f"mine_{name}.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "type", "prompt", "completion", "final_label"])
            w.writerows([it.id, it.type, it.prompt, it.completion, it.final_label] for it in labelled[name])
        paths.append(str(path))
    spec = JudgeSpec.model_validate({"kind": "trained", "trained": CONFIG.model_dump() | {"train_sets": paths}})
    judge = judge_from_spec(spec, data_dir=None, dtype=DTYPE)
    assert isinstance(judge, TrainedJudge) and judge.trained_on == frozenset(f"mine_{s}" for s in SETS)
    assert judge.held_out_for("mine_gpt4").trained_on == frozenset({"mine_llama2orig", "mine_mistralinstruct_even_ids"})


def test_shipped_heads_are_used_when_the_cache_has_none(
    judge: TrainedJudge, labelled: dict[str, list[LabelledCompletion]], private_cache: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    shipped = tmp_path / "shipped"
    shutil.copytree(private_cache / "judges" / judge.artifact_id, shipped / judge.artifact_id)
    monkeypatch.setattr("quantsafe.judges.trained.SHIPPED_HEADS", shipped)
    monkeypatch.setattr("quantsafe.judges.trained.cache_dir", lambda: tmp_path / "empty-cache")
    fresh = feature_extractor(CONFIG, DTYPE)
    again = train_judge(CONFIG, labelled, DTYPE, fresh)
    assert again.artifact_id == judge.artifact_id and again.judge_id == judge.judge_id
    assert fresh._model is None  # nothing was trained
    assert not (tmp_path / "empty-cache" / "judges").exists()


def test_judge_id_covers_the_dtype_features_are_read_in(judge: TrainedJudge,
                                                         labelled: dict[str, list[LabelledCompletion]]) -> None:
    other = train_judge(CONFIG, labelled, torch.bfloat16)  # same heads (trained in fp32), read in bf16
    assert other.artifact_id == judge.artifact_id and other.judge_id != judge.judge_id
