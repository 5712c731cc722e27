"""Bit-packing of integer codes into bytes, for any width from 1 to 8 bits.

k = 8 / gcd(8, bits) consecutive codes fill exactly k·bits/8 bytes (4 codes of 2 bits → 1 byte, 8 codes of
3 bits → 3 bytes), so storage is exactly `bits` per code plus at most k − 1 codes of padding. Bytes are
little-endian within each k-code word, codes in row-major order.
"""

from __future__ import annotations

import math

import torch


def _word(bits: int) -> tuple[int, int]:
    if not 1 <= bits <= 8:
        raise ValueError(f"can only pack 1..8-bit codes, got {bits}")
    codes_per_word = 8 // math.gcd(8, bits)
    return codes_per_word, codes_per_word * bits // 8


def packed_size(n_codes: int, bits: int) -> int:
    """Number of bytes `pack_codes` produces for `n_codes` codes."""
    per_word, bytes_per_word = _word(bits)
    return -(-n_codes // per_word) * bytes_per_word


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in [0, 2^bits)) into a flat uint8 tensor."""
    per_word, bytes_per_word = _word(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    pad = (-flat.numel()) % per_word
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (flat.reshape(-1, per_word) << shifts).sum(dim=1)  # at most 56 bits: fits int64
    byte_shifts = torch.arange(bytes_per_word, dtype=torch.int64) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes of the given shape."""
    per_word, bytes_per_word = _word(bits)
    n = math.prod(shape)
    if packed.numel() != packed_size(n, bits):
        raise ValueError(
            f"packed data has {packed.numel()} bytes, expected {packed_size(n, bits)} for {n} codes"
        )
    byte_shifts = torch.arange(bytes_per_word, dtype=torch.int64) * 8
    words = (packed.to(torch.int64).reshape(-1, bytes_per_word) << byte_shifts).sum(dim=1)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (words[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:n].to(torch.uint8).reshape(tuple(shape))
