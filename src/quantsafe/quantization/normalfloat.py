"""NormalFloat (NF-k) grids and their storage form `NFLayer`: QLoRA's frozen base (algorithms.md §7).

NF4 is bitsandbytes' 4-bit NormalFloat: 2^(k−1) positive levels Φ⁻¹(linspace(δ, ½, 2^(k−1) + 1)[:-1]), 2^(k−1) − 1
negative ones −Φ⁻¹(linspace(δ, ½, 2^(k−1))[:-1]), and an exact 0, normalised by the largest, with δ = 0.9677083
= 1 − ½(1/30 + 1/32). For 3 and 2 bits the same construction runs with 2^k levels and the *same* δ, which is how
LoftQ's NF2/NF3 quantizer (the published QLoRA-style 2-bit base) builds them; QLoRA itself defines only NF4. So
NF3 has 4 positive and 3 negative levels, NF2 is {−1, 0, 0.3379, 1}.

A weight is cut into blocks of `block_size` consecutive weights along each row (QLoRA: 64; identical to
bitsandbytes' blocks over the flattened tensor whenever the row length is a multiple of the block), each with
its absmax; a code is the nearest level to w/absmax. Double quantization (QLoRA's default) stores the absmax
values as 8-bit codes of bitsandbytes' signed "dynamic" 8-bit map, after subtracting their mean, in blocks of
256 absmax values with one fp32 scale each: 8 + 32/256 bits per block instead of 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from quantsafe.quantization.base import QuantizedLayer, register_layer_format
from quantsafe.quantization.packing import pack_codes, unpack_codes

NF_OFFSET = 0.9677083  # 1 − ½(1/30 + 1/32): bitsandbytes' outermost quantile for NF4, kept for NF2/NF3 (LoftQ)
ABSMAX_BITS = 32  # fp32 absmax per block without double quantization
DQ_BLOCK = 256  # absmax values per double-quantization block (QLoRA)
DQ_CODE_BITS = 8
DQ_SCALE_BITS = 32  # fp32 scale per double-quantization block
DQ_OFFSET_BITS = 32  # fp32 mean of the absmax values, one per matrix


@cache
def _nf_levels_cpu(bits: int) -> torch.Tensor:
    half = 2 ** (bits - 1)
    # fp32 quantile points, fp64 Φ⁻¹: bitsandbytes' arithmetic, so NF4 matches its table to fp32 rounding
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half)[:-1].double())
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (levels / levels.max()).float()


def nf_levels(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 2^bits NF levels in ascending order (fp32), from −1 to 1 with an exact 0."""
    if not 2 <= bits <= 8:
        raise ValueError(f"NF grids are defined here for 2..8 bits, got {bits}")
    return _nf_levels_cpu(bits).to(device)


@cache
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (Dettmers 2016): for each decade 10^(i−6), i = 0..6, the 2^i
    midpoints of an even split of [0.1, 1], with both signs; plus 0 and 1. 256 ascending values."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + [-m for m in means]
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 levels double quantization codes absmax values with."""
    return _dynamic_map_cpu().to(device)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest of the ascending `levels` for every element of `x` (ties go down)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids, right=False)


def _blocks(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """`w` [rows, cols] as [rows, n_blocks, block_size]; a partial last block is padded with zeros (which change
    no absmax and are never stored)."""
    rows, cols = w.shape
    n_blocks = -(-cols // block_size)
    pad = n_blocks * block_size - cols
    if pad:
        w = torch.cat([w, w.new_zeros(rows, pad)], dim=1)
    return w.reshape(rows, n_blocks, block_size), n_blocks


@dataclass
class DoubleQuantized:
    """absmax values (flattened) as 8-bit dynamic-map codes around their mean, one fp32 scale per 256."""

    codes: torch.Tensor  # uint8 [n]
    scales: torch.Tensor  # fp32 [ceil(n / 256)]
    offset: torch.Tensor  # fp32 [1]: the mean absmax, subtracted before coding

    @classmethod
    def encode(cls, absmax: torch.Tensor) -> DoubleQuantized:
        flat = absmax.reshape(-1).float()
        offset = flat.mean().reshape(1)
        centred = flat - offset
        n = centred.numel()
        pad = -n % DQ_BLOCK
        grouped = torch.cat([centred, centred.new_zeros(pad)]).reshape(-1, DQ_BLOCK)
        scales = grouped.abs().amax(dim=1)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = nearest_level((grouped / safe[:, None]).reshape(-1)[:n], dynamic_map(absmax.device))
        return cls(codes=codes.to(torch.uint8), scales=scales, offset=offset)

    def decode(self) -> torch.Tensor:
        """The absmax values (fp32, flat) the dequantized weight uses."""
        n = self.codes.numel()
        scale = self.scales.repeat_interleave(DQ_BLOCK)[:n]
        return dynamic_map(self.codes.device)[self.codes.long()] * scale + self.offset

    def storage_bits(self) -> int:
        return self.codes.numel() * DQ_CODE_BITS + self.scales.numel() * DQ_SCALE_BITS + DQ_OFFSET_BITS


@register_layer_format("normalfloat")
@dataclass
class NFLayer(QuantizedLayer):
    """A Linear weight [rows, cols] as NF-k codes per block of `block_size` weights along a row.

    W[r, c] = levels[codes[r, c]] · absmax[r, c // block_size], where absmax is stored in fp32 or, with
    double quantization, decoded from `dq`.
    """

    codes: torch.Tensor  # uint8 [rows, cols], indices into nf_levels(bits)
    absmax: torch.Tensor | None  # fp32 [rows, n_blocks]; None when double-quantized
    dq: DoubleQuantized | None
    bits: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def n_blocks(self) -> int:
        return -(-self.shape[1] // self.block_size)

    def block_absmax(self) -> torch.Tensor:
        """absmax per block as the dequantized weight uses it (fp32 [rows, n_blocks])."""
        if self.dq is not None:
            return self.dq.decode().reshape(self.shape[0], self.n_blocks)
        assert self.absmax is not None
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        levels = nf_levels(self.bits, self.codes.device)
        scale = self.block_absmax().repeat_interleave(self.block_size, dim=1)[:, : self.shape[1]]
        return (levels[self.codes.long()] * scale).to(dtype)

    def storage_bits(self) -> int:
        rows, cols = self.shape
        meta_bits = self.dq.storage_bits() if self.dq is not None else rows * self.n_blocks * ABSMAX_BITS
        return rows * cols * self.bits + meta_bits

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": pack_codes(self.codes.cpu(), self.bits)}
        if self.dq is not None:
            out |= {"absmax_codes": self.dq.codes.cpu().contiguous(), "absmax_scales": self.dq.scales.cpu(),
                    "absmax_offset": self.dq.offset.cpu()}
        else:
            assert self.absmax is not None
            out["absmax"] = self.absmax.cpu().contiguous()
        return out

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "double_quant": self.dq is not None}

    @classmethod
    def from_tensors(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     ) -> NFLayer:
        bits = int(meta["bits"])
        dq = None
        if meta["double_quant"]:
            dq = DoubleQuantized(codes=tensors["absmax_codes"], scales=tensors["absmax_scales"],
                                 offset=tensors["absmax_offset"])
        return cls(codes=unpack_codes(tensors["qweight"], bits, shape), absmax=tensors.get("absmax"), dq=dq,
                   bits=bits, block_size=int(meta["block_size"]))


def nf_quantize(weight: torch.Tensor, bits: int, block_size: int = 64, double_quant: bool = True) -> NFLayer:
    """Blockwise absmax NF-k quantization of `weight` [rows, cols] (QLoRA's base). Codes are chosen against the
    exact fp32 absmax and the absmax is compressed afterwards, as bitsandbytes does."""
    w = weight.detach().float()
    rows, cols = w.shape
    blocks, n_blocks = _blocks(w, block_size)
    absmax = blocks.abs().amax(dim=2)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = nearest_level(blocks / safe[..., None], nf_levels(bits, w.device))
    codes = codes.reshape(rows, n_blocks * block_size)[:, :cols].to(torch.uint8)
    if double_quant:
        return NFLayer(codes=codes, absmax=None, dq=DoubleQuantized.encode(absmax), bits=bits, block_size=block_size)
    return NFLayer(codes=codes, absmax=absmax, dq=None, bits=bits, block_size=block_size)


def nf_bits_per_weight(bits: int, block_size: int, double_quant: bool) -> float:
    """Asymptotic storage per weight (algorithms.md §8: NF4 g64 is 4.5 without DQ, ≈ 4.127 with)."""
    if double_quant:
        return bits + (DQ_CODE_BITS + DQ_SCALE_BITS / DQ_BLOCK) / block_size
    return bits + ABSMAX_BITS / block_size

