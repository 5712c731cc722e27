"""The sequential pipeline, calibration and perplexity on tiny random Llama/Qwen2 models (fast, exact checks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from quantsafe.quantization import (
    CalibrationConfig,
    QuantConfig,
    build_calibration,
    make_quantizer,
    perplexity,
)
from quantsafe.quantization.base import LayerStats, Quantizer
from quantsafe.quantization.calibration import random_windows, token_sha256
from quantsafe.quantization.methods.rtn import rtn_quantize
from quantsafe.quantization.sequential import BlockContext, capture_block_inputs, quantize_decoder_blocks
from quantsafe.quantization.uniform import UniformLayer


class _Recording(Quantizer):
    """RTN that keeps the statistics it was given, to check what the pipeline accumulates."""

    name = "recording"
    needs_calibration = True
    stats = frozenset({"xtx"})

    def __init__(self, true_sequential: bool) -> None:
        super().__init__(QuantConfig(method="rtn", bits=8, group_size=None))
        self._true_sequential = true_sequential
        self.seen: list[LayerStats] = []

    @property
    def true_sequential(self) -> bool:
        return self._true_sequential

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> UniformLayer:
        assert stats is not None
        self.seen.append(stats)
        return rtn_quantize(weight, 8, None, False)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_groups_follow_shared_inputs(tiny_model: Callable[..., Any], kind: str) -> None:
    model = tiny_model(kind)
    batches = capture_block_inputs(model, torch.randint(0, 128, (2, 16)), batch_size=2)
    groups = BlockContext(model.model.layers[0], 0, batches).input_groups()
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("true_sequential", [False, True])
def test_block0_hessian_is_x_xt_of_the_normed_inputs(
    tiny_model: Callable[..., Any], kind: str, true_sequential: bool
) -> None:
    model = tiny_model(kind)
    tokens = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states[0]
        x = model.model.layers[0].input_layernorm(hidden).reshape(-1, 64).float()
    quantizer = _Recording(true_sequential)
    results = quantize_decoder_blocks(model, quantizer, tokens, batch_size=2)  # 3 mini-batches, last partial
    assert len(results) == 2 * 7
    q_stats = quantizer.seen[0]
    assert q_stats.n_tokens == 5 * 16
    torch.testing.assert_close(q_stats.xtx, x.T @ x, rtol=1e-4, atol=1e-3)
    assert quantizer.seen[1] is q_stats  # k_proj shares q_proj's input statistics


def test_true_sequential_sees_quantized_attention(tiny_model: Callable[..., Any]) -> None:
    """o_proj's inputs differ between the modes only because q/k/v were already quantized."""
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    seen = {}
    for mode in (False, True):
        quantizer = _Recording(mode)
        quantize_decoder_blocks(tiny_model("llama"), quantizer, tokens, batch_size=4)
        seen[mode] = quantizer.seen[3].xtx  # o_proj of block 0
    assert not torch.equal(seen[False], seen[True])
    torch.testing.assert_close(seen[False], seen[True], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_8bit_keeps_tiny_model_outputs(tiny_model: Callable[..., Any], kind: str, static_groups: bool) -> None:
    model = tiny_model(kind)
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(tokens).logits
    cfg = QuantConfig(
        method="gptq",
        bits=8,
        group_size=32,
        options={"static_groups": static_groups, "true_sequential": True},
        calibration={"n_samples": 4, "seq_len": 32},
    )
    results = quantize_decoder_blocks(model, make_quantizer(cfg), tokens, batch_size=2)
    assert all((r.g_idx is None) == static_groups for r in results.values())
    with torch.no_grad():
        after = model(tokens).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_random_windows_are_seeded() -> None:
    stream = torch.arange(1000)
    a = random_windows(stream, 8, 32, seed=0)
    assert a.shape == (8, 32) and torch.equal(a, random_windows(stream, 8, 32, seed=0))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 31, dtype=a.dtype))  # contiguous spans
    assert token_sha256(a) != token_sha256(random_windows(stream, 8, 32, seed=1))


def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from quantsafe.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m").path))


def test_wikitext2_and_text_file_calibration(data_dir: Path, tmp_path: Path) -> None:
    tok = _smollm2_tokenizer()
    cal = build_calibration(CalibrationConfig(n_samples=4, seq_len=64), tok, data_dir)
    assert cal.tokens.shape == (4, 64) and cal.source == "wikitext2" and cal.stream_tokens > 100_000
    assert cal.token_sha256 == token_sha256(cal.tokens)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    cal2 = build_calibration(CalibrationConfig(source="text_file", path=text, n_samples=2, seq_len=16), tok)
    assert cal2.tokens.shape == (2, 16) and "fox" in tok.decode(cal2.tokens[0]) + tok.decode(cal2.tokens[1])


def test_self_generated_calibration_samples_from_the_model(tiny_model: Callable[..., Any]) -> None:
    tok = _smollm2_tokenizer()
    model = tiny_model(vocab_size=len(tok), hidden_size=32)
    cfg = CalibrationConfig(source="self_generated", n_samples=3, seq_len=12, seed=5)
    cal = build_calibration(cfg, tok, model=model)
    assert cal.tokens.shape == (3, 12)
    assert torch.equal(cal.tokens, build_calibration(cfg, tok, model=model).tokens)  # seeded


def test_perplexity_of_a_uniform_model_is_the_vocab_size() -> None:
    vocab = 50

    def uniform(input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab, dtype=torch.bfloat16))

    result = perplexity(uniform, torch.randint(0, vocab, (1000,)), seq_len=100, max_windows=7)
    assert result.n_windows == 7 and result.n_tokens == 7 * 99
    assert result.ppl == pytest.approx(vocab, rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_captured_inputs_and_kwargs_reproduce_the_model(tiny_model: Callable[..., Any], kind: str) -> None:
    """Running the blocks one by one on the captured inputs and kwargs (causal mask, rotary) is exact."""
    model = tiny_model(kind)
    tokens = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True).hidden_states[-1]
        outputs = []
        for batch in capture_block_inputs(model, tokens, batch_size=2):
            hidden = batch.hidden
            for i, layer in enumerate(model.model.layers):
                hidden = layer(hidden, **batch.layer_kwargs[i])
            outputs.append(model.model.norm(hidden))
    torch.testing.assert_close(torch.cat(outputs), expected)
