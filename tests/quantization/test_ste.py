"""STE QAT: the fake quantizer's forward and straight-through gradient, the signed grid in UniformLayer, the
training loop on a tiny model, storage, options."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from quantsafe.errors import QuantsafeError
from quantsafe.quantization import QuantConfig, make_quantizer
from quantsafe.quantization.methods.ste import STEQuantizer, fake_quantize, ste_export, ste_scale
from quantsafe.quantization.training import lr_factor, training_windows


def _weight(rows: int = 16, cols: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def _ste(bits: int = 4, group_size: int | None = None, **options: Any) -> STEQuantizer:
    config = QuantConfig(method="ste", bits=bits, sym=True, group_size=group_size, options=options)
    quantizer = make_quantizer(config)
    assert isinstance(quantizer, STEQuantizer)
    return quantizer


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_forward_is_q_of_w_and_gradient_passes_straight(bits: int, group_size: int | None) -> None:
    w = _weight().requires_grad_(True)
    out = fake_quantize(w, bits, group_size)
    stored = ste_export(w.detach(), bits, group_size)
    assert torch.equal(out.detach(), stored.dequantize())
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert w.grad is not None and torch.equal(w.grad, upstream)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_grid_is_symmetric_signed_with_scale_max_over_qmax(bits: int) -> None:
    w = _weight()
    layer = ste_export(w, bits, None)
    qmax = 2 ** (bits - 1) - 1
    exact = w.abs().amax(dim=1) / qmax
    s = layer.scales.float()[:, 0]
    assert torch.equal(s, ste_scale(w, bits, None)[:, 0])
    assert torch.all(s >= exact) and torch.all(s <= exact * (1 + 2**-10))  # fp16, rounded up
    q = layer.codes.long() - 2 ** (bits - 1)  # the signed level of every weight
    assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= qmax
    assert torch.equal(q, torch.clamp(torch.round(w / s[:, None]), -(2 ** (bits - 1)), qmax).long())
    # the row maximum lands on +qmax (or -qmax): |W|/s ≤ qmax, so the level −2^(b−1) is never used by this scale
    top = w.abs().argmax(dim=1)
    assert torch.equal(q.gather(1, top[:, None]).abs()[:, 0], torch.full((16,), qmax))
    assert layer.zeros is None and layer.group_size is None


def test_int2_grid_is_minus_two_to_one_times_s() -> None:
    w = torch.tensor([[-1.0, -0.4, 0.0, 0.45, 0.6, 1.0]])
    layer = ste_export(w, 2, None)
    assert layer.scales.float().item() == 1.0
    assert layer.dequantize().tolist() == [[-1.0, 0.0, 0.0, 0.0, 1.0, 1.0]]
    assert {int(c) - 2 for c in layer.codes.flatten()} <= {-2, -1, 0, 1}


@pytest.mark.parametrize(("bits", "bpw"), [(4, 4.018), (3, 3.018), (2, 2.018)])
def test_bits_per_weight_match_algorithms_md(bits: int, bpw: float) -> None:
    layer = ste_export(torch.randn(896, 896), bits, None)
    assert layer.storage_bits() / (896 * 896) == pytest.approx(bpw, abs=5e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 64])
def test_storage_round_trip(bits: int, group_size: int | None, round_trip: Callable[[Any], Any]) -> None:
    layer = ste_export(_weight(24, 100), bits, group_size)
    again = round_trip(layer)
    assert torch.equal(again.codes, layer.codes) and torch.equal(again.scales, layer.scales)


def test_schedule_and_windows() -> None:
    factors = [lr_factor(i, 100, 0.03, "cosine") for i in range(100)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and factors[3] == 1.0
    assert factors[-1] > 0 and all(a >= b for a, b in itertools.pairwise(factors[2:]))
    assert lr_factor(50, 100, 0.03, "constant") == 1.0 and lr_factor(0, 100, 0.03, "constant") == pytest.approx(1 / 3)
    tokens = torch.arange(24).reshape(2, 12)
    assert training_windows(tokens, 5).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [12, 13, 14, 15, 16],
                                                    [17, 18, 19, 20, 21]]
    assert training_windows(tokens, None) is tokens
    with pytest.raises(QuantsafeError, match="longer"):
        training_windows(tokens, 16)


def _tokens(n: int = 16, seq: int = 32) -> torch.Tensor:
    # a learnable pattern (repeated short sequences), so a few steps measurably lower the loss
    base = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    return base.repeat(n // 4, seq // 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_lowers_the_loss_and_exports_on_grid(tiny_model: Callable[..., Any], dtype: torch.dtype) -> None:
    model = tiny_model().to(dtype)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." not in n or "norm" in n}
    quantizer = _ste(4, steps=8, lr=3e-3, batch_size=4, window=None)
    results = quantizer.quantize_model(model, _tokens())
    report = quantizer.report
    assert report is not None and len(report.losses) == 8
    assert report.losses[-1] < 0.9 * report.losses[0]
    assert len(results) == 14  # 7 Linears × 2 blocks
    for name, layer in results.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, layer.dequantize(dtype))
        s = layer.scales.float()
        assert torch.equal(layer.dequantize(), s * torch.round(layer.dequantize() / s))  # exactly on the grid
    for n, p in model.named_parameters():  # embeddings, norms (and lm_head) untouched
        if n in frozen:
            assert torch.equal(p, frozen[n])
    assert not any(p.requires_grad for p in model.parameters())
    assert "forward" not in vars(model.get_submodule("model.layers.0.mlp.down_proj"))


def test_fp32_master_weights_keep_small_steps_in_bf16(tiny_model: Callable[..., Any]) -> None:
    """At lr 1e-5 a bf16 weight would not move; the fp32 master does, so after enough steps some codes flip."""
    model = tiny_model().to(torch.bfloat16)
    before = {n: ste_export(m.weight, 8, None) for n, m in model.named_modules() if n.endswith("q_proj")}
    quantizer = _ste(8, steps=6, lr=2e-3, batch_size=4, window=None)
    results = quantizer.quantize_model(model, _tokens())
    changed = sum(int((results[n].codes != b.codes).sum()) for n, b in before.items())
    assert changed > 0


def test_high_bits_stay_close_to_full_precision(tiny_model: Callable[..., Any]) -> None:
    model, reference = tiny_model(), tiny_model()
    ids = _tokens()[:2]
    _ste(8, steps=2, batch_size=4, window=16).quantize_model(model, _tokens())
    with torch.no_grad():
        out, ref = model(ids).logits, reference(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_quantize_without_training_is_rtn_on_the_ste_grid() -> None:
    w = _weight()
    layer = _ste(3, group_size=32).quantize(w, None, "mlp.up_proj")
    assert torch.equal(layer.dequantize(), ste_export(w, 3, 32).dequantize())


def test_options_recorded_and_bad_options_fail(tiny_model: Callable[..., Any]) -> None:
    config = QuantConfig(method="ste", bits=4)
    assert config.sym and config.group_size is None  # the method's own grid unless a config says otherwise
    assert config.options == {"steps": 32, "batch_size": 2, "grad_accum": 1, "window": 256, "lr": 1e-5,
                              "schedule": "cosine", "warmup_ratio": 0.03, "max_grad_norm": None}
    assert config.calibration is not None
    with pytest.raises(QuantsafeError, match="sym: true"):
        make_quantizer(QuantConfig(method="ste", bits=4, sym=False))
    for bad in ({"steps": 0}, {"lr": 0}, {"warmup_ratio": 1.0}, {"schedule": "linear"}, {"salient": 28}):
        with pytest.raises(ValueError, match="options of method 'ste'"):
            QuantConfig(method="ste", bits=4, sym=True, options=bad)
    with pytest.raises(QuantsafeError, match="fewer than batch_size"):
        _ste(4, batch_size=8, window=None).quantize_model(tiny_model(), torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(QuantsafeError, match="calibration windows"):
        _ste(4).quantize_model(tiny_model(), None)
