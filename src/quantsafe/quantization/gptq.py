"""GPTQ (Frantar et al., ICLR 2023): quantize columns one at a time and push each rounding error onto the
not-yet-quantized columns through the inverse Hessian of the layer inputs (algorithms.md §1)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.base import LayerStats, Quantizer, QuantResult, register_quantizer
from quantsafe.quantization.uniform import fit_grid

if TYPE_CHECKING:
    from quantsafe.quantization.config import QuantConfig

DAMP_RETRIES = 10  # each retry multiplies the dampening by 10


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the column loop single-threaded: its ops are tiny, and with 2 OpenMP threads on a busy 2-core
    machine every op waits for a descheduled worker (measured 40x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GPTQOptions(BaseModel):
    """GPTQ's knobs, with the reference code's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    damp_percent: float = Field(0.01, gt=0)
    act_order: bool = True
    block_size: int = Field(128, ge=1)
    true_sequential: bool = True


def _upper_inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper factor U with H⁻¹ = UᵀU of the dampened H; raise the dampening ×10 while factorisation fails."""
    n = h.shape[0]
    damp = damp_percent * torch.mean(torch.diag(h)).item()
    eye = torch.eye(n, dtype=h.dtype)
    for _ in range(DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return upper
        damp *= 10
    raise QuantsafeError(f"GPTQ: Hessian is not positive definite even with dampening {damp:.3g}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    sym: bool,
    options: GPTQOptions,
) -> QuantResult:
    """Quantize `weight` [rows, cols] against the proxy Hessian `hessian` [cols, cols] (any positive scale).

    Groups are fitted when their first column is reached, on the columns as already updated by earlier
    errors; with act-order the groups follow the permuted order and the result carries `g_idx`. The lazy-batch
    block is rounded to a multiple of the group size: every group lies inside one block and sees all updates.
    """
    with _one_thread():
        return _gptq(weight, hessian, bits, group_size, sym, options)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    sym: bool,
    options: GPTQOptions,
) -> QuantResult:
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    perm: torch.Tensor | None = None
    if options.act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    u = _upper_inverse_cholesky(h, options.damp_percent)
    del h

    g = cols if group_size is None else group_size
    block = max(1, options.block_size // g) * g if group_size is not None else options.block_size
    n_groups = -(-cols // g)
    scales = torch.empty(rows, n_groups)
    zeros = torch.empty(rows, n_groups)
    codes_t = torch.empty(cols, rows)  # transposed buffers: row writes are contiguous, column writes are slow
    loss = torch.zeros(rows)
    if group_size is None:
        scale, zero = fit_grid(w, bits, sym)
        scales[:, 0], zeros[:, 0] = scale, zero

    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_blk = w[:, start:end].clone()
        err_t = torch.empty(end - start, rows)
        u_blk = u[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if group_size is not None and col % g == 0:
                scale, zero = fit_grid(w_blk[:, i : i + g], bits, sym)
                scales[:, col // g], zeros[:, col // g] = scale, zero
            wc = w_blk[:, i].contiguous()  # elementwise ops on a strided column are ~1000x slower on CPU
            q = torch.clamp(torch.round(wc / scale) + zero, 0, 2**bits - 1)
            codes_t[col] = q
            err = (wc - scale * (q - zero)) / u_blk[i, i]
            loss += err.square() / 2
            w_blk[:, i + 1 :].addmm_(err[:, None], u_blk[i : i + 1, i + 1 :], alpha=-1)
            err_t[i] = err
        if end < cols:
            w[:, end:].addmm_(err_t.T, u[start:end, end:], alpha=-1)

    codes = codes_t.T
    g_idx: torch.Tensor | None = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if group_size is not None:
            g_idx = (torch.arange(cols) // g)[inv].to(torch.int32)
    return QuantResult(
        codes=codes.to(torch.uint8),
        scales=scales.half(),
        zeros=None if sym else zeros.to(torch.uint8),
        bits=bits,
        group_size=group_size,
        g_idx=g_idx,
        loss=float(loss.sum()),
    )


@register_quantizer("gptq")
class GPTQQuantizer(Quantizer):
    """GPTQ with act-order, groups, dampening and lazy batch updates.

    Sample YAML::

        method: gptq
        bits: 4
        group_size: 64
        options: {damp_percent: 0.01, act_order: true, block_size: 128, true_sequential: true}
        calibration: {source: wikitext2, n_samples: 128, seq_len: 512}
    """

    needs_calibration = True
    Options = GPTQOptions

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.options = GPTQOptions.model_validate(self.config.options)

    @property
    def true_sequential(self) -> bool:
        return self.options.true_sequential

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None = None) -> QuantResult:
        if stats is None:
            raise QuantsafeError("GPTQ needs calibration statistics (the layer's input Hessian)")
        return gptq_quantize(
            weight, stats.xtx, self.config.bits, self.config.group_size, self.config.sym, self.options
        )
