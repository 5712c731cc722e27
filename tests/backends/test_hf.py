"""The HF backend on a real small instruct model (SmolLM2-135M, shipped by a PyPI package)."""

import pytest
import torch

from quantsafe.backends import DecodingConfig
from quantsafe.backends.hf import HFBackend
from quantsafe.models import load_model, resolve_model


@pytest.fixture(scope="module")
def backend() -> HFBackend:
    model, tok = load_model(resolve_model("smollm2-135m"))
    return HFBackend(model, tok, "smollm2")


CONVS = [[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
         [{"role": "user", "content": "Say hello."}],
         [{"role": "user", "content": "Write a very long story about a dragon who learns to fly over the sea."}]]


def test_batched_greedy_keeps_order_and_matches_single(backend: HFBackend) -> None:
    dec = DecodingConfig(max_new_tokens=12, batch_size=3)
    batched = backend.generate(CONVS, dec)
    single = [backend.generate([c], dec.model_copy(update={"batch_size": 1}))[0] for c in CONVS]
    assert "Paris" in batched[0].text
    assert sum(a.text == b.text for a, b in zip(batched, single, strict=True)) >= 2
    assert all(g.n_new_tokens <= 12 for g in batched)
    assert batched[2].finished is False and batched[2].n_new_tokens == 12  # the story cannot end in 12 tokens
    assert backend.tokenizer.padding_side == "left"


def test_next_token_logprobs_are_log_probabilities(backend: HFBackend) -> None:
    out = backend.next_token_logprobs(CONVS[:2], ["Yes", "No"], prefill="Answer:")
    assert len(out) == 2 and all(set(d) == {"Yes", "No"} for d in out)
    assert all(v < 0 for d in out for v in d.values())
    with pytest.raises(ValueError, match="share a first token"):
        backend.candidate_token_ids(["Yes", "Yes"])


def test_shared_prefix_is_encoded_once_without_changing_scores() -> None:
    """Few-shot turns shared by every item go through the model once; scores must equal item-by-item ones
    (in fp32: in bf16 the different batch shapes alone move log-probs by ~0.3)."""
    model, tok = load_model(resolve_model("smollm2-135m"), dtype=torch.float32)
    backend = HFBackend(model, tok, "smollm2-fp32")
    shots = [{"role": "user", "content": "Is this an example? " * 12}, {"role": "assistant", "content": "Answer: yes"}]
    convs = [[*shots, *c] for c in CONVS]
    together = backend.next_token_logprobs(convs, ["Yes", "No"], prefill="Answer:", batch_size=2)
    alone = [backend.next_token_logprobs([c], ["Yes", "No"], prefill="Answer:")[0] for c in convs]
    for a, b in zip(together, alone, strict=True):
        assert all(abs(a[k] - b[k]) < 1e-3 for k in a)
