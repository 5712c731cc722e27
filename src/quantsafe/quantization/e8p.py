"""QuIP#'s E8P12 codebook (algorithms.md §4.4): 2¹⁶ points of the shifted lattice E₈ + ¼, a 16-bit code per
8 weights, and its two-stage residual form for 4 bits (§4.5).

Points: ±¼ + v with v ∈ D̂₈ = {(Z + ½)⁸, even coordinate sum} and |v| in a 256-vector source set S (the 227
|v| with ‖v‖² ≤ 10 plus 29 padding patterns of norm² 12). Negating coordinate i changes the sum by the odd
integer 2|v_i|, so a sign pattern keeps v in D̂₈ iff #negatives ≡ Σ|v| (mod 2): 7 free sign bits per |v|.

Our code layout (the paper's 8 + 7 + 1 bits): bits 15..8 index S, bits 0..6 are the signs of coordinates 0..6
(1 = negative; coordinate 7's sign follows from the parity rule), bit 7 is the shift (1 → −¼, 0 → +¼).
Codes are stored as int16 (the same 16 bits, two's complement).

Nearest point, exactly and without 2¹⁶ distances (§4.4 item 6, in a cheaper form): per shift, the best
signs for a given |v| = s are those of the input unless the parity is wrong, then the coordinate with the
smallest |y_i|·s_i flips (costing 4·|y_i|·s_i). Because the 227 ball vectors are closed under permutation,
sorting |y| leaves only 7 coordinate multisets to score for them (rearrangement inequality); the 29 padding
patterns are scored one by one. Checked against brute force over all 2¹⁶ codewords in the tests.
"""

from __future__ import annotations

from functools import cache

import torch

DIM = 8
CODES = 1 << 16
SIGN_BITS = 7
SHIFT_BIT = 7
SHIFT = 0.25

# The 29 norm² 12 padding patterns (five 3/2 and three 1/2), doubled; as in quip-sharp's
# lib/codebook/latticee8_padded12.py (and the paper's App. C.1).
_PADDING_X2 = (
    (3, 1, 1, 1, 3, 3, 3, 3), (1, 3, 1, 1, 3, 3, 3, 3), (1, 1, 3, 1, 3, 3, 3, 3), (1, 1, 1, 3, 3, 3, 3, 3),
    (3, 3, 3, 1, 3, 3, 1, 1), (3, 3, 3, 1, 3, 1, 3, 1), (3, 3, 3, 1, 1, 3, 3, 1), (3, 3, 3, 1, 3, 1, 1, 3),
    (3, 3, 3, 1, 1, 3, 1, 3), (3, 3, 3, 1, 1, 1, 3, 3), (3, 3, 1, 3, 3, 3, 1, 1), (3, 3, 1, 3, 3, 1, 3, 1),
    (3, 3, 1, 3, 1, 3, 3, 1), (3, 3, 1, 3, 3, 1, 1, 3), (3, 3, 1, 3, 1, 3, 1, 3), (3, 3, 1, 3, 1, 1, 3, 3),
    (3, 1, 3, 3, 3, 3, 1, 1), (3, 1, 3, 3, 3, 1, 3, 1), (3, 1, 3, 3, 1, 3, 3, 1), (3, 1, 3, 3, 3, 1, 1, 3),
    (3, 1, 3, 3, 1, 3, 1, 3), (1, 3, 3, 3, 1, 1, 3, 3), (1, 3, 3, 3, 3, 3, 1, 1), (1, 3, 3, 3, 3, 1, 3, 1),
    (1, 3, 3, 3, 1, 3, 3, 1), (1, 3, 3, 3, 3, 1, 1, 3), (1, 3, 3, 3, 1, 3, 1, 3), (1, 1, 3, 3, 1, 3, 3, 3),
    (3, 3, 1, 1, 3, 3, 3, 1),
)
_DIGITS = 3  # every coordinate of S is ½, 3/2 or 5/2 (7/2 alone has norm² > 10)


def _source_set_cpu() -> torch.Tensor:
    """S [256, 8]: the |v| of D̂₈ with ‖v‖² ≤ 10 (every such |v| admits valid signs), sorted, then padding."""
    halves = torch.tensor([0.5, 1.5, 2.5])
    grid = torch.cartesian_prod(*[halves] * DIM)
    small = grid[grid.square().sum(dim=1) <= 10]
    return torch.cat([small, torch.tensor(_PADDING_X2, dtype=torch.float32) / 2])


@cache
def _tables(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S [256, 8], Σ S mod 2 [256] int64, base-3 key Σ (|v_i| − ½)·3^i → S index or −1 [3⁸],
    decode table [2¹⁶, 8])."""
    dev = torch.device(device)
    source = _source_set_cpu()
    odd = (source.sum(dim=1).round().long() % 2)
    lut = torch.full((_DIGITS**DIM,), -1, dtype=torch.long)
    keys = ((source - 0.5) * _DIGITS ** torch.arange(DIM)).sum(dim=1).round().long()
    lut[keys] = torch.arange(len(source))
    table = _decode_cpu(torch.arange(CODES), source, odd)
    return source.to(dev), odd.to(dev), lut.to(dev), table.to(dev)


@cache
def _patterns(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the 7 coordinate multisets of the ball part, sorted descending [7, 8], their coordinate sums mod 2,
    the 29 padding patterns [29, 8], the base-3 digit weights 3^i [8] as floats)."""
    source = _source_set_cpu()
    ball, padding = source[: -len(_PADDING_X2)], source[-len(_PADDING_X2) :]
    multisets = torch.unique(ball.sort(dim=1, descending=True).values, dim=0)
    odd = multisets.sum(dim=1).round().long() % 2
    pow3 = (_DIGITS ** torch.arange(DIM)).float()
    return multisets.to(device), odd.to(device), padding.to(device), pow3.to(device)


def _decode_cpu(codes: torch.Tensor, source: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    idx = codes >> 8
    bits = (codes[:, None] >> torch.arange(SIGN_BITS)) & 1
    neg7 = (odd[idx] + bits.sum(dim=1)) % 2
    neg = torch.cat([bits, neg7[:, None]], dim=1)
    shift = torch.where((codes >> SHIFT_BIT) & 1 == 1, -SHIFT, SHIFT)
    return source[idx] * (1 - 2 * neg).float() + shift[:, None]


def source_set(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 absolute-value vectors S [256, 8]."""
    return _tables(str(torch.device(device)))[0]


def decode_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """All 2¹⁶ codewords [65536, 8] fp32, indexed by the unsigned 16-bit code."""
    return _tables(str(torch.device(device)))[3]


def to_int16(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 16-bit codes (any int dtype) → int16 with the same bits."""
    c = codes.to(torch.int32)
    return torch.where(c >= 1 << 15, c - CODES, c).to(torch.int16)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Codewords of int16/int32 codes [...] → fp32 [..., 8]."""
    table = decode_table(codes.device)
    return table[codes.to(torch.int64) & (CODES - 1)]


def _encode(src_idx: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Code without the shift bit: S index in the high byte, signs of coordinates 0..6 in bits 0..6."""
    weights = 1 << torch.arange(SIGN_BITS, device=neg.device)
    return (src_idx << 8) | (neg[:, :SIGN_BITS].long() * weights).sum(dim=1)


def _nearest_coset(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest v ∈ D̂₈ with |v| ∈ S to each row of y, by exhaustive search over S without enumerating it.

    The 227 ball vectors are closed under permutation, so by the rearrangement inequality the best |v| of a
    given multiset of coordinates pairs the largest |y_i| with its largest coordinates; that sorted pairing
    also puts the smallest |y_i| against a ½, the cheapest sign flip when the parity is wrong (cost 4·a_i·s_i).
    So only the 7 sorted multisets are scored, plus the 29 padding patterns (not permutation-closed, all of
    coordinate sum 9) one by one. Returns (v, S index, ‖y − v‖²)."""
    _, _, lut, _ = _tables(str(y.device))
    multisets, ms_odd, padding, pow3 = _patterns(str(y.device))
    a = y.abs()
    neg = y < 0
    parity = neg.sum(dim=1, keepdim=True) % 2
    a_sorted, order = a.sort(dim=1, descending=True)
    ms_wrong = parity != ms_odd[None, :]
    ms_cost = torch.addmm(multisets.square().sum(dim=1)[None, :], a_sorted, multisets.T, alpha=-2)
    ms_cost += ms_wrong * (2 * a_sorted[:, -1:])
    ms_best_cost, ms_best = ms_cost.min(dim=1)

    pad_wrong = parity[:, 0] == 0
    pad_cost = torch.addmm(padding.square().sum(dim=1)[None, :], a, padding.T, alpha=-2)
    pad_best_cost, pad_best = pad_cost.min(dim=1)
    # the parity term only where the padding could still win (scoring the flips is the costly part)
    costly = (pad_wrong & (pad_best_cost < ms_best_cost)).nonzero().squeeze(1)
    pad_at = order[:, -1].clone()
    if len(costly):
        flip_cost, flip_at = (a[costly, None, :] * padding[None, :, :]).min(dim=2)
        cost = pad_cost[costly] + 4 * flip_cost
        pad_best_cost[costly], pad_best[costly] = cost.min(dim=1)
        pad_at[costly] = flip_at.gather(1, pad_best[costly, None])[:, 0]
    use_pad = pad_best_cost < ms_best_cost  # rows with a wrong parity and no flip scored never pass this

    absval = torch.where(use_pad[:, None], padding[pad_best],
                         torch.empty_like(a).scatter_(1, order, multisets[ms_best]))
    flip = torch.where(use_pad, pad_wrong, ms_wrong.gather(1, ms_best[:, None])[:, 0])
    # the ball patterns flip the smallest |y_i|, order[:, -1], too
    neg ^= (torch.arange(DIM, device=y.device) == pad_at[:, None]) & flip[:, None]
    v = torch.where(neg, -absval, absval)
    idx = lut[((absval - 0.5) * pow3).sum(dim=1).round().long()]
    return v, idx, a.square().sum(dim=1) + torch.minimum(ms_best_cost, pad_best_cost)


def quantize_e8p(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E8P12 codeword of each row of x [N, 8] (fp32): (codeword [N, 8], unsigned code int64 [N])."""
    x = x.float()
    n = len(x)
    shifts = torch.tensor([SHIFT, -SHIFT], device=x.device)
    v, idx, cost = _nearest_coset((x[None] - shifts[:, None, None]).reshape(2 * n, DIM))
    use_minus = cost[n:] < cost[:n]
    code = _encode(idx, v < 0) | (torch.arange(2, device=x.device) << SHIFT_BIT).repeat_interleave(n)
    point = v + shifts.repeat_interleave(n)[:, None]
    return torch.where(use_minus[:, None], point[n:], point[:n]), torch.where(use_minus, code[n:], code[:n])


def quantize_rvq(x: torch.Tensor, stages: int, resid_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`stages`-stage residual E8P (§4.5): stage k quantizes the remaining error × resid_scale^k.

    Returns (the reconstruction [N, 8], unsigned codes int64 [N, stages]); the reconstruction is computed exactly
    as `dequantize_rvq` does, so it is bit-identical to what the stored codes decode to."""
    codes = []
    recon: torch.Tensor | None = None
    for k in range(stages):
        target = x if recon is None else (x - recon) * resid_scale**k
        point, code = quantize_e8p(target)
        codes.append(code)
        recon = point if recon is None else recon + point / resid_scale**k
    assert recon is not None
    return recon, torch.stack(codes, dim=1)


def dequantize_rvq(codes: torch.Tensor, resid_scale: float) -> torch.Tensor:
    """Codes [..., stages] → reconstruction [..., 8], as `quantize_rvq` computes it."""
    points = decode(codes)
    recon = points[..., 0, :]
    for k in range(1, codes.shape[-1]):
        recon = recon + points[..., k, :] / resid_scale**k
    return recon
