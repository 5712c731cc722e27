"""QLoRA: frozen NF-k base, peft adapters trained on a tiny model, base + scaled B·A storage, artifact round
trip, options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from quantsafe.errors import QuantsafeError
from quantsafe.models import ResolvedModel
from quantsafe.quantization import QuantConfig, load_quantized, make_quantizer, quantize_variant
from quantsafe.quantization.methods.qlora import QLoRALayer, QLoRAQuantizer
from quantsafe.quantization.normalfloat import NFLayer, nf_quantize


def _qlora(bits: int = 4, **options: Any) -> QLoRAQuantizer:
    quantizer = make_quantizer(QuantConfig(method="qlora", bits=bits, group_size=32, options=options))
    assert isinstance(quantizer, QLoRAQuantizer)
    return quantizer


def _tokens(n: int = 16, seq: int = 32) -> torch.Tensor:
    base = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    return base.repeat(n // 4, seq // 8)


def _layer(rows: int, cols: int, bits: int, r: int, double_quant: bool = True) -> QLoRALayer:
    gen = torch.Generator().manual_seed(bits)
    base = nf_quantize(torch.randn(rows, cols, generator=gen) * 0.02, bits, 64, double_quant)
    a = (torch.randn(r, cols, generator=gen) * 0.1).bfloat16()
    b = (torch.randn(rows, r, generator=gen) * 0.01).bfloat16()
    return QLoRALayer(base=base, lora_a=a, lora_b=b, alpha=16.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_training_keeps_the_base_and_trains_the_adapters(tiny_model: Callable[..., Any], bits: int) -> None:
    model = tiny_model()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("_proj")}
    quantizer = _qlora(bits, steps=6, lr=1e-2, r=4, alpha=8, batch_size=4, window=None)
    results = quantizer.quantize_model(model, _tokens())
    assert quantizer.report is not None and quantizer.report.losses[-1] < 0.95 * quantizer.report.losses[0]
    assert len(results) == 14
    for name, layer in results.items():
        assert isinstance(layer, QLoRALayer) and layer.rank == 4
        untrained = nf_quantize(original[name], bits, 32, double_quant=True)
        assert torch.equal(layer.base.codes, untrained.codes)  # the k-bit base is exactly the frozen one
        assert layer.base.dq is not None and untrained.dq is not None
        assert torch.equal(layer.base.dq.codes, untrained.dq.codes)
        assert layer.lora_b.abs().max() > 0  # B starts at 0: it trained
        expected = layer.base.dequantize() + 2.0 * (layer.lora_b.float() @ layer.lora_a.float())
        assert torch.equal(layer.dequantize(), expected)
        linear = model.get_submodule(name)
        assert type(linear) is torch.nn.Linear and torch.equal(linear.weight, layer.dequantize())
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_high_bits_stay_close_to_full_precision(tiny_model: Callable[..., Any]) -> None:
    model, reference = tiny_model(), tiny_model()
    ids = _tokens()[:2]
    _qlora(8, steps=2, batch_size=4, window=16).quantize_model(model, _tokens())
    with torch.no_grad():
        out, ref = model(ids).logits, reference(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("double_quant", [False, True])
def test_storage_round_trip(bits: int, double_quant: bool, round_trip: Callable[[Any], Any]) -> None:
    layer = _layer(24, 128, bits, 4, double_quant)
    again = round_trip(layer)
    assert torch.equal(again.lora_a, layer.lora_a) and torch.equal(again.lora_b, layer.lora_b)
    assert torch.equal(again.base.codes, layer.base.codes) and again.alpha == layer.alpha


def test_bits_count_base_and_adapters_apart() -> None:
    """algorithms.md §8 on 896×896: NF4+DQ 4.127 bits per weight, r = 64 bf16 adapters another 2.286."""
    layer = _layer(896, 896, 4, 64)
    n = 896 * 896
    meta = layer.meta()
    assert meta["base_bits"] / n == pytest.approx(4.127, abs=5e-4)
    assert meta["adapter_bits"] / n == pytest.approx(2.286, abs=5e-4)
    assert layer.storage_bits() == meta["base_bits"] + meta["adapter_bits"]
    assert _layer(896, 896, 2, 16).meta()["adapter_bits"] / n == pytest.approx(0.571, abs=5e-4)


def test_quantize_alone_is_the_nf_base() -> None:
    w = torch.randn(8, 64)
    layer = _qlora(3).quantize(w, None, "self_attn.q_proj")
    assert isinstance(layer, NFLayer) and layer.bits == 3 and layer.block_size == 32


def test_options_recorded_and_bad_options_fail(tiny_model: Callable[..., Any]) -> None:
    config = QuantConfig(method="qlora", bits=2)
    assert config.group_size == 64
    assert config.options == {"steps": 32, "batch_size": 2, "grad_accum": 1, "window": 256, "lr": 2e-4,
                              "schedule": "constant", "warmup_ratio": 0.03, "max_grad_norm": 0.3, "r": 16,
                              "alpha": 16, "dropout": 0.1, "double_quant": True}
    with pytest.raises(QuantsafeError, match="group_size"):
        make_quantizer(QuantConfig(method="qlora", bits=4, group_size=None))
    for bad in ({"r": 0}, {"dropout": 1.0}, {"alpha": -1}, {"max_grad_norm": 0}, {"rank": 8}):
        with pytest.raises(ValueError, match="options of method 'qlora'"):
            QuantConfig(method="qlora", bits=4, options=bad)
    with pytest.raises(QuantsafeError, match="calibration windows"):
        _qlora(4).quantize_model(tiny_model(), None)


def test_artifact_round_trip(tmp_path: Path) -> None:
    """quantize_variant → load_quantized on a tiny Llama with SmolLM2's tokenizer and a plain-text file."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from quantsafe.models import resolve_model

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(resolve_model("smollm2-135m").path / name, model_dir / name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    resolved = ResolvedModel(name="tiny", path=model_dir, source=str(model_dir), source_sha256="0" * 64,
                             dequantized_gguf=False)
    text = tmp_path / "chat.txt"
    text.write_text("User: how do I bake bread?\nAssistant: Mix flour, water, yeast and salt.\n" * 40)
    qconfig = QuantConfig(method="qlora", bits=3, group_size=64, options={"steps": 2, "window": 16},
                          calibration={"source": "text_file", "path": str(text), "n_samples": 4, "seq_len": 32})
    artifact = quantize_variant(resolved, qconfig, None, tmp_path / "out")
    record = artifact.layers["model.layers.0.mlp.down_proj"]
    assert record.format == "qlora" and record.meta["r"] == 16
    assert record.storage_bits == record.meta["base_bits"] + record.meta["adapter_bits"]
    model, _ = load_quantized(artifact.path, dtype=torch.float32)
    stored = artifact.layers["model.layers.0.self_attn.q_proj"]
    assert set(stored.tensors) == {"qweight", "absmax_codes", "absmax_scales", "absmax_offset", "lora_A", "lora_B"}
    assert model.model.layers[0].self_attn.q_proj.weight.abs().max() > 0
