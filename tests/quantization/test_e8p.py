"""The E8P12 codebook: its points, the exact fast nearest-point search, and the Gaussian MSEs of §4.3."""

from __future__ import annotations

import pytest
import torch

from quantsafe.quantization import e8p


def test_source_set_is_227_ball_vectors_plus_29_padding() -> None:
    s = e8p.source_set()
    norms = s.square().sum(dim=1)
    assert s.shape == (256, 8)
    assert torch.all(norms[:227] <= 10) and torch.all(norms[227:] == 12)
    assert sorted(set(norms[:227].tolist())) == [2, 4, 6, 8, 10]
    assert len(torch.unique(s, dim=0)) == 256


def test_codebook_has_65536_distinct_points_in_the_shifted_d8hat() -> None:
    table = e8p.decode_table()
    assert table.shape == (65536, 8) and len(torch.unique(table, dim=0)) == 65536
    codes = torch.arange(65536)
    shift = torch.where((codes >> 7) & 1 == 1, -0.25, 0.25)
    v = table - shift[:, None]
    assert torch.all((v - 0.5) == (v - 0.5).round())  # coordinates in Z + ½
    assert torch.all(v.sum(dim=1).round() % 2 == 0)  # even coordinate sum: v ∈ D̂₈
    assert torch.equal(e8p.source_set()[codes >> 8], v.abs())  # |v| is the indexed source vector


@pytest.mark.parametrize("spread", [0.5, 1.5, 4.0])
def test_fast_search_equals_brute_force_over_all_codewords(spread: float) -> None:
    table = e8p.decode_table().double()
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(int(spread * 10))) * spread
    point, code = e8p.quantize_e8p(x)
    assert torch.equal(e8p.decode(code), point)
    norms = table.square().sum(dim=1)
    brute = torch.cat([(2 * chunk @ table.T - norms).argmax(dim=1) for chunk in x.double().split(200)])
    assert torch.equal(point, e8p.decode_table()[brute])  # the nearest of all 2¹⁶ codewords (no ties at random)


def test_int16_codes_decode_like_the_unsigned_ones() -> None:
    codes = torch.tensor([0, 1, 32767, 32768, 65535])
    stored = e8p.to_int16(codes)
    assert stored.dtype == torch.int16 and stored.tolist() == [0, 1, 32767, -32768, -1]
    assert torch.equal(e8p.decode(stored), e8p.decode(codes))


@pytest.mark.parametrize(("rho", "mse"), [(1.03, 0.092), (0.9, 0.099)])
def test_gaussian_mse_matches_the_reference(rho: float, mse: float) -> None:
    x = torch.randn(100_000, 8, generator=torch.Generator().manual_seed(0))
    point, _ = e8p.quantize_e8p(x * rho)
    assert (point / rho - x).square().mean().item() == pytest.approx(mse, abs=0.0015)


def test_rvq4_gaussian_mse_and_decode() -> None:
    x = torch.randn(100_000, 8, generator=torch.Generator().manual_seed(1))
    recon, codes = e8p.quantize_rvq(x * 1.03, 2, 3.45)
    assert codes.shape == (100_000, 2)
    assert (recon / 1.03 - x).square().mean().item() == pytest.approx(0.0097, abs=0.0004)
    assert torch.equal(e8p.dequantize_rvq(codes, 3.45), recon)
