"""Quantizer math on small random tensors: RTN bounds, GPTQ vs RTN, act-order groups."""

from __future__ import annotations

import pytest
import torch

from quantsafe.quantization import QuantConfig, make_quantizer
from quantsafe.quantization.base import LayerStats
from quantsafe.quantization.methods.gptq import GPTQOptions, gptq_quantize
from quantsafe.quantization.methods.rtn import rtn_quantize


def _weight(rows: int = 32, cols: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 64, 96])
def test_rtn_error_is_at_most_half_a_step(bits: int, group_size: int | None) -> None:
    w = _weight()
    r = rtn_quantize(w, bits, group_size, sym=False)
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 2**bits - 1
    step = r.scales.float()[:, r.group_index()]
    err = (r.dequantize() - w).abs()
    assert torch.all(err <= step / 2 + 1e-6)


def test_rtn_symmetric_zero_is_implied() -> None:
    r = rtn_quantize(_weight(), 4, 64, sym=True)
    assert r.zeros is None
    assert torch.allclose(r.zero_points(), torch.full_like(r.zero_points(), 8.0))


def test_rtn_more_bits_less_error() -> None:
    w = _weight()
    errors = [(rtn_quantize(w, b, 64, False).dequantize() - w).norm().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_with_identity_hessian_equals_rtn(act_order: bool, group_size: int | None) -> None:
    w = _weight()
    rtn = rtn_quantize(w, 3, group_size, sym=False)
    options = GPTQOptions(act_order=act_order, static_groups=False)
    gptq = gptq_quantize(w, torch.eye(w.shape[1]), 3, group_size, False, options)
    assert torch.equal(gptq.codes, rtn.codes)
    assert torch.equal(gptq.scales, rtn.scales)
    assert torch.equal(gptq.dequantize(), rtn.dequantize())


def _correlated_inputs(cols: int = 256, tokens: int = 2048) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(cols, cols, generator=gen) * torch.linspace(0.05, 3, cols)
    return mix @ torch.randn(cols, tokens, generator=gen)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_reduces_output_error_vs_rtn(act_order: bool, bits: int) -> None:
    w, x = _weight(), _correlated_inputs()
    rtn = rtn_quantize(w, bits, 64, False).dequantize()
    gptq = gptq_quantize(w, x @ x.T, bits, 64, False, GPTQOptions(act_order=act_order)).dequantize()
    assert ((w - gptq) @ x).norm() < 0.9 * ((w - rtn) @ x).norm()


def test_gptq_act_order_groups_round_trip_through_g_idx() -> None:
    w, x = _weight(), _correlated_inputs()
    r = gptq_quantize(w, x @ x.T, 4, 64, False, GPTQOptions(act_order=True, static_groups=False))
    assert r.g_idx is not None and r.g_idx.dtype == torch.int32
    # each group holds exactly group_size columns, and the columns are not contiguous runs
    assert torch.bincount(r.g_idx.long()).tolist() == [64] * 4
    assert not torch.equal(r.g_idx.long(), torch.arange(256) // 64)
    # dequantizing through g_idx reproduces the weights the algorithm optimised: error within a step
    step = r.scales.float()[:, r.g_idx.long()]
    assert (r.dequantize() - w).abs().max() < 8 * step.max()
    # and a column's code is its own group's rounding: re-quantizing the dequantized weight is a fixed point
    idx = r.g_idx.long()
    requant = torch.clamp(torch.round(r.dequantize() / r.scales.float()[:, idx]) + r.zero_points()[:, idx], 0, 15)
    assert torch.equal(requant.to(torch.uint8), r.codes)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_static_groups_use_original_group_grids(act_order: bool) -> None:
    w, x = _weight(), _correlated_inputs()
    options = GPTQOptions(act_order=act_order, static_groups=True)
    r = gptq_quantize(w, x @ x.T, 4, 64, False, options)
    assert r.g_idx is None  # groups stay contiguous in the original order
    rtn = rtn_quantize(w, 4, 64, False)
    assert torch.equal(r.scales, rtn.scales) and r.zeros is not None and torch.equal(r.zeros, rtn.zeros)
    assert ((w - r.dequantize()) @ x).norm() < 0.9 * ((w - rtn.dequantize()) @ x).norm()
    identity = gptq_quantize(w, torch.eye(256), 4, 64, False, options)
    assert torch.equal(identity.codes, rtn.codes)


def test_gptq_handles_dead_inputs_and_singular_hessian() -> None:
    w = _weight(16, 128)
    x = _correlated_inputs(128, 64)  # 64 tokens < 128 columns: rank-deficient H
    x[5] = 0  # a dead input column
    r = gptq_quantize(w, x @ x.T, 4, 64, False, GPTQOptions())
    assert torch.all(r.dequantize()[:, 5] == 0)
    assert torch.isfinite(r.dequantize()).all()


def test_gptq_quantizer_uses_config_options() -> None:
    cfg = QuantConfig(method="gptq", bits=4, group_size=64, options={"act_order": False, "true_sequential": True})
    quantizer = make_quantizer(cfg)
    assert quantizer.true_sequential is True
    w, x = _weight(), _correlated_inputs()
    r = quantizer.quantize(w, LayerStats(x.shape[1], xtx=x @ x.T), "mlp.down_proj")
    assert r.g_idx is None and r.loss is not None and r.loss > 0
