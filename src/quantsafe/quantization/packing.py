"""Bit-packing of integer codes into bytes, for any width from 1 to 8 bits.

The codes (row-major) form one little-endian bit stream: code j occupies bits j·b … j·b + b − 1, least
significant bit first, and the stream is cut into bytes. So 4 codes of 2 bits fill one byte, 8 codes of 3 bits
fill 3 bytes, and storage is exactly `bits` per code plus under one byte of padding per tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"can only pack 1..8-bit codes, got {bits}")


def packed_size(n_codes: int, bits: int) -> int:
    """Number of bytes `pack_codes` produces for `n_codes` codes."""
    _check_bits(bits)
    return -(-n_codes * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in [0, 2^bits)) into a flat uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    as_bytes = flat.to(torch.uint8).numpy()[:, None]
    stream = np.unpackbits(as_bytes, axis=1, count=bits, bitorder="little")  # [n, bits], LSB first
    return torch.from_numpy(np.packbits(stream.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes of the given shape."""
    n = math.prod(shape)
    if packed.numel() != packed_size(n, bits):
        raise ValueError(f"packed data has {packed.numel()} bytes, expected {packed_size(n, bits)} for {n} codes")
    stream = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    codes = np.packbits(stream, axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(codes).reshape(tuple(shape))
