"""The uniform integer grid shared by RTN, GPTQ, AWQ and STE (GPTQ's quantizer conventions, algorithms.md §0),
and its storage form `UniformLayer`.

Asymmetric: the [min, max] range is first widened to contain 0 so the zero point always fits in `bits` bits;
scale = (max − min)/(2^b − 1), zero = round(−min/scale). Symmetric keeps the unsigned grid, zero = 2^(b−1).
Scales are rounded (up) to fp16 *before* use, so the weights a method optimises are exactly the ones stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from quantsafe.quantization.base import QuantizedLayer, register_layer_format
from quantsafe.quantization.packing import pack_codes, unpack_codes

SCALE_BITS = 16  # scales are stored as fp16
G_IDX_BITS = 32  # act-order group index, int32 per input column
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
    half = torch.where(half.float() < exact, torch.nextafter(half, torch.full_like(half, torch.inf)), half)
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


def layer_storage_bits(rows: int, cols: int, bits: int, group_size: int | None, sym: bool, g_idx: bool) -> int:
    """Bits stored for one uniform matrix: codes + fp16 scales + b-bit zeros (asymmetric) + int32 g_idx.

    This is the accounting of algorithms.md §8; biases are not counted (they stay bf16, like in the papers).
    """
    groups = 1 if group_size is None else math.ceil(cols / group_size)
    total = rows * cols * bits + rows * groups * SCALE_BITS
    if not sym:
        total += rows * groups * bits
    if g_idx:
        total += cols * G_IDX_BITS
    return total


@register_layer_format("uniform")
@dataclass
class UniformLayer(QuantizedLayer):
    """A Linear weight [rows, cols] on a per-(row, group) integer grid.

    Dequantized weight: W[r, c] = scales[r, g(c)] · (codes[r, c] − zeros[r, g(c)]), where g(c) is `g_idx[c]`
    when act-order permuted the grouping and c // group_size otherwise. Codes keep the original column order.
    """

    codes: torch.Tensor  # uint8 [rows, cols], values in [0, 2^bits − 1]
    scales: torch.Tensor  # fp16 [rows, groups]
    zeros: torch.Tensor | None  # uint8 [rows, groups]; None when symmetric (zero fixed at 2^(bits−1))
    bits: int
    group_size: int | None  # None = one group per row
    g_idx: torch.Tensor | None = None  # int32 [cols]; only when act-order reorders groups
    loss: float | None = None  # the method's own proxy loss (GPTQ: Σ (w − q)² / [H⁻¹]_ii² / 2)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def group_index(self) -> torch.Tensor:
        """Group of every input column (int64 [cols])."""
        cols = self.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        if self.group_size is None:
            return torch.zeros(cols, dtype=torch.long, device=self.codes.device)
        return torch.arange(cols, device=self.codes.device) // self.group_size

    def zero_points(self) -> torch.Tensor:
        """Zero points as float [rows, groups], including the implied symmetric one."""
        if self.zeros is not None:
            return self.zeros.float()
        return torch.full(self.scales.shape, float(2 ** (self.bits - 1)), device=self.scales.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        idx = self.group_index()
        scale = self.scales.float()[:, idx]
        zero = self.zero_points()[:, idx]
        return (scale * (self.codes.float() - zero)).to(dtype)

    def storage_bits(self) -> int:
        rows, cols = self.shape
        return layer_storage_bits(rows, cols, self.bits, self.group_size, self.zeros is None, self.g_idx is not None)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": pack_codes(self.codes.cpu(), self.bits), "scales": self.scales.cpu().contiguous()}
        if self.zeros is not None:
            out["qzeros"] = pack_codes(self.zeros.cpu(), self.bits)
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx.cpu().contiguous()
        return out

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.zeros is None,
                "g_idx": self.g_idx is not None}

    @classmethod
    def from_tensors(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     ) -> UniformLayer:
        bits, group_size = int(meta["bits"]), meta["group_size"]
        groups = (shape[0], 1 if group_size is None else -(-shape[1] // group_size))
        return cls(
            codes=unpack_codes(tensors["qweight"], bits, shape),
            scales=tensors["scales"],
            zeros=None if meta["sym"] else unpack_codes(tensors["qzeros"], bits, groups),
            bits=bits,
            group_size=group_size,
            g_idx=tensors.get("g_idx"),
        )
