"""The HF backend on a real small instruct model (SmolLM2-135M, shipped by a PyPI package)."""

import logging
from typing import Any

import pytest
import torch

from quantsafe.backends import DecodingConfig
from quantsafe.backends.hf import HFBackend, _common_prefix, _pick
from quantsafe.errors import QuantsafeError
from quantsafe.models import load_model, resolve_model


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    model, tok = load_model(resolve_model("smollm2-135m"))
    return HFBackend(model, tok, "smollm2")


@pytest.fixture(scope="module")
def fp32() -> HFBackend:
    """fp32 for exact comparisons: in bf16 different batch shapes alone move log-probs by ~0.3."""
    model, tok = load_model(resolve_model("smollm2-135m"), dtype=torch.float32)
    return HFBackend(model, tok, "smollm2-fp32")


class Recorder:
    """Stands in for the model, recording every forward call's input shape (rows, width with any cached prefix)
    and its logits' shape, and the input ids' shape of every masked call that encodes prompts (more than one token
    each; a shared prefix is encoded apart, unmasked)."""

    def __init__(self, model: Any):
        self.inner = model
        self.forwards: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.prefills: list[tuple[int, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, **kwargs: Any) -> Any:
        out = self.inner(**kwargs)
        rows_width = kwargs.get("attention_mask", kwargs["input_ids"]).shape
        self.forwards.append((tuple(rows_width), tuple(out.logits.shape)))
        if "attention_mask" in kwargs and kwargs["input_ids"].shape[1] > 1:
            self.prefills.append(tuple(kwargs["input_ids"].shape))
        return out


CONVS = [[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
         [{"role": "user", "content": "Say hello."}],
         [{"role": "user", "content": "Write a very long story about a dragon who learns to fly over the sea."}]]
LONG = [{"role": "user", "content": "Start of the request. " + "Lots of filler text here. " * 80}]
# " Y" is one token; " Yep", " Yup" and " Yesss" start with it (" Y"+"ep", " Y"+"up", " Y"+"ess"+"s")
SPLIT_LABELS = [" Y", " Yep", " Yup", " Yesss", "No"]


def test_batched_greedy_keeps_order_and_matches_single(backend: HFBackend) -> None:
    dec = DecodingConfig(max_new_tokens=12, batch_size=3)
    batched = backend.generate(CONVS, dec)
    single = [backend.generate([c], dec.model_copy(update={"batch_size": 1}))[0] for c in CONVS]
    assert "Paris" in batched[0].text
    assert sum(a.text == b.text for a, b in zip(batched, single, strict=True)) >= 2
    assert all(g.n_new_tokens <= 12 for g in batched)
    assert batched[2].finished is False and batched[2].n_new_tokens == 12  # the story cannot end in 12 tokens
    assert not any(g.truncated for g in batched)
    assert backend.tokenizer.padding_side == "left"


def test_truncation_cuts_the_last_user_message_and_keeps_the_template(backend: HFBackend) -> None:
    conv = [{"role": "user", "content": "Earlier turn."}, {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "Start of the request. " + "x y " * 50_000}]  # ~100k characters
    ids, cut = backend.encode(conv, "Be brief.", "", limit=60)
    text = backend.tokenizer.decode(ids)
    assert cut and 50 <= len(ids) <= 60
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nEarlier turn.<|im_end|>")
    assert "<|im_start|>user\nStart of the request. x y" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert backend.encode(conv[:1], "Be brief.", "", limit=60)[1] is False
    with pytest.raises(QuantsafeError, match="emptied"):
        backend.encode(conv, "A system prompt that alone is longer than the limit. " * 3, "", limit=20)


def test_generate_fits_prompts_to_the_context_and_max_prompt_tokens(
    backend: HFBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backend.model.config, "max_position_embeddings", 96)
    gens = backend.generate([LONG, CONVS[1]], DecodingConfig(max_new_tokens=8, batch_size=2))
    assert gens[0].truncated and gens[0].n_prompt_tokens <= 96 - 8
    assert not gens[1].truncated and gens[1].n_prompt_tokens < 40
    capped = backend.generate([LONG], DecodingConfig(max_new_tokens=2, max_prompt_tokens=40))[0]
    assert capped.truncated and capped.n_prompt_tokens <= 40


def test_batches_respect_the_token_budget_and_input_order(backend: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    dec = DecodingConfig(max_new_tokens=4, batch_size=3)
    lengths = [len(backend.encode(c)[0]) for c in CONVS]
    longest, second = sorted(lengths, reverse=True)[:2]
    assert longest > second  # the budget below splits off the longest item only
    rec = Recorder(backend.model)
    monkeypatch.setattr(backend, "model", rec)
    shared = len(_common_prefix([backend.encode(c)[0] for c in CONVS]))
    assert shared > 0  # the system turn SmolLM2's template adds to every prompt
    budget = 2 * (longest + 4) - 1
    backend.generate(CONVS, dec.model_copy(update={"max_batch_tokens": budget}))
    assert rec.prefills == [(1, longest - shared), (2, second - shared)]
    one_by_one = backend.generate(CONVS, dec.model_copy(update={"max_batch_tokens": 1}))
    assert rec.prefills[2:] == [(1, n - shared) for n in sorted(lengths, reverse=True)]
    single = [backend.generate([c], dec.model_copy(update={"batch_size": 1}))[0] for c in CONVS]
    assert [g.text for g in one_by_one] == [g.text for g in single]


def test_next_token_logprobs_are_log_probabilities(backend: HFBackend) -> None:
    out = backend.next_token_logprobs(CONVS[:2], ["Yes", "No"], prefill="Answer:")
    assert len(out) == 2 and all(list(d) == ["Yes", "No"] for d in out)
    assert all(v < 0 for d in out for v in d.values())
    with pytest.raises(ValueError, match="distinct token sequences"):
        backend.candidate_tokens(["Yes", "Yes"])
    with pytest.raises(ValueError, match="non-empty"):
        backend.candidate_tokens([])


def test_logits_are_computed_only_where_read(backend: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(backend.model)
    monkeypatch.setattr(backend, "model", rec)
    backend.next_token_logprobs(CONVS, ["Yes", "No"], prefill="Answer:", batch_size=2)
    assert rec.forwards and all(logits[1] == 1 for _, logits in rec.forwards)
    rec.forwards.clear()
    backend.next_token_logprobs(CONVS[:1], SPLIT_LABELS, prefill="Answer:")
    assert rec.forwards[-1][1][1] == 3  # " Yesss" reads 3 positions; rows reading fewer repeat their last
    assert all(logits[1] <= 3 for _, logits in rec.forwards)


@torch.no_grad()
def test_multi_token_candidates_score_their_whole_sequence(fp32: HFBackend) -> None:
    """Candidates sharing a first token are told apart by the rest of their tokens."""
    out = fp32.next_token_logprobs(CONVS[:2], SPLIT_LABELS, prefill="Answer:", batch_size=3)
    for conv, got in zip(CONVS[:2], out, strict=True):
        ids = fp32.encode(conv, None, "Answer:")[0]
        for label in SPLIT_LABELS:
            toks = fp32.candidate_tokens([label])[0]
            logits = fp32.model(input_ids=torch.tensor([ids + toks])).logits[0, len(ids) - 1 : -1]
            expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(toks)), toks].sum()
            assert got[label] == pytest.approx(float(expected), abs=1e-3)
    assert len({round(v, 3) for v in out[0].values()}) == len(SPLIT_LABELS)


def test_logprob_batches_respect_the_token_budget(fp32: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    free = fp32.next_token_logprobs(CONVS, SPLIT_LABELS, prefill="Answer:", batch_size=16)
    rec = Recorder(fp32.model)
    monkeypatch.setattr(fp32, "model", rec)
    budget = 80
    capped = fp32.next_token_logprobs(CONVS, SPLIT_LABELS, prefill="Answer:", batch_size=16, max_batch_tokens=budget)
    assert len(rec.forwards) > 1
    assert all(rows == 1 or rows * width <= budget for (rows, width), _ in rec.forwards)
    for a, b in zip(free, capped, strict=True):
        assert all(abs(a[k] - b[k]) < 1e-3 for k in a)


def test_next_token_logprobs_cut_inputs_to_the_context(
    backend: HFBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(backend.model.config, "max_position_embeddings", 64)
    rec = Recorder(backend.model)
    monkeypatch.setattr(backend, "model", rec)
    with caplog.at_level(logging.WARNING, logger="quantsafe.backends"):
        out = backend.next_token_logprobs([LONG, CONVS[1]], SPLIT_LABELS, prefill="Answer:")
    assert "1 of 2 inputs" in caplog.text
    assert all(width <= 64 for (_, width), _ in rec.forwards) and all(v < 0 for v in out[0].values())


def test_shared_prefix_is_encoded_once_without_changing_scores(fp32: HFBackend) -> None:
    """Few-shot turns shared by every item go through the model once; scores must equal item-by-item ones."""
    shots = [{"role": "user", "content": "Is this an example? " * 12}, {"role": "assistant", "content": "Answer: yes"}]
    convs = [[*shots, *c] for c in CONVS]
    labels = ["Yes", "No", " Yep", " Yup"]
    together = fp32.next_token_logprobs(convs, labels, prefill="Answer:", batch_size=2)
    alone = [fp32.next_token_logprobs([c], labels, prefill="Answer:", batch_size=1)[0] for c in convs]
    for a, b in zip(together, alone, strict=True):
        assert all(abs(a[k] - b[k]) < 1e-3 for k in a)


def test_earlier_turns_are_encoded_once_per_backend_and_scores_never_depend_on_company() -> None:
    """bf16, batch size 1: a conversation scores bit-identically alone or beside others, cache cold or warm,
    because the shared part always ends where the last message starts; the few-shot turns run once."""
    model, tok = load_model(resolve_model("smollm2-135m"))
    backend = HFBackend(model, tok, "smollm2-bf16")
    shots = [{"role": "user", "content": "Is this an example? " * 12}, {"role": "assistant", "content": "Answer: yes"}]
    convs = [[*shots, *c] for c in CONVS]
    lengths: list[int] = []
    forward = model.forward

    def counting(*args: object, **kwargs: object) -> object:
        lengths.append(int(kwargs["input_ids"].shape[1]))  # type: ignore[attr-defined]
        return forward(*args, **kwargs)

    model.forward = counting
    try:
        alone_cold = backend.next_token_logprobs(convs[:1], ["Yes", "No"], prefill="Answer:", batch_size=1)[0]
        prefix_runs = sum(n > 40 for n in lengths)  # the shots are ~60 tokens, each item's own part far fewer
        together = backend.next_token_logprobs(convs, ["Yes", "No"], prefill="Answer:", batch_size=1)
        alone_warm = backend.next_token_logprobs(convs[:1], ["Yes", "No"], prefill="Answer:", batch_size=1)[0]
    finally:
        del model.forward
    assert prefix_runs == 1 and sum(n > 40 for n in lengths) == 1  # encoded on the first call only
    assert alone_cold == together[0] == alone_warm


def test_shared_context_inside_one_message_is_encoded_once_per_distinct_text(fp32: HFBackend) -> None:
    """Few-shot examples inside the user turn (SafetyBench's template): one KV cache per distinct context,
    scores equal to encoding every item whole."""
    contexts = ["Examples follow.\n\n" + "Question: is water wet?\nAnswer: A\n\n" * 6,
                "Other examples.\n\n" + "Question: is fire cold?\nAnswer: B\n\n" * 6]
    asks = ["Question: is the sky blue?\nOptions: A. yes B. no", "Question: is ice hot?\nOptions: A. yes B. no"]
    convs = [[{"role": "user", "content": c + a}] for c in contexts for a in asks]
    lengths: list[int] = []
    model = fp32.model
    forward = model.forward

    def counting(*args: object, **kwargs: object) -> object:
        lengths.append(int(kwargs["input_ids"].shape[1]))  # type: ignore[attr-defined]
        return forward(*args, **kwargs)

    fp32._prefixes.clear()
    model.forward = counting
    try:
        shared = fp32.next_token_logprobs(convs, [" A", " B"], prefill="Answer:", batch_size=4,
                                          shared_chars=[len(c) for c in contexts for _ in asks])
    finally:
        del model.forward
    whole = fp32.next_token_logprobs(convs, [" A", " B"], prefill="Answer:", batch_size=4)
    assert sum(n > 60 for n in lengths) == 2  # each context once; every item's own part is short
    assert fp32._shared_len(convs[0], fp32.encode(convs[0], None, "Answer:")[0], "Answer:", 3) == 0  # mid-token
    for a, b in zip(shared, whole, strict=True):
        assert all(abs(a[k] - b[k]) < 1e-3 for k in a)


def test_rows_join_as_others_finish_and_answers_match_one_by_one(fp32: HFBackend,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous batching pads, merges and trims KV caches; in fp32 none of it may change a greedy answer."""
    convs = [*CONVS, [{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Count to 3."}]]
    dec = DecodingConfig(max_new_tokens=10, batch_size=2)
    rec = Recorder(fp32.model)
    monkeypatch.setattr(fp32, "model", rec)
    done: list[int] = []
    together = fp32.generate(convs, dec, on_batch=done.append)
    assert len(rec.prefills) >= 3 and all(rows <= 2 for rows, _ in rec.prefills)
    assert any(rows == 1 for rows, _ in rec.prefills[1:])  # a row joined the one still decoding
    assert all(rows <= 2 for (rows, _), _ in rec.forwards) and sum(done) == len(convs)
    alone = [fp32.generate([c], dec.model_copy(update={"batch_size": 1}))[0] for c in convs]
    assert [g.model_dump() for g in together] == [g.model_dump() for g in alone]


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy(backend: HFBackend) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = _pick(logits, DecodingConfig())
    assert torch.equal(_pick(logits, DecodingConfig(temperature=1.5, top_p=1e-6)), greedy)
    dec = DecodingConfig(max_new_tokens=8, temperature=1.0, seed=3, batch_size=3)
    first, again = backend.generate(CONVS, dec), backend.generate(CONVS, dec)
    assert [g.text for g in first] == [g.text for g in again]
    draws = {tuple(_pick(logits, DecodingConfig(temperature=5.0)).tolist()) for _ in range(5)}
    assert len(draws) > 1  # a hot distribution is really sampled


def test_a_sliding_window_cache_decodes_batch_after_batch(backend: HFBackend) -> None:
    """Sliding-window layers keep only their window, so rows cannot join a live cache; answers still match."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=len(backend.tokenizer), use_sliding_window=True,
                         sliding_window=16, max_window_layers=0)
    tiny = HFBackend(Qwen2ForCausalLM(config).eval(), backend.tokenizer, "tiny-sliding")
    convs = [*CONVS, [{"role": "user", "content": "Name a colour."}], LONG]
    dec = DecodingConfig(max_new_tokens=6, batch_size=2)
    rec = Recorder(tiny.model)
    tiny.model = rec
    together = tiny.generate(convs, dec)
    assert all(rows <= 2 for (rows, _), _ in rec.forwards)
    alone = [tiny.generate([c], dec.model_copy(update={"batch_size": 1}))[0] for c in convs]
    assert [g.text for g in together] == [g.text for g in alone]
