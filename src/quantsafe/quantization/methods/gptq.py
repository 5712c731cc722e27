"""GPTQ (Frantar et al., ICLR 2023): quantize columns one at a time and push each rounding error onto the
not-yet-quantized columns through the inverse Hessian of the layer inputs (algorithms.md §1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.base import LayerStats, Quantizer, register_quantizer
from quantsafe.quantization.uniform import UniformLayer, fit_grid

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
    """GPTQ's knobs. Defaults follow the reference code except two choices, measured at g64 (ablations in
    bench/results/quantize.json): static groups, llm-compressor's default (SmolLM2 W4 ppl 30.36 vs 30.87 with
    groups refitted on the updated columns; but Qwen-0.5B W4 37.52 vs 37.16, so neither wins everywhere) and
    no true-sequential (SmolLM2 W4 30.20 vs 30.36, and 20% faster)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    damp_percent: float = Field(0.01, gt=0)
    act_order: bool = True
    block_size: int = Field(128, ge=1)
    true_sequential: bool = False
    # Fit every group's scale/zero on the original contiguous columns before GPTQ runs (no g_idx needed)
    # instead of on the error-updated columns when the group is reached in act-order.
    static_groups: bool = True


def _upper_inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper factor U with H⁻¹ = UᵀU of the dampened H; raise the dampening ×10 while factorisation fails."""
    n = h.shape[0]
    damp = damp_percent * torch.mean(torch.diag(h)).item()
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    for _ in range(DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return upper
        damp *= 10
    raise QuantsafeError(f"GPTQ: Hessian is not positive definite even with dampening {damp:.3g}")


@dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ derives from H alone, shared by the Linears that read the same input (q/k/v, gate/up)."""

    dead: torch.Tensor  # bool [cols]: inputs that were always zero
    perm: torch.Tensor | None  # act-order column order, or None
    u: torch.Tensor  # upper Cholesky factor of the dampened, permuted H⁻¹


def prepare_hessian(hessian: torch.Tensor, options: GPTQOptions) -> PreparedHessian:
    """Dead inputs → H_ii = 1; act-order permutation by descending diag(H); dampened inverse Cholesky.

    All threads here, unlike the column loop: three O(n³) factorisations of a 4864² Hessian are big enough to
    use both cores (measured 2.4 s → 1.3 s per down_proj on an AVX2 2-core machine)."""
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if options.act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    return PreparedHessian(dead=dead, perm=perm, u=_upper_inverse_cholesky(h, options.damp_percent))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    bits: int,
    group_size: int | None,
    sym: bool,
    options: GPTQOptions,
) -> UniformLayer:
    """Quantize `weight` [rows, cols] against the proxy Hessian [cols, cols] (any positive scale).

    Groups are fitted when their first column is reached, on the columns as already updated by earlier
    errors; with act-order the groups follow the permuted order and the result carries `g_idx`. The lazy-batch
    block is rounded to a multiple of the group size: every group lies inside one block and sees all updates.
    With `options.static_groups` the groups are fitted up front on the original contiguous columns instead.
    """
    prepared = hessian if isinstance(hessian, PreparedHessian) else prepare_hessian(hessian, options)
    static = options.static_groups and group_size is not None
    return _gptq(weight, prepared, bits, group_size, sym, options.block_size, static)


GridAt = Callable[[int, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor] | None"]
"""(processed column, the current lazy block, the column's index in it) → the per-row (scale, zero) from this
column on, or None to keep the current one; called once per column, first for column 0."""


def fixed_grid(scale: torch.Tensor, zero: torch.Tensor) -> GridAt:
    """One per-row grid for every column (no groups)."""
    return lambda col, w_blk, i: (scale, zero) if col == 0 else None


def gptq_columns(
    w: torch.Tensor, u: torch.Tensor, bits: int, block_size: int, grid_at: GridAt, stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's lazy-batch column loop over `w` [rows, cols] (fp32, already in processing order; updated in place)
    with the upper factor `u` of H⁻¹ in the same order; codes are clamp(round(w/scale) + zero, 0, 2^bits − 1).

    Quantizes the first `stop` columns (all by default) and returns their codes, transposed [stop, rows], and
    the per-row loss Σ (w − q)² / U_ii² / 2. Afterwards w[:, stop:] holds the remaining columns with every
    error update applied (QUIK keeps them in 16 bits).
    """
    rows, cols = w.shape
    stop = cols if stop is None else stop
    dev = w.device
    # transposed buffers: row writes are contiguous, column writes are slow
    codes_t = torch.empty(stop, rows, device=dev)
    loss = torch.zeros(rows, device=dev)
    maxq = 2**bits - 1
    with _one_thread():
        for start in range(0, stop, block_size):
            end = min(start + block_size, stop)
            w_blk = w[:, start:end].clone()
            err_t = torch.empty(end - start, rows, device=dev)
            u_blk = u[start:end, start:end]
            for i in range(end - start):
                col = start + i
                grid = grid_at(col, w_blk, i)
                if grid is not None:
                    scale, zero = grid
                # a contiguous copy: elementwise ops on a strided column are ~1000x slower on CPU; in-place after
                wc = w_blk[:, i].contiguous()
                q = torch.round(wc / scale).add_(zero).clamp_(0, maxq)
                codes_t[col] = q
                err = wc.sub_((q - zero).mul_(scale)).div_(u_blk[i, i])
                w_blk[:, i + 1 :].addmm_(err[:, None], u_blk[i : i + 1, i + 1 :], alpha=-1)
                err_t[i] = err
            loss += err_t.square().sum(dim=0) / 2
            if end < cols:
                w[:, end:].addmm_(err_t.T, u[start:end, end:], alpha=-1)
    return codes_t, loss


def _gptq(
    weight: torch.Tensor,
    prepared: PreparedHessian,
    bits: int,
    group_size: int | None,
    sym: bool,
    block_size: int,
    static_groups: bool,
) -> UniformLayer:
    w = weight.detach().float().clone()
    rows, cols = w.shape
    w[:, prepared.dead] = 0
    perm, u = prepared.perm, prepared.u
    g = cols if group_size is None else group_size
    n_groups = -(-cols // g)
    dev = w.device
    scales = torch.empty(rows, n_groups, device=dev)
    zeros = torch.empty(rows, n_groups, device=dev)
    if static_groups:
        for k in range(n_groups):
            scales[:, k], zeros[:, k] = fit_grid(w[:, k * g : (k + 1) * g], bits, sym)
        order = perm if perm is not None else torch.arange(cols, device=dev)
        # per processed column: its original group; scales/zeros transposed so a group's row is contiguous
        col_group, scales_t, zeros_t = (order // g).tolist(), scales.T.contiguous(), zeros.T.contiguous()
    if perm is not None:
        w = w[:, perm]
    block = max(1, block_size // g) * g if group_size is not None and not static_groups else block_size

    def group_grid(col: int, w_blk: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if static_groups:
            return scales_t[col_group[col]], zeros_t[col_group[col]]
        if col % g:
            return None
        scale, zero = fit_grid(w_blk[:, i : i + g], bits, sym)
        scales[:, col // g], zeros[:, col // g] = scale, zero
        return scale, zero

    grid_at: GridAt = group_grid
    if group_size is None:
        scales[:, 0], zeros[:, 0] = fit_grid(w, bits, sym)
        grid_at = fixed_grid(scales[:, 0], zeros[:, 0])

    codes_t, loss = gptq_columns(w, u, bits, block, grid_at)
    codes = codes_t.T
    g_idx: torch.Tensor | None = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if group_size is not None and not static_groups:
            g_idx = (torch.arange(cols, device=dev) // g)[inv].to(torch.int32)
    return UniformLayer(
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
        options: {damp_percent: 0.01, act_order: true, block_size: 128, true_sequential: false,
                  static_groups: true}
        calibration: {source: wikitext2, n_samples: 128, seq_len: 512}
    """

    version = 1
    needs_calibration = True
    stats = frozenset({"xtx"})
    Options = GPTQOptions

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.options = GPTQOptions.model_validate(self.config.options)
        self._prepared: tuple[LayerStats, PreparedHessian] | None = None

    @property
    def true_sequential(self) -> bool:
        return self.options.true_sequential

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> UniformLayer:
        if stats is None:
            raise QuantsafeError("GPTQ needs calibration statistics (the layer's input Hessian)")
        # The pipeline hands Linears that share an input the same LayerStats object: factor H once for them.
        if self._prepared is None or self._prepared[0] is not stats:
            if stats.xtx is None:
                raise QuantsafeError("GPTQ needs the layer's x xᵀ statistics")
            self._prepared = (stats, prepare_hessian(stats.xtx, self.options))
        return gptq_quantize(
            weight, self._prepared[1], self.bits_for(name), self.config.group_size, self.config.sym, self.options
        )
