"""AWQ on tiny random models: storage, scale folding, the α search, the clip search, quality vs RTN, artifacts.

Random init gives every input channel about the same magnitude, where activation-aware scales have nothing to
find; `_salient` makes a few channels 20x larger (the massive-activation channels of real LMs) by scaling the
norm weights, so the searches face the situation AWQ is for.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantsafe.errors import QuantsafeError
from quantsafe.models import ResolvedModel, load_model, resolve_model
from quantsafe.quantization import QuantConfig, load_quantized, make_quantizer, quantize_variant
from quantsafe.quantization.calibration import build_calibration
from quantsafe.quantization.methods.awq import (
    AWQQuantizer,
    awq_scale_sets,
    capture_calls,
    fold_scales,
    search_clip,
    search_scales,
    summarize_inputs,
)
from quantsafe.quantization.methods.rtn import rtn_quantize
from quantsafe.quantization.sequential import BlockContext, capture_block_inputs, quantize_decoder_blocks

TOKENS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _awq(bits: int = 4, group_size: int | None = 32, **options: Any) -> AWQQuantizer:
    quantizer = make_quantizer(QuantConfig(method="awq", bits=bits, group_size=group_size, options=options))
    assert isinstance(quantizer, AWQQuantizer)
    return quantizer


def _salient(model: Any) -> Any:
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:4] *= 20
    return model


def _context(model: Any, index: int = 0) -> BlockContext:
    return BlockContext(model.model.layers[index], index, capture_block_inputs(model, TOKENS, batch_size=4))


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(2, 32, False), (3, 48, False), (4, 32, True),
                                                         (8, None, False)])
def test_storage_round_trips_bit_exactly(tiny_model: Callable[..., Any], round_trip: Callable[[Any], Any],
                                         bits: int, group_size: int | None, sym: bool) -> None:
    """48 does not divide the 64/128-wide inputs: the last group is partial, as in rtn_quantize."""
    cfg = QuantConfig(method="awq", bits=bits, group_size=group_size, sym=sym,
                      options={"n_grid": 4, "n_clip_grid": 4, "clip": bits < 4})
    model = tiny_model()
    results = quantize_decoder_blocks(model, make_quantizer(cfg), TOKENS, batch_size=4)
    assert len(results) == 2 * 7
    for name, layer in results.items():
        assert layer.meta() == {"bits": bits, "group_size": group_size, "sym": sym, "g_idx": False}
        assert torch.equal(model.get_submodule(name).weight, layer.dequantize())
    round_trip(results["model.layers.1.mlp.down_proj"])
    round_trip(results["model.layers.0.self_attn.q_proj"])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_folding_preserves_the_full_precision_block(tiny_model: Callable[..., Any], kind: str,
                                                    kv_heads: int) -> None:
    """Arbitrary positive scales on every set (v→o included without GQA; Qwen2's q/k/v biases) leave the
    block output unchanged up to float rounding, while the weights did change."""
    model = tiny_model(kind, num_key_value_heads=kv_heads)
    block = model.model.layers[0]
    ctx = _context(model)
    before = ctx.forward()
    weights = {n: m.weight.detach().float().clone() for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    gen = torch.Generator().manual_seed(3)
    for sset in awq_scale_sets(block, 0):
        cols = weights[sset.linears[0]].shape[1]
        fold_scales(block, sset, torch.exp(torch.randn(cols, generator=gen)), weights)
    assert not torch.allclose(block.input_layernorm.weight, torch.ones(64))
    for a, b in zip(ctx.forward(), before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gqa_skips_the_v_to_o_set(tiny_model: Callable[..., Any]) -> None:
    gqa = awq_scale_sets(tiny_model(num_key_value_heads=2).model.layers[0], 0)
    mha = awq_scale_sets(tiny_model(num_key_value_heads=4).model.layers[0], 0)
    assert [s.name for s in gqa] == ["qkv", "gate_up", "down"]
    assert [s.name for s in mha] == ["qkv", "o", "gate_up", "down"]
    assert mha[1].prev == "self_attn.v_proj" and mha[1].inspect == "self_attn.o_proj"


def test_unsupported_block_layout_is_a_clear_error(tiny_model: Callable[..., Any]) -> None:
    with pytest.raises(QuantsafeError, match=r"AWQ: decoder block 3 \(Sequential"):
        awq_scale_sets(torch.nn.Sequential(torch.nn.Linear(4, 4)), 3)
    block = tiny_model().model.layers[0]
    block.mlp.extra = torch.nn.Linear(4, 4)
    with pytest.raises(QuantsafeError, match=r"decoder block 0 \(LlamaDecoderLayer.*mlp\.extra"):
        awq_scale_sets(block, 0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_chosen_scales_beat_plain_quantization(tiny_model: Callable[..., Any], kind: str) -> None:
    """Recomputed outside the search: the set's module output error with the chosen scales is never above the
    error of plain quantization (α = 0), and on salient channels strictly below it for the input sets."""
    model = _salient(tiny_model(kind, num_key_value_heads=4))
    block, ctx, quantizer = model.model.layers[0], _context(model), _awq(3)
    sets = awq_scale_sets(block, 0)
    calls = capture_calls(ctx, sorted({s.inspect for s in sets} | {s.linears[0] for s in sets}))
    for sset in sets:
        module = block.get_submodule(sset.inspect)
        with torch.no_grad():
            reference = [module(*a, **k) for a, k in calls[sset.inspect]]
        reference = [r[0] if isinstance(r, tuple) else r for r in reference]
        x_mean = summarize_inputs(calls[sset.linears[0]], 16).abs_mean
        found = search_scales(block, sset, x_mean, calls[sset.inspect], reference, quantizer.pseudo_quantize, 20)

        def error(scales: torch.Tensor, sset: Any = sset, module: Any = module, reference: Any = reference) -> float:
            originals = {n: block.get_submodule(n).weight.detach().clone() for n in sset.linears}
            for n, w in originals.items():
                q = rtn_quantize(w * scales, 3, 32, False).dequantize() / scales
                block.get_submodule(n).weight.data = q
            with torch.no_grad():
                outs = [module(*a, **k) for a, k in calls[sset.inspect]]
            for n, w in originals.items():
                block.get_submodule(n).weight.data = w
            outs = [o[0] if isinstance(o, tuple) else o for o in outs]
            return sum(float((o - r).pow(2).sum()) for o, r in zip(outs, reference, strict=True)) / sum(
                r.numel() for r in reference)

        plain = error(torch.ones_like(x_mean))
        chosen = error(found.scales)
        assert found.losses[0] == pytest.approx(plain, rel=1e-6)
        assert found.loss == pytest.approx(chosen, rel=1e-6)
        assert chosen <= plain
        if sset.name in ("qkv", "gate_up"):
            assert found.alpha > 0 and chosen < 0.8 * plain, sset.name
        assert found.scales.min() > 0 and (found.scales.max() * found.scales.min()).item() == pytest.approx(1.0)


def _group_dot_error(w: torch.Tensor, x: torch.Tensor, q: torch.Tensor, g: int) -> torch.Tensor:
    """Mean squared error of every (row, group) partial dot product over the tokens [rows, groups]."""
    rows, cols = w.shape
    d = ((w - q)[:, None, :] * x[None]).reshape(rows, x.shape[0], cols // g, g).sum(-1)
    return d.pow(2).mean(dim=1)


def test_clip_search_never_increases_any_group_error() -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(24, 96, generator=gen)
    w[:, 7] *= 8  # an outlier weight per row: clipping it is worth it for some groups
    x = torch.randn(300, 96, generator=gen)

    def pq(t: torch.Tensor) -> torch.Tensor:
        return rtn_quantize(t, 3, None, False).dequantize()

    clipped = search_clip(w, x, 32, pq, _awq(3).options)
    assert clipped.shape == w.shape and torch.all(clipped.abs() <= w.abs())
    before = _group_dot_error(w, x, rtn_quantize(w, 3, 32, False).dequantize(), 32)
    after = _group_dot_error(w, x, rtn_quantize(clipped, 3, 32, False).dequantize(), 32)
    assert torch.all(after <= before * (1 + 1e-5))
    assert (after < 0.95 * before).any()  # the search did clip somewhere
    # shrink stops above (1 − max_shrink): no group is clipped below 55% of its max |w|
    ratio = clipped.reshape(24, 3, 32).abs().amax(-1) / w.reshape(24, 3, 32).abs().amax(-1)
    assert ratio.min() >= 0.55 - 1e-6


def test_clip_search_handles_a_partial_last_group() -> None:
    gen = torch.Generator().manual_seed(6)
    w, x = torch.randn(8, 80, generator=gen), torch.randn(50, 80, generator=gen)
    clipped = search_clip(w, x, 32, lambda t: rtn_quantize(t, 2, None, False).dequantize(), _awq(2).options)
    assert clipped.shape == (8, 80) and torch.all(clipped.abs() <= w.abs())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_awq_4bit_block_error_below_rtn(tiny_model: Callable[..., Any], kind: str) -> None:
    """The first block's output on full-precision inputs, AWQ vs RTN at 4 bits g32 (measured ratio ≈ 0.5)."""
    fp = _salient(tiny_model(kind))
    batch = capture_block_inputs(fp, TOKENS, batch_size=8)[0]

    def block_error(method: str) -> float:
        model = _salient(tiny_model(kind))
        quantize_decoder_blocks(model, make_quantizer(QuantConfig(method=method, bits=4, group_size=32)), TOKENS, 4)
        with torch.no_grad():
            ref = fp.model.layers[0](batch.hidden, **batch.layer_kwargs[0])
            out = model.model.layers[0](batch.hidden, **batch.layer_kwargs[0])
        return float((out - ref).pow(2).mean())

    assert block_error("awq") < 0.7 * block_error("rtn")


def test_8bit_awq_keeps_logits_close(tiny_model: Callable[..., Any]) -> None:
    fp, model = _salient(tiny_model("qwen2")), _salient(tiny_model("qwen2"))
    quantize_decoder_blocks(model, _awq(8, n_grid=5), TOKENS, batch_size=4)
    with torch.no_grad():
        a, b = fp(TOKENS).logits, model(TOKENS).logits
    assert not torch.equal(a, b)
    assert float((a - b).pow(2).mean() / a.pow(2).mean()) < 1e-3
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999


def test_options_are_validated_and_defaulted() -> None:
    cfg = QuantConfig(method="awq", bits=4)
    assert cfg.options == {"n_grid": 20, "clip": True, "max_shrink": 0.5, "n_clip_grid": 20, "n_clip_tokens": 512}
    assert cfg.group_size == 128 and not cfg.sym and cfg.calibration is not None
    with pytest.raises(ValueError, match="options of method 'awq'"):
        QuantConfig(method="awq", bits=4, options={"alpha": 0.5})
    assert _awq(4).inputs_from == "fp"


AWQ8 = QuantConfig(method="awq", bits=8, group_size=32,
                   calibration={"source": "wikitext2", "n_samples": 4, "seq_len": 32})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ResolvedModel:
    """A tiny random Llama with SmolLM2's tokenizer, salient channels in its norms (test_artifact.py's pattern)."""
    smollm2 = resolve_model("smollm2-135m").path
    out = tmp_path_factory.mktemp("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2 / name, out / name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    _salient(LlamaForCausalLM(config)).to(torch.bfloat16).save_pretrained(out)
    return ResolvedModel(name="tiny", path=out, source=str(out), source_sha256="0" * 64, dequantized_gguf=False)


def test_artifact_reloads_with_folded_norms(tiny: ResolvedModel, data_dir: Path, tmp_path: Path) -> None:
    """The artifact holds the folded norms and the scaled quantized weights: reloading gives exactly the model
    the quantizer left in memory, whose norms differ from the base model's."""
    artifact = quantize_variant(tiny, AWQ8, data_dir, tmp_path)
    assert artifact.config.options["n_grid"] == 20 and artifact.bits_per_weight == pytest.approx(8 + 24 / 32)
    model, tok = load_model(tiny)
    base_norm = model.model.layers[0].input_layernorm.weight.clone()
    calibration = build_calibration(AWQ8.calibration, tok, data_dir)  # type: ignore[arg-type]
    make_quantizer(AWQ8).quantize_model(model, calibration.tokens)
    loaded, _ = load_quantized(artifact.path)
    assert not torch.equal(loaded.model.layers[0].input_layernorm.weight, base_norm)
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
