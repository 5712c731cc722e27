"""AQLM (Egiazarian et al., ICML 2024): additive vector quantization (algorithms.md §5).

Each row of a Linear is cut into groups of `in_group_size` (g = 8) consecutive inputs; a group is stored as M codes,
one per codebook, and rebuilt as s_i · Σ_m C_m[b_{i,j,m}] with M codebooks of 2^B vectors of size g per Linear and
one scale per output row. Per Linear: residual k-means init on W / s, then epochs of Adam on codebooks and scales
(codes fixed) followed by one greedy coordinate-descent ("beam size 1") pass over all (group, codebook) codes, both
minimising the layer output error tr(ΔW XXᵀ ΔWᵀ)/rows. Optional block fine-tuning of codebooks, scales, norms and
biases against the full-precision block's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.base import (
    LayerStats,
    QuantizedLayer,
    Quantizer,
    register_layer_format,
    register_quantizer,
)
from quantsafe.quantization.packing import pack_codes, unpack_codes

if TYPE_CHECKING:
    from quantsafe.quantization.config import QuantConfig
    from quantsafe.quantization.sequential import BlockContext

VALUE_BITS = 16  # codebook entries and row scales are stored as fp16
_EPS = 1e-9  # added to row norms, as the reference does, so an all-zero row divides safely
_SCORE_ELEMENTS = 1 << 22  # candidates × rows scored at once (16 MiB fp32): bounds memory for 2^16 codebooks
_KMEANS_CHECK_EVERY = 10  # convergence test cadence of the reference's k-means


@contextmanager
def _one_thread() -> Iterator[None]:
    """The greedy code pass is thousands of small ops; on a busy 2-core machine two OpenMP threads make each one
    wait for a descheduled worker (the same effect GPTQ's column loop measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- storage form


def aqlm_storage_bits(rows: int, cols: int, num_codebooks: int, nbits: int, in_group_size: int) -> int:
    """Codes (B bits per group per codebook) + fp16 codebooks + one fp16 scale per row (algorithms.md §8)."""
    groups = cols // in_group_size
    return (rows * groups * num_codebooks * nbits + num_codebooks * 2**nbits * in_group_size * VALUE_BITS
            + rows * VALUE_BITS)


@register_layer_format("aqlm")
@dataclass
class AQLMLayer(QuantizedLayer):
    """A Linear weight [rows, cols] as W[i, g·j : g·(j+1)] = scales[i] · Σ_m codebooks[m, codes[i, j, m]].

    On disk the codes are one little-endian bit stream of B bits each (packing.py); codes wider than 8 bits are
    split into their low byte and their remaining high bits, so storage is exactly B bits per code.
    """

    codes: torch.Tensor  # [rows, cols / g, M]: uint8 when B ≤ 8, int32 otherwise
    codebooks: torch.Tensor  # fp16 [M, 2^B, g]
    scales: torch.Tensor  # fp16 [rows]
    nbits: int
    # tr(ΔW H ΔWᵀ)/rows with the stored (fp16) values, as the per-Linear search left them (before any block
    # fine-tuning, which optimises the block output instead)
    loss: float | None = field(default=None)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1] * self.codebooks.shape[2]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight = _reconstruct(self.codes.long(), self.codebooks.float(), self.scales.float())
        return weight.to(dtype)

    def storage_bits(self) -> int:
        rows, cols = self.shape
        m, _, g = self.codebooks.shape
        return aqlm_storage_bits(rows, cols, int(m), self.nbits, int(g))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        codes = self.codes.cpu().long()
        out = {"codebooks": self.codebooks.cpu().contiguous(), "scales": self.scales.cpu().contiguous()}
        if self.nbits <= 8:
            out["codes"] = pack_codes(codes, self.nbits)
        else:
            out["codes"] = pack_codes(codes & 0xFF, 8)
            out["codes_hi"] = pack_codes(codes >> 8, self.nbits - 8)
        return out

    def meta(self) -> dict[str, Any]:
        m, _, g = self.codebooks.shape
        return {"num_codebooks": int(m), "nbits_per_codebook": self.nbits, "in_group_size": int(g)}

    @classmethod
    def from_tensors(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     ) -> AQLMLayer:
        nbits, g, m = int(meta["nbits_per_codebook"]), int(meta["in_group_size"]), int(meta["num_codebooks"])
        code_shape = (shape[0], shape[1] // g, m)
        if nbits <= 8:
            codes = unpack_codes(tensors["codes"], nbits, code_shape)
        else:
            low = unpack_codes(tensors["codes"], 8, code_shape).to(torch.int32)
            codes = low | (unpack_codes(tensors["codes_hi"], nbits - 8, code_shape).to(torch.int32) << 8)
        return cls(codes=codes, codebooks=tensors["codebooks"], scales=tensors["scales"], nbits=nbits)


def _reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """s_i · Σ_m C_m[codes[i, j, m]] as a dense [rows, cols] weight; differentiable in codebooks and scales."""
    rows, groups, m = codes.shape
    k, g = codebooks.shape[1], codebooks.shape[2]
    offsets = torch.arange(m, device=codes.device) * k
    vectors = codebooks.reshape(m * k, g)[(codes + offsets).reshape(-1)].reshape(rows, groups, m, g)
    return vectors.sum(dim=2).reshape(rows, groups * g) * scales[:, None]


# --------------------------------------------------------------------------------------------- the algorithm


def layer_loss(weight: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """The objective tr(ΔW H ΔWᵀ)/rows (H = XXᵀ/T): mean over rows of the output error per token."""
    delta = approx - weight
    return float(((delta @ xtx) * delta).sum() / weight.shape[0])


def kmeans(points: torch.Tensor, k: int, max_iter: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with `k` centres drawn at random from the points (with repetition only when there are
    fewer points than centres); empty clusters keep their centre. Converged when the centres stop moving
    (checked every 10 iterations, as the reference does)."""
    n = points.shape[0]
    pick = torch.randperm(n, generator=generator)
    if n < k:
        pick = torch.cat([pick, torch.randint(n, (k - n,), generator=generator)])
    centres = points[pick[:k].to(points.device)].clone()
    for it in range(max_iter):
        nearest = nearest_centres(points, centres)
        sums = torch.zeros_like(centres).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=k).to(points.dtype)[:, None]
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        done = it % _KMEANS_CHECK_EVERY == 0 and torch.allclose(new, centres, rtol=1e-6, atol=1e-8)
        centres = new
        if done:
            break
    return centres


def nearest_centres(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre of every point, in chunks of points so at most ~4M distances are live."""
    half_norms = centres.square().sum(dim=1) / 2
    chunk = max(1, _SCORE_ELEMENTS // centres.shape[0])
    out = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    for start in range(0, points.shape[0], chunk):
        # argmin ‖x − c‖² = argmax x·c − ‖c‖²/2 (`max` with indices: 3x faster than argmax on CPU)
        scores = (points[start : start + chunk] @ centres.T).sub_(half_norms)
        out[start : start + chunk] = scores.max(dim=1).indices
    return out


def residual_kmeans_init(weight: torch.Tensor, num_codebooks: int, nbits: int, in_group_size: int,
                         max_iter: int, max_points_per_centroid: int | None, generator: torch.Generator,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row scales (row L2 norms) and, for W / s, codes and codebooks by k-means on the residual 8-vectors,
    one codebook after the other. With `max_points_per_centroid` each k-means fits a random subset of
    that many points per centre; every point is then assigned to its nearest centre."""
    rows, cols = weight.shape
    k = 2**nbits
    scales = weight.norm(dim=1) + _EPS
    residual = (weight / scales[:, None]).reshape(-1, in_group_size).clone()
    codes, books = [], []
    for _ in range(num_codebooks):
        fit_on = residual
        if max_points_per_centroid is not None and residual.shape[0] > max_points_per_centroid * k:
            subset = torch.randperm(residual.shape[0], generator=generator)[: max_points_per_centroid * k]
            fit_on = residual[subset.to(residual.device)]
        centres = kmeans(fit_on, k, max_iter, generator)
        nearest = nearest_centres(residual, centres)
        residual -= centres[nearest]
        codes.append(nearest)
        books.append(centres)
    return (torch.stack(codes, dim=1).reshape(rows, cols // in_group_size, num_codebooks),
            torch.stack(books), scales)


def adam_codebooks_and_scales(weight: torch.Tensor, xtx: torch.Tensor, codes: torch.Tensor,
                              optimizer: torch.optim.Optimizer, codebooks: torch.Tensor, scales: torch.Tensor,
                              steps: int, stop_above: float = math.inf) -> float:
    """`steps` optimizer steps on the codebooks and scales (leaf tensors the optimizer owns), codes fixed;
    none when the loss before the first step exceeds `stop_above`. Returns that first loss.

    The gradient is written out instead of taken by autograd: the loss tr(ΔW H ΔWᵀ)/rows has gradient
    G = 2·ΔW H/rows w.r.t. Ŵ, so one matmul per step suffices (autograd through the quadratic form needs two),
    and Ŵ = s ⊙ U gives ∂/∂s_i = ⟨G_i, U_i⟩ and ∂/∂C_m[c] = Σ over the groups coded c of s_i·G_{i,J} (an
    index_add, 8x faster on CPU than autograd's indexing backward)."""
    rows = weight.shape[0]
    m, g = codebooks.shape[0], codebooks.shape[2]
    flat_codes = [codes[:, :, cb].reshape(-1) for cb in range(m)]
    first = math.nan
    for step in range(steps):
        with torch.no_grad():
            unscaled = _reconstruct(codes, codebooks, torch.ones_like(scales))
            delta = unscaled * scales[:, None] - weight
            grad = delta @ xtx
            loss = float((grad * delta).sum()) / rows
            if not math.isfinite(loss):
                raise QuantsafeError(f"AQLM: the layer loss became {loss}")
            if step == 0:
                first = loss
                if loss > stop_above:
                    break
            grad.mul_(2 / rows)
            scales.grad = (grad * unscaled).sum(dim=1)
            per_group = grad.mul_(scales[:, None]).reshape(-1, g)
            book_grad = torch.zeros_like(codebooks)
            for cb in range(m):
                book_grad[cb].index_add_(0, flat_codes[cb], per_group)
            codebooks.grad = book_grad
        optimizer.step()
    return first


@torch.no_grad()
def greedy_code_pass(weight: torch.Tensor, xtx: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                     scales: torch.Tensor, generator: torch.Generator, lazy_groups: int = 16) -> torch.Tensor:
    """One beam-search pass with beam size 1 (greedy coordinate descent): every (group j, codebook m) code in
    turn, groups in a random order and codebooks in a random order inside each group, is replaced by the
    candidate that minimises the layer loss with all other codes fixed. Returns the new codes.

    With r = W − Ŵ and r̃ = r + s·C_m[b_old] on the group's columns J, the loss of candidate c is
    r̃Hr̃ᵀ − 2s⟨C_m[c], (r̃H)_J⟩ + s²·C_m[c]ᵀ H_JJ C_m[c] per row (algorithms.md §5): one [rows, g] × [g, 2^B]
    product scores all candidates of all rows. The old code is a candidate, so the loss never increases.
    (rH)_J for `lazy_groups` groups is one matmul with r, corrected for the codes changed since (GPTQ's lazy
    batch): the result equals the plain sequential pass while reading r once per batch instead of per group.
    """
    rows, groups, m = codes.shape
    k, g = codebooks.shape[1], codebooks.shape[2]
    codes = codes.clone()
    residual = weight - _reconstruct(codes, codebooks, scales)
    s = scales[:, None]
    inv_s = torch.where(s != 0, 1 / torch.where(s != 0, s, 1), 0)
    order = torch.randperm(groups, generator=generator).tolist()
    # C_m[c]ᵀ H_JJ C_m[c] needs H_JJ per group; chunks of candidates keep rows × candidates bounded
    chunk = max(1, min(k, _SCORE_ELEMENTS // max(rows, 1)))
    for start in range(0, groups, lazy_groups):
        batch = order[start : start + lazy_groups]
        cols = torch.cat([torch.arange(j * g, (j + 1) * g, device=weight.device) for j in batch])
        rows_of_h = xtx[cols]  # = H[:, cols]ᵀ (H is symmetric): a row gather is a contiguous copy
        stale = residual @ rows_of_h.T  # (rH) on the batch's columns, before any change in this batch
        h_batch = rows_of_h[:, cols]
        changes = torch.zeros(rows, len(cols), dtype=weight.dtype, device=weight.device)  # r's change per column
        for t, j in enumerate(batch):
            here = slice(t * g, (t + 1) * g)
            h_jj = h_batch[here, here]
            h = stale[:, here] + changes[:, : t * g] @ h_batch[: t * g, here]
            for cb in torch.randperm(m, generator=generator).tolist():
                book = codebooks[cb]
                old_vec = book.index_select(0, codes[:, j, cb]).mul_(s)
                h_tilde = h + old_vec @ h_jj  # (r̃H)_J
                best = _best_candidates(book, h_jj, h_tilde.mul_(inv_s), chunk)
                diff = old_vec.sub_(book.index_select(0, best).mul_(s))  # r on J grows by s·(C_old − C_new)
                h = h + diff @ h_jj
                changes[:, here] += diff
                codes[:, j, cb] = best
            residual[:, j * g : (j + 1) * g] += changes[:, here]
    return codes


def _best_candidates(book: torch.Tensor, h_jj: torch.Tensor, h_over_s: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmin over candidates c of s²·C[c]ᵀ H_JJ C[c] − 2s⟨C[c], h̃⟩ per row, over chunks of candidates, given
    h̃/s (0 where s = 0: such a row is all zeros and every candidate has the same loss).

    That is s²·(C[c]ᵀ H_JJ C[c] − 2⟨C[c], h̃/s⟩): one fused product per chunk."""
    best_val = best_idx = torch.empty(0)
    for start in range(0, book.shape[0], chunk):
        cand = book[start : start + chunk]
        quad = ((cand @ h_jj) * cand).sum(dim=1)
        val, idx = torch.addmm(quad, h_over_s, cand.T, alpha=-2).min(dim=1)
        if start == 0:
            best_val, best_idx = val, idx
        else:
            better = val < best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + start, best_idx)
    return best_idx


# --------------------------------------------------------------------------------------------- the method


class AQLMOptions(BaseModel):
    """AQLM's knobs. The representation and optimiser follow the reference (main.py, aq_engine.py); the
    iteration budgets are cut so the 0.5B model quantizes in under an hour on 2 CPU cores (measured in the
    report of issue 7): reference steps_per_epoch 100, max_epochs 1000, init_max_iter 100."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 2×8: 1×16's 2^16×8 fp16 codebook alone is 12.5 bits/weight on an 896×896 layer (algorithms.md §5)
    num_codebooks: int = Field(2, ge=1)
    nbits_per_codebook: int = Field(8, ge=1, le=16)
    in_group_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    # reference 100; on SmolLM2 layers 5 / 10 / 20 / 50 steps end within 1-4% of each other's loss, while
    # every extra code pass still gains 1-2%: the budget goes to passes
    steps_per_epoch: int = Field(10, ge=1)
    max_epochs: int = Field(8, ge=1)  # reference 1000 (never reached there: the tolerance stops it first)
    relative_mse_tolerance: float = Field(0.01, ge=0, lt=1)  # the README commands' value
    beam_size: int = Field(1, ge=1)
    # reference 100 iterations on all points; 20 on ≤ 256 points per centre (FAISS's default cap) ends 0.5% above
    # that on a SmolLM2 down_proj in a third of the time, 10 on ≤ 64 points 4% above
    init_max_iter: int = Field(20, ge=0)
    init_max_points_per_centroid: int | None = Field(256, ge=1)
    # block fine-tuning (off: back-propagation through every block is the slowest part on a CPU)
    finetune: bool = False
    finetune_lr: float = Field(1e-5, gt=0)
    finetune_epochs: int = Field(5, ge=1)  # reference finetune_max_epochs 5; no validation split here

    @field_validator("beam_size")
    @classmethod
    def _greedy_only(cls, beam_size: int) -> int:
        if beam_size != 1:
            raise ValueError("only beam_size 1 (greedy coordinate descent, the reference's default) is implemented")
        return beam_size


@register_quantizer("aqlm")
class AQLMQuantizer(Quantizer):
    """Additive quantization with learned codebooks; `bits` must equal num_codebooks·nbits_per_codebook /
    in_group_size, and `group_size` is not used (the group is `in_group_size`). Each Linear takes about
    (steps_per_epoch + 1) × max_epochs products of its weight with its [cols, cols] input second moment.

    Sample YAML::

        method: aqlm
        bits: 2
        options: {num_codebooks: 2, nbits_per_codebook: 8, in_group_size: 8, steps_per_epoch: 10,
                  max_epochs: 8, relative_mse_tolerance: 0.01, init_max_iter: 20,
                  init_max_points_per_centroid: 256, finetune: false}
        calibration: {source: wikitext2, n_samples: 128, seq_len: 512}
    """

    version = 1
    needs_calibration = True
    stats = frozenset({"xtx"})
    Options = AQLMOptions

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.options = AQLMOptions.model_validate(self.config.options)
        o = self.options
        for where, bits in [("bits", config.bits), *((f"layer_bits['{p}']", b) for p, b in config.layer_bits.items())]:
            if bits * o.in_group_size != o.num_codebooks * o.nbits_per_codebook:
                raise QuantsafeError(
                    f"AQLM: {where} = {bits} does not match num_codebooks × nbits_per_codebook / in_group_size = "
                    f"{o.num_codebooks}×{o.nbits_per_codebook}/{o.in_group_size} = "
                    f"{o.num_codebooks * o.nbits_per_codebook / o.in_group_size:g} bits; e.g. bits 2 is 2×8 or "
                    "1×16, bits 3 is 3×8, bits 4 is 4×8 (with in_group_size 8)")
        self.generator = torch.Generator().manual_seed(config.seed)

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> AQLMLayer:
        if stats is None or stats.xtx is None:
            raise QuantsafeError("AQLM needs the layer's x xᵀ statistics")
        return aqlm_quantize(weight, stats.hessian(), self.options, self.generator)

    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedLayer]:
        if not self.options.finetune:
            return super().quantize_block(ctx)
        targets = ctx.forward()
        layers = super().quantize_block(ctx)
        finetune_block(ctx, layers, targets, self.options)  # type: ignore[arg-type]  # all are AQLMLayer
        return layers


def aqlm_quantize(weight: torch.Tensor, hessian: torch.Tensor, options: AQLMOptions,
                  generator: torch.Generator) -> AQLMLayer:
    """Quantize one Linear weight [rows, cols] against H = XXᵀ/T [cols, cols] (fp32 on the weight's device)."""
    o = options
    cols = weight.shape[1]
    if cols % o.in_group_size:
        raise QuantsafeError(f"AQLM: {cols} inputs are not a multiple of in_group_size {o.in_group_size}")
    w = weight.detach().float()
    h = hessian.to(device=w.device, dtype=torch.float32)
    codes, books, scales = residual_kmeans_init(w, o.num_codebooks, o.nbits_per_codebook, o.in_group_size,
                                                o.init_max_iter, o.init_max_points_per_centroid, generator)
    books.requires_grad_(True)
    scales.requires_grad_(True)
    optimizer = torch.optim.Adam([books, scales], lr=o.lr, betas=(0.0, 0.95), amsgrad=True)
    best = math.inf
    for _ in range(o.max_epochs):
        # the reference's test, loss / best > 1 − tolerance, made before any step of the epoch
        loss = adam_codebooks_and_scales(w, h, codes, optimizer, books, scales, o.steps_per_epoch,
                                         stop_above=best * (1 - o.relative_mse_tolerance))
        if loss > best * (1 - o.relative_mse_tolerance):
            break
        best = min(best, loss)
        with _one_thread():
            codes = greedy_code_pass(w, h, codes, books.detach(), scales.detach(), generator)
    return _finish(w, h, codes, books.detach(), scales.detach(), o.nbits_per_codebook)


def _finish(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
            scales: torch.Tensor, nbits: int) -> AQLMLayer:
    layer = AQLMLayer(codes=codes.to(torch.uint8 if nbits <= 8 else torch.int32), codebooks=codebooks.half(),
                      scales=scales.half(), nbits=nbits)
    layer.loss = layer_loss(weight, layer.dequantize(), hessian)
    return layer


def finetune_block(ctx: BlockContext, layers: dict[str, AQLMLayer], targets: list[torch.Tensor],
                   options: AQLMOptions) -> None:
    """Train codebooks, scales and the block's other float parameters (norms, biases) with Adam to match the
    full-precision block's outputs `targets` (MSE) on the same inputs, one step per cached batch; then write
    the results back: the Linears get their new dequantized weights, `layers` the new codebooks and scales."""
    from torch.func import functional_call

    block = ctx.block
    linear_weights = {f"{name}.weight" for name in layers}
    dtype = next(block.parameters()).dtype
    books = {n: layer.codebooks.float().requires_grad_(True) for n, layer in layers.items()}
    scales = {n: layer.scales.float().requires_grad_(True) for n, layer in layers.items()}
    codes = {n: layer.codes.long() for n, layer in layers.items()}
    others = {n: p.detach().float().requires_grad_(True) for n, p in block.named_parameters()
              if n not in linear_weights and p.is_floating_point()}
    params = [*books.values(), *scales.values(), *others.values()]
    optimizer = torch.optim.Adam(params, lr=options.finetune_lr, betas=(0.9, 0.95))
    with torch.enable_grad():
        for _ in range(options.finetune_epochs):
            for (hidden, kwargs), target in zip(ctx.inputs(), targets, strict=True):
                current = {f"{n}.weight": _reconstruct(codes[n], books[n], scales[n]).to(dtype) for n in layers}
                current |= {n: p.to(dtype) for n, p in others.items()}
                out = functional_call(block, current, (hidden,), kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = torch.nn.functional.mse_loss(out.float(), target.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        named = dict(block.named_parameters())
        for n, p in others.items():
            named[n].copy_(p)
        linears = ctx.linears
        for n, layer in layers.items():
            layer.codebooks = books[n].detach().half()
            layer.scales = scales[n].detach().half()
            linears[n].weight.copy_(layer.dequantize(dtype))
