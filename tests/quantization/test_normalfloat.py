"""NF-k grids (QLoRA's NF4 table, the NF3/NF2 extension), blockwise NF quantization, double quantization, and
the `normalfloat` storage format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from scipy.stats import norm

from quantsafe.quantization.normalfloat import NF_OFFSET, DoubleQuantized, dynamic_map, nf_levels, nf_quantize

# algorithms.md §7 (4 decimals) and bitsandbytes' NF4 table (fp32)
NF4_TABLE = [-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407,
             0.5626, 0.7230, 1]
NF4_BNB = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_levels_equal_the_qlora_table() -> None:
    levels = nf_levels(4)
    assert levels.dtype == torch.float32 and levels.numel() == 16
    assert torch.allclose(levels, torch.tensor(NF4_TABLE), atol=5e-5, rtol=0)
    assert torch.allclose(levels, torch.tensor(NF4_BNB), atol=2e-7, rtol=0)
    assert abs(NF_OFFSET - (1 - 0.5 * (1 / 30 + 1 / 32))) < 1e-7


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_k_is_the_same_quantile_construction(bits: int) -> None:
    """2^(k−1) positive levels, 2^(k−1) − 1 negative ones and an exact 0, from Φ⁻¹ at the same outer quantile."""
    levels = nf_levels(bits).double()
    half = 2 ** (bits - 1)
    top = norm.ppf(NF_OFFSET)
    pos = norm.ppf(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].double().numpy()) / top
    neg = -norm.ppf(torch.linspace(NF_OFFSET, 0.5, half)[:-1].double().numpy()) / top
    expected = torch.tensor(sorted([*pos.tolist(), 0.0, *neg.tolist()]), dtype=torch.float64)
    assert levels.numel() == 2**bits
    assert torch.allclose(levels, expected, atol=1e-6, rtol=0)
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert (levels > 0).sum() == half and (levels < 0).sum() == half - 1


def test_nf2_and_nf3_positive_levels_nest_in_nf4() -> None:
    """Every other NF4 quantile point is an NF3 point, every fourth an NF2 one (same δ, halved spacing)."""
    nf4_pos = nf_levels(4)[nf_levels(4) > 0].flip(0)
    assert torch.equal(nf_levels(3)[nf_levels(3) > 0].flip(0), nf4_pos[::2])
    assert torch.equal(nf_levels(2)[nf_levels(2) > 0].flip(0), nf4_pos[::4])
    assert torch.allclose(nf_levels(2), torch.tensor([-1.0, 0.0, 0.3379, 1.0]), atol=5e-5)


def test_dynamic_map_is_bitsandbytes_signed_8_bit_map() -> None:
    code = dynamic_map()
    assert code.numel() == 256 and code.unique().numel() == 256
    assert code[-1] == 1 and (code == 0).any()
    assert torch.equal(code[code < 0].abs().sort().values, code[(code > 0) & (code < 1)].sort().values)
    assert code[0].item() == pytest.approx(-(0.1 + 0.9 * 63.5 / 64), abs=1e-6)  # top decade, last midpoint
    assert code[code > 0].min().item() == pytest.approx(0.55e-6, rel=1e-5)  # 10^-6 decade, one midpoint


def _weight(rows: int = 16, cols: int = 192, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_are_the_nearest_level_of_w_over_absmax(bits: int) -> None:
    w = _weight()
    layer = nf_quantize(w, bits, 64, double_quant=False)
    assert layer.absmax is not None
    scaled = w / layer.absmax.repeat_interleave(64, dim=1)
    nearest = (scaled[..., None] - nf_levels(bits)).abs().argmin(dim=-1)
    assert torch.equal(layer.codes.long(), nearest)
    assert torch.allclose(layer.absmax, w.reshape(16, 3, 64).abs().amax(dim=2))


def test_more_bits_less_error_and_dq_costs_little() -> None:
    w = _weight()
    errors = [(nf_quantize(w, b, 64, False).dequantize() - w).norm().item() for b in (2, 3, 4)]
    assert errors == sorted(errors, reverse=True)
    plain, dq = nf_quantize(w, 4, 64, False), nf_quantize(w, 4, 64, True)
    assert torch.equal(plain.codes, dq.codes)  # codes come from the exact absmax, as in bitsandbytes
    assert (dq.dequantize() - w).norm() < 1.02 * (plain.dequantize() - w).norm()


def test_double_quantization_round_trip_is_close() -> None:
    absmax = _weight(64, 100).abs().amax(dim=1).repeat(10)  # 640 values: 3 blocks of 256, one partial
    dq = DoubleQuantized.encode(absmax)
    assert dq.codes.dtype == torch.uint8 and dq.scales.numel() == 3 and dq.offset.numel() == 1
    assert torch.allclose(dq.decode(), absmax, rtol=0, atol=0.01 * float(absmax.abs().max()))


def test_bits_per_weight_match_algorithms_md() -> None:
    """§8: NF4 g64 on 896×896 is 4.500 bits per weight without DQ, 4.127 with."""
    w = torch.randn(896, 896)
    assert nf_quantize(w, 4, 64, False).storage_bits() / w.numel() == pytest.approx(4.5)
    assert nf_quantize(w, 4, 64, True).storage_bits() / w.numel() == pytest.approx(4.127, abs=5e-4)


def test_zero_blocks_and_partial_blocks() -> None:
    w = _weight(8, 100)
    w[:, :64] = 0
    layer = nf_quantize(w, 3, 64, double_quant=False)
    out = layer.dequantize()
    assert torch.isfinite(out).all() and torch.equal(out[:, :64], torch.zeros(8, 64))
    assert layer.n_blocks == 2 and layer.storage_bits() == 8 * 100 * 3 + 8 * 2 * 32


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("double_quant", [False, True])
def test_storage_round_trip(bits: int, double_quant: bool, round_trip: Callable[[Any], Any]) -> None:
    layer = nf_quantize(_weight(24, 100), bits, 64, double_quant)
    again = round_trip(layer)
    assert torch.equal(again.codes, layer.codes)
    assert again.meta() == layer.meta() == {"bits": bits, "block_size": 64, "double_quant": double_quant}
