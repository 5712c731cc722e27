"""Randomized Hadamard transforms: orthogonal, exact round trip, the Kronecker structure, fast = dense."""

from __future__ import annotations

import math

import pytest
import torch

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.hadamard import fwht, random_hadamard, split_size


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


@pytest.mark.parametrize(("n", "k"), [(64, 1), (896, 7), (576, 9), (192, 3), (4864, 19), (24, 3), (7, 7)])
def test_split_size(n: int, k: int) -> None:
    assert split_size(n) == (k, n // k)


def test_fwht_is_the_sylvester_matrix() -> None:
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ _sylvester(32).double().T, atol=1e-12)


@pytest.mark.parametrize("n", [64, 96, 576, 896, 4864])
def test_round_trip_is_exact_to_float_precision(n: int) -> None:
    t = random_hadamard(n, torch.Generator().manual_seed(n))
    x = torch.randn(16, n, generator=torch.Generator().manual_seed(1))
    y = t.forward(x)
    assert not torch.allclose(y, x)
    assert torch.allclose(t.inverse(y), x, atol=2e-5)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)  # orthogonal


@pytest.mark.parametrize("n", [48, 192])
def test_forward_is_rot_kron_hadamard_times_signs(n: int) -> None:
    t = random_hadamard(n, torch.Generator().manual_seed(3))
    k, p = split_size(n)
    assert t.rot is not None and t.rot.shape == (k, k)
    assert torch.allclose(t.rot @ t.rot.T, torch.eye(k), atol=1e-6)
    dense = torch.kron(t.rot, _sylvester(p)) * t.signs  # (R ⊗ Had)·diag(s)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(t.forward(x), x @ dense.T, atol=1e-5)
    assert set(t.signs.tolist()) == {-1.0, 1.0}


def test_same_generator_seed_same_transform() -> None:
    a = random_hadamard(896, torch.Generator().manual_seed(9))
    b = random_hadamard(896, torch.Generator().manual_seed(9))
    c = random_hadamard(896, torch.Generator().manual_seed(10))
    assert a.rot is not None and b.rot is not None and c.rot is not None
    assert torch.equal(a.signs, b.signs) and torch.equal(a.rot, b.rot)
    assert not torch.equal(a.rot, c.rot)


def test_huge_odd_factor_is_refused() -> None:
    with pytest.raises(QuantsafeError, match=r"mlp\.down_proj.*1031"):
        random_hadamard(2 * 1031, torch.Generator().manual_seed(0), what="mlp.down_proj")
