"""Randomized Hadamard transforms (QuIP#'s incoherence processing, algorithms.md §4.2) for any size n = K·2^p.

The transform of a length-n vector x is (R_K ⊗ Had_{2^p})(s ⊙ x): random signs s, then the orthonormal
Sylvester Hadamard on the 2^p factor (a butterfly, O(n log n)) and, when K > 1, a random K×K orthogonal R_K
on the odd factor: QuIP-for-all's `use_rand`, the convention of the reference paper's QuIP# checkpoints
(7×7 for 896, 19×19 for 4864, 9×9 for 576, 3×3 for 1536 and 192). It is orthogonal, so the inverse is the
transpose: s ⊙ (R_Kᵀ ⊗ Had_{2^p}) y.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantsafe.errors import QuantsafeError

# A K×K dense factor costs K flops per element and K² stored floats: beyond this it is no fast transform.
MAX_ODD_FACTOR = 1024


def split_size(n: int) -> tuple[int, int]:
    """(K, 2^p) with n = K·2^p and K odd."""
    if n < 1:
        raise QuantsafeError(f"no Hadamard transform of size {n}")
    power = n & -n
    return n // power, power


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform (Sylvester order, symmetric) along the last dim, a power of 2."""
    n = x.shape[-1]
    if n & (n - 1):
        raise QuantsafeError(f"fwht needs a power-of-2 length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2).view(-1, n)
        h *= 2
    return (y / math.sqrt(n)).reshape(*lead, n)


def random_orthogonal(k: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random k×k orthogonal matrix (fp32, CPU): QR of a Gaussian with the signs of diag(R) fixed."""
    q, r = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous()


@dataclass
class RandomizedHadamard:
    """x ↦ (rot ⊗ Had)(signs ⊙ x) along the last dimension; `rot` is None when the size is a power of 2."""

    signs: torch.Tensor  # ±1 fp32 [n]
    rot: torch.Tensor | None  # fp32 [K, K], orthogonal

    @property
    def size(self) -> int:
        return int(self.signs.shape[0])

    def _factors(self) -> tuple[int, int]:
        k = 1 if self.rot is None else int(self.rot.shape[0])
        return k, self.size // k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, p = self._factors()
        y = fwht((x * self.signs).reshape(*x.shape[:-1], k, p))
        if self.rot is not None:
            y = torch.matmul(self.rot, y)
        return y.reshape(x.shape)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        k, p = self._factors()
        x = y.reshape(*y.shape[:-1], k, p)
        if self.rot is not None:
            x = torch.matmul(self.rot.T, x)
        return fwht(x).reshape(y.shape) * self.signs


def random_hadamard(n: int, generator: torch.Generator, device: torch.device | str = "cpu",
                    what: str = "") -> RandomizedHadamard:
    """Draw the signs, then (if n is not a power of 2) the K×K orthogonal factor, from `generator` (CPU)."""
    k, _ = split_size(n)
    if k > MAX_ODD_FACTOR:
        raise QuantsafeError(f"{what or 'matrix'}: size {n} = {k}·{n // k} has no fast Hadamard transform "
                             f"(odd factor {k} > {MAX_ODD_FACTOR})")
    signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    rot = random_orthogonal(k, generator) if k > 1 else None
    return RandomizedHadamard(signs.to(device), None if rot is None else rot.to(device))
