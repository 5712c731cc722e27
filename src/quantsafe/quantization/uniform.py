"""The uniform integer grid shared by RTN and GPTQ (GPTQ's quantizer conventions, algorithms.md §0).

Asymmetric: the [min, max] range is first widened to contain 0 so the zero point always fits in `bits` bits;
scale = (max − min)/(2^b − 1), zero = round(−min/scale). Symmetric keeps the unsigned grid, zero = 2^(b−1).
Scales are rounded (up) to fp16 *before* use, so the weights a method optimises are exactly the ones stored.
"""

from __future__ import annotations

import torch

_MIN_SCALE = torch.finfo(torch.float16).tiny


def fit_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero (both fp32 [rows]) for the columns of `w` [rows, k]."""
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    exact = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE)
    half = exact.half()
    # Round the scale *up* to fp16 so the stored grid still spans [min, max] (error stays within half a step).
    half = torch.where(half.float() < exact, torch.nextafter(half, torch.tensor(torch.inf, dtype=half.dtype)), half)
    scale = half.float()
    if sym:
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    return scale, torch.round(-xmin / scale).clamp(0, maxq)


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (fp32 holding integers) of `w` [rows, k] on the grid of per-row `scale`, `zero`."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Grid values of `codes` [rows, k] for per-row `scale`, `zero` [rows]."""
    return scale[:, None] * (codes - zero[:, None])
