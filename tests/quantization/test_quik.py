"""QUIK (weight-only): outlier input channels kept in fp16, GPTQ on the rest; and the GPTQ column loop it shares."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from quantsafe.errors import QuantsafeError
from quantsafe.quantization import QuantConfig, make_quantizer
from quantsafe.quantization.base import LayerStats
from quantsafe.quantization.methods.gptq import GPTQOptions, gptq_quantize
from quantsafe.quantization.methods.quik import QuikLayer, QUIKQuantizer, quik_scale, quik_storage_bits
from quantsafe.quantization.sequential import quantize_decoder_blocks


def _pin_problem() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(24, 160, generator=gen)
    x = (torch.randn(160, 160, generator=gen) * torch.linspace(0.05, 3, 160)) @ torch.randn(160, 512, generator=gen)
    x[3] = 0  # a dead input
    return w, x @ x.T


@pytest.mark.parametrize(
    ("bits", "group_size", "act_order", "static_groups", "sym", "block_size", "digest"),
    [
        (4, None, True, False, False, 128, "bc5de65cd18915db"),
        (3, 64, True, False, False, 50, "aec098110e791cb6"),
        (2, 64, True, True, True, 50, "71dddc6dbed60c2f"),
    ],
)
def test_gptq_codes_are_pinned(bits: int, group_size: int | None, act_order: bool, static_groups: bool, sym: bool,
                               block_size: int, digest: str) -> None:
    """GPTQ codes as produced before its column loop became `gptq_columns` (shared with QUIK): the refactor must
    not change a single code. Cases whose codes survive a 1e-6 relative perturbation of w and x, so the pin does
    not hinge on one ulp of a BLAS kernel."""
    w, h = _pin_problem()
    options = GPTQOptions(act_order=act_order, static_groups=static_groups, block_size=block_size)
    r = gptq_quantize(w, h, bits, group_size, sym, options)
    assert hashlib.sha256(r.codes.numpy().tobytes()).hexdigest()[:16] == digest


# ---------------------------------------------------------------- QUIK


def _stats(x: torch.Tensor) -> LayerStats:
    """Statistics of inputs x [cols, tokens] as the pipeline gathers them."""
    return LayerStats(n_tokens=x.shape[1], xtx=x @ x.T, abs_max=x.abs().amax(dim=1))


def _quik(k: int, bits: int = 4, w_clip: bool = False, **config: Any) -> QUIKQuantizer:
    cfg = QuantConfig(method="quik", bits=bits, group_size=None, sym=True,
                      options={"outliers": k, "w_clip": w_clip}, **config)
    quantizer = make_quantizer(cfg)
    assert isinstance(quantizer, QUIKQuantizer)
    return quantizer


def _massive_inputs(cols: int = 96, tokens: int = 1024, massive: tuple[int, ...] = (5, 40, 77)) -> torch.Tensor:
    """Correlated inputs with a few channels 50x larger than the rest (LLMs' massive activations)."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(cols, cols, generator=gen) * torch.linspace(0.2, 1, cols)) @ torch.randn(cols, tokens,
                                                                                              generator=gen)
    x[list(massive)] *= 50
    return x


def _naive_gptq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, bits: int, stop: int) -> torch.Tensor:
    """The OBQ update as the GPTQ paper writes it, in float64 with an explicit inverse per step: quantize column
    j on QUIK's grid, then move the not-yet-quantized columns F by −err / [H_F⁻¹]_jj · (H_F⁻¹)_{j,:}. Returns W
    with the first `stop` columns quantized and the others as the updates left them."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    qmax, s = 2 ** (bits - 1) - 1, scale.double()[:, None]
    for j in range(stop):
        hinv = torch.linalg.inv(h[j:, j:])
        q = torch.clamp(torch.round(w[:, j : j + 1] / s), -qmax - 1, qmax) * s
        w[:, j:] -= (w[:, j : j + 1] - q) / hinv[0, 0] @ hinv[:1, :]
        w[:, j] = q[:, 0]
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [0, 7])
def test_quik_layers_round_trip_bit_exactly(round_trip: Callable[[Any], Any], bits: int, k: int) -> None:
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(bits))
    layer = _quik(k, bits, w_clip=True).quantize(w, _stats(_massive_inputs()), "mlp.up_proj")
    assert layer.codes.shape == (40, 96 - k) and int(layer.codes.max()) <= 2**bits - 1
    assert layer.meta() == {"bits": bits, "outliers": k}
    again = round_trip(layer)
    assert torch.equal(again.outlier_idx, layer.outlier_idx) and torch.equal(again.codes, layer.codes)


@pytest.mark.parametrize(("rows", "cols", "k", "bpw"), [(896, 896, 56, 4.770), (896, 896, 256, 7.457),
                                                        (896, 896, 32, 4.448), (896, 4864, 280, 4.696),
                                                        (4864, 896, 56, 4.768)])
def test_storage_bits_match_algorithms_md(rows: int, cols: int, k: int, bpw: float) -> None:
    layer = QuikLayer(codes=torch.zeros(rows, cols - k, dtype=torch.uint8), scales=torch.ones(rows).half(),
                      outliers=torch.zeros(rows, k).half(), outlier_idx=torch.arange(k, dtype=torch.int32), bits=4)
    assert round(layer.storage_bits() / (rows * cols), 3) == bpw
    if (rows, cols, k) == (896, 896, 56):  # algorithms.md §8's worked example
        assert layer.storage_bits() == 3_829_504


def test_without_outliers_quik_is_plain_gptq_on_its_grid() -> None:
    w, x = torch.randn(24, 96, generator=torch.Generator().manual_seed(0)), _massive_inputs()
    x[11] = 0  # a dead input: zeroed, as in GPTQ
    layer = _quik(0).quantize(w, _stats(x), "mlp.up_proj")
    assert layer.outlier_idx.numel() == 0
    expected = _naive_gptq(w, x @ x.T, quik_scale(w, 4, clip=False), 4, 96)
    torch.testing.assert_close(layer.dequantize().double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(layer.scales.float(), quik_scale(w, 4, clip=False))


def test_outlier_columns_keep_gptqs_error_feedback() -> None:
    """Integer columns by ascending max|x| through GPTQ, then the k largest copied as the updates left them."""
    k = 6
    w, x = torch.randn(24, 96, generator=torch.Generator().manual_seed(1)), _massive_inputs()
    layer = _quik(k).quantize(w, _stats(x), "mlp.up_proj")
    perm = torch.argsort(x.abs().amax(dim=1), stable=True)
    scale = quik_scale(w[:, perm[:-k]], 4, clip=False)  # fitted on the original integer columns
    expected = torch.empty(24, 96, dtype=torch.float64)
    expected[:, perm] = _naive_gptq(w[:, perm], (x @ x.T)[perm][:, perm], scale, 4, 96 - k)
    idx = layer.outlier_idx.long()
    assert torch.equal(idx, perm[-k:].sort().values)
    torch.testing.assert_close(layer.dequantize().double(), expected, rtol=0, atol=2e-3)  # fp16 outliers
    integer = torch.ones(96, dtype=torch.bool)
    integer[idx] = False
    torch.testing.assert_close(layer.dequantize()[:, integer].double(), expected[:, integer], rtol=0, atol=1e-5)
    assert torch.equal(layer.outliers, expected[:, idx].half())
    assert (layer.outliers.float() - w[:, idx]).abs().max() > 0.05  # not the original columns


def test_clip_search_never_increases_the_rounding_error() -> None:
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(2))
    w[::4, 0] *= 8  # rows with one large weight: clipping pays there

    def err(scale: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w / scale[:, None]), -8, 7) * scale[:, None]
        return (q - w).abs().pow(2.4).sum(dim=1)

    plain, clipped = quik_scale(w, 4, clip=False), quik_scale(w, 4, clip=True)
    assert torch.equal(clipped.half().float(), clipped)  # stored exactly as fp16
    assert torch.all(err(clipped) <= err(plain)) and torch.all(err(clipped)[::4] < err(plain)[::4])
    assert torch.all(plain * 7 >= w.abs().amax(dim=1))  # the unclipped grid still reaches max|w|


def test_outliers_beat_plain_gptq_on_massive_activations() -> None:
    """The point of QUIK: with a few massive input channels, keeping them in fp16 cuts the layer's output error
    well below GPTQ on the same grid without outliers, and below GPTQ's own best per-row setting."""
    w, x = torch.randn(64, 96, generator=torch.Generator().manual_seed(4)), _massive_inputs()
    stats = _stats(x)

    def output_error(dense: torch.Tensor) -> float:
        return float(((w - dense) @ x).square().sum())

    quik = output_error(_quik(3).quantize(w, stats, "mlp.up_proj").dequantize())
    plain = output_error(_quik(0).quantize(w, stats, "mlp.up_proj").dequantize())
    gptq = output_error(gptq_quantize(w, x @ x.T, 4, None, False, GPTQOptions(act_order=True)).dequantize())
    assert quik < 0.5 * plain and quik < 0.5 * gptq


def _block0_inputs(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states[0]
        return model.model.layers[0].input_layernorm(hidden).reshape(-1, hidden.shape[-1]).float()


def test_outliers_are_the_top_k_channels_and_shared(tiny_model: Callable[..., Any]) -> None:
    model = tiny_model("qwen2")  # q/k/v with biases
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    top = torch.topk(_block0_inputs(model, tokens).abs().amax(dim=0), 4).indices.sort().values
    cfg = QuantConfig(method="quik", bits=4, group_size=None, sym=True, calibration={"n_samples": 4, "seq_len": 32})
    results = quantize_decoder_blocks(model, make_quantizer(cfg), tokens, batch_size=2)
    idx = {name: r.outlier_idx.long() for name, r in results.items() if isinstance(r, QuikLayer)}
    assert len(idx) == len(results) == 14
    for block in (0, 1):
        attn, mlp = f"model.layers.{block}.self_attn.", f"model.layers.{block}.mlp."
        # hidden 64 → k = 0.0625 · 64 = 4; down_proj reads 128 = 2 · 64 channels → 8
        assert [idx[attn + n].numel() for n in ("q_proj", "o_proj")] == [4, 4] and idx[mlp + "down_proj"].numel() == 8
        assert torch.equal(idx[attn + "q_proj"], idx[attn + "k_proj"]) and torch.equal(idx[attn + "q_proj"],
                                                                                      idx[attn + "v_proj"])
        assert torch.equal(idx[mlp + "gate_proj"], idx[mlp + "up_proj"])
    assert torch.equal(idx["model.layers.0.self_attn.q_proj"], top)


def test_quik_8bit_keeps_tiny_model_outputs(tiny_model: Callable[..., Any]) -> None:
    model = tiny_model()
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(tokens).logits
    cfg = QuantConfig(method="quik", bits=8, group_size=None, sym=True, calibration={"n_samples": 4, "seq_len": 32})
    quantize_decoder_blocks(model, make_quantizer(cfg), tokens, batch_size=2)
    with torch.no_grad():
        after = model(tokens).logits
    assert (after - before).abs().max() < 0.02 * before.abs().max()


@pytest.mark.parametrize(("group_size", "sym"), [(128, True), (None, False)])
def test_quik_needs_per_row_symmetric_configs(group_size: int | None, sym: bool) -> None:
    cfg = QuantConfig(method="quik", bits=4, group_size=group_size, sym=sym)
    with pytest.raises(QuantsafeError, match="set group_size: null and sym: true"):
        make_quantizer(cfg)
    plain = QuantConfig(method="quik", bits=4)  # QUIK's own defaults
    assert (plain.group_size, plain.sym) == (None, True)


def test_outlier_count_scales_with_width() -> None:
    q = _quik(0)
    default = make_quantizer(QuantConfig(method="quik", bits=4, group_size=None, sym=True))
    assert isinstance(default, QUIKQuantizer)
    default._hidden = 896  # what quantize_block reads from the block's input
    assert (default.outlier_count(896), default.outlier_count(4864)) == (56, 280)  # algorithms.md §2
    default._hidden = 576
    assert (default.outlier_count(576), default.outlier_count(1536)) == (36, 72)  # SmolLM2-135M
    assert q.outlier_count(896) == 0


def test_artifact_stores_and_reloads_quik_layers(tmp_path: Path) -> None:
    """quantize_variant → load_quantized: the format registers, the manifest records k and the per-layer widths
    (down_proj at 8 bits through layer_bits), and the reloaded weights hold the fp16 outlier columns in place."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantsafe.models import ResolvedModel, resolve_model
    from quantsafe.quantization import load_quantized, quantize_variant
    from quantsafe.quantization.artifact import WEIGHTS_FILE, read_layer

    base = tmp_path / "tiny"
    base.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # SmolLM2's tokenizer
        shutil.copy(resolve_model("smollm2-135m").path / name, base / name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    tiny = ResolvedModel(name="tiny", path=base, source=str(base), source_sha256="0" * 64, dequantized_gguf=False)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Sentence {i} says the {i % 7}th fox jumps over {i % 5} lazy dogs." for i in range(200)))
    cfg = QuantConfig(method="quik", bits=4, group_size=None, sym=True, layer_bits={"mlp.down_proj": 8},
                      calibration={"source": "text_file", "path": text, "n_samples": 4, "seq_len": 64})
    artifact = quantize_variant(tiny, cfg, None, tmp_path / "artifacts", dtype=torch.float32)
    down, q = artifact.layers["model.layers.1.mlp.down_proj"], artifact.layers["model.layers.1.self_attn.q_proj"]
    assert (down.format, down.meta, q.meta) == ("quik", {"bits": 8, "outliers": 8}, {"bits": 4, "outliers": 4})
    assert down.storage_bits == quik_storage_bits(64, 128, 8, 8)
    model, _ = load_quantized(artifact.path, dtype=torch.float32)
    stored = read_layer(load_file(str(artifact.path / WEIGHTS_FILE)), "model.layers.1.mlp.down_proj", down)
    assert isinstance(stored, QuikLayer) and int(stored.codes.max()) > 15  # the 8-bit grid is used
    weight = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(weight[:, stored.outlier_idx.long()], stored.outliers.float())
    assert torch.equal(weight, stored.dequantize())
