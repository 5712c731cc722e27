"""QuIP# (Tseng et al., ICML 2024), without fine-tuning (algorithms.md §4): randomized Hadamard incoherence on
both sides, BlockLDLQ (g = 8) onto the E8P12 lattice codebook, greedy tuning passes, and for 4 bits a
two-stage residual of E8P12 (`E8P12RVQ4B`, what the reference paper's 4-bit checkpoints use).

Per Linear W [m, n] with proxy Hessian H = E[x xᵀ] of its inputs:
1. H ← H / mean(diag H) + σ·I (`sigma_reg`).
2. U = RHT_n, V = RHT_m (random signs, then Had_K ⊗ Had_2^p with a random orthogonal K×K factor for the odd
   part K: QuIP-for-all's `use_rand`); W' = V W Uᵀ, H' = U H Uᵀ.
3. W'/σ_W with σ_W = RMS(W')/ρ (rounded to fp16 first, so the stored scale is the one used).
4. BlockLDLQ: H' = L̃ D L̃ᵀ (L̃ unit block-lower-triangular, 8×8 blocks); the 8-column blocks are quantized
   last to first, Ŵ_k = Q(W_k + Σ_{j>k} (W_j − Ŵ_j) L̃_jk); then `tune_iters` greedy passes
   Ŵ_k ← Q(Ŵ_k + (W − Ŵ) H'_{:,k} (H'_kk)⁻¹). Q is the exact nearest E8P12 codeword (or its 2-stage residual).
5. Ŵ = diag(s_m)·Had_mᵀ·(σ_W Ŵ')·Had_n·diag(s_n) is the weight the model uses (`E8PLayer.dequantize`).

Hessians come from the full-precision model (`inputs_from = "fp"`), as in the reference code, which computes
them offline from the FP16 model. Linears that share an input (q/k/v, gate/up) share the input-side transform
and one stacked BlockLDLQ (as the official code's fusion; each keeps its own output side and σ_W), which gives
the same result as quantizing each alone with that transform. Not implemented: the 3-bit codebook (E8P12RVQ3B)
and fine-tuning (§4.7), so results are QuIP# "no-FT".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.base import (
    InputsFrom,
    LayerStats,
    QuantizedLayer,
    Quantizer,
    register_layer_format,
    register_quantizer,
)
from quantsafe.quantization.e8p import DIM, dequantize_rvq, quantize_rvq, to_int16
from quantsafe.quantization.hadamard import RandomizedHadamard, random_hadamard
from quantsafe.quantization.packing import pack_codes, unpack_codes

if TYPE_CHECKING:
    from quantsafe.quantization.config import QuantConfig
    from quantsafe.quantization.sequential import BlockContext

STAGES = {2: 1, 4: 2}  # bits → E8P stages (16-bit code per 8 weights each)
CODE_BITS = 16
SCALE_BITS = 16  # σ_W, fp16
ROT_BITS = 32  # the K×K orthogonal factors, fp32
_MIN_SCALE = torch.finfo(torch.float16).tiny
BUFFER_BLOCKS = 16  # 8-column blocks whose feedback is applied by one matmul (the reference's 128-column buffer)

Codebook = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class QuipSharpOptions(BaseModel):
    """QuIP#'s knobs, the reference defaults (quip-sharp / QuIP-for-all) unless noted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma_reg: float = Field(0.01, gt=0)
    tune_iters: int = Field(10, ge=0)  # `quip_tune_iters`, the code default
    # ρ for 2-bit E8P: the README's `--scale_override 0.9` (the code default 1.03 is tuned for Gaussian inputs).
    scale_e8p: float = Field(0.9, gt=0)
    scale_rvq4: float = Field(1.03, gt=0)  # ρ of the RVQ-4 first stage (`opt_scale`)
    resid_scale_rvq4: float = Field(3.45, gt=0)  # the RVQ-4 residual multiplier (`opt_resid_scale`)


@register_layer_format("e8p")
@dataclass
class E8PLayer(QuantizedLayer):
    """A Linear [rows, cols] as E8P12 codes in the Hadamard-rotated basis.

    W = diag(s_out)·R_outᵀ·(scale · decode(codes))·R_in·diag(s_in), with R = rot ⊗ Had_2^p on either side and
    decode(codes) = Σ_k stage_k / resid_scale^k over the code stages. Signs are stored as bits, the rotations
    as fp32 (counted in `storage_bits`); the 2¹⁶-entry E8P table is shared and, as in §8, not counted.
    """

    codes: torch.Tensor  # int16 [rows, cols // 8, stages]
    scale: torch.Tensor  # fp16 [1], σ_W
    signs_in: torch.Tensor  # ±1 fp32 [cols] (s_n, the code's SU)
    signs_out: torch.Tensor  # ±1 fp32 [rows] (s_m, the code's SV)
    rot_in: torch.Tensor | None  # fp32 [K_n, K_n]; None when cols is a power of 2
    rot_out: torch.Tensor | None  # fp32 [K_m, K_m]
    resid_scale: float
    loss: float | None = None  # tr(ΔW H ΔWᵀ) with the regularised H

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]) * DIM)

    @property
    def stages(self) -> int:
        return int(self.codes.shape[2])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        w = dequantize_rvq(self.codes, self.resid_scale).reshape(rows, cols) * self.scale.float()
        w = RandomizedHadamard(self.signs_in, self.rot_in).inverse(w)
        return RandomizedHadamard(self.signs_out, self.rot_out).inverse(w.T.contiguous()).T.to(dtype)

    def storage_bits(self) -> int:
        rows, cols = self.shape
        rots = sum(r.numel() for r in (self.rot_in, self.rot_out) if r is not None)
        return rows * (cols // DIM) * self.stages * CODE_BITS + rows + cols + SCALE_BITS + rots * ROT_BITS

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "codes": self.codes.cpu().contiguous(),
            "scale": self.scale.cpu().contiguous(),
            "su": pack_codes((self.signs_in < 0).to(torch.uint8).cpu(), 1),
            "sv": pack_codes((self.signs_out < 0).to(torch.uint8).cpu(), 1),
        }
        if self.rot_in is not None:
            out["rot_in"] = self.rot_in.cpu().contiguous()
        if self.rot_out is not None:
            out["rot_out"] = self.rot_out.cpu().contiguous()
        return out

    def meta(self) -> dict[str, Any]:
        return {"stages": self.stages, "resid_scale": self.resid_scale}

    @classmethod
    def from_tensors(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                     ) -> E8PLayer:
        rows, cols = shape

        def signs(key: str, n: int) -> torch.Tensor:
            return 1 - 2 * unpack_codes(tensors[key], 1, (n,)).float()

        return cls(
            codes=tensors["codes"],
            scale=tensors["scale"],
            signs_in=signs("su", cols),
            signs_out=signs("sv", rows),
            rot_in=tensors.get("rot_in"),
            rot_out=tensors.get("rot_out"),
            resid_scale=float(meta["resid_scale"]),
        )


@contextmanager
def _one_thread() -> Iterator[None]:
    """The block loop is many small ops: on a busy 2-core machine a second OpenMP thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def block_ldl(h: torch.Tensor, block: int = DIM) -> torch.Tensor:
    """L̃ with H = L̃ D L̃ᵀ, L̃ unit block-lower-triangular (8×8 identity diagonal blocks): L̃ = L·blockdiag(L_kk)⁻¹
    for the Cholesky factor L; retried in fp64 when fp32 fails."""
    n = h.shape[0]
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0 or not torch.isfinite(lower).all():
        lower, info = torch.linalg.cholesky_ex(h.double())
        if info.item() != 0:
            raise QuantsafeError("QuIP#: the regularised Hessian is not positive definite")
    nb = n // block
    diag = torch.diagonal(lower.reshape(nb, block, nb, block), dim1=0, dim2=2).permute(2, 0, 1)
    unit = torch.matmul(lower.reshape(n, nb, block).transpose(0, 1), torch.linalg.inv(diag))
    return unit.transpose(0, 1).reshape(n, n).to(h.dtype)


def block_ldlq(w: torch.Tensor, h: torch.Tensor, codebook: Codebook, tune_iters: int,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockLDLQ then greedy tuning of w [m, n] (n divisible by 8) against h [n, n]; returns (Ŵ, codes [m, n/8, ·]).

    Feedback from blocks outside the current buffer of 16 blocks is applied by one matmul per buffer. Rows are
    independent given H and a tuning pass depends only on a row's own state, so a row that came out of a pass
    unchanged is a fixed point of every later pass: those passes skip it (the same algorithm, up to float
    rounding of the targets; on a 512×576 layer only 4 rows were still changing by pass 10, and the skipping
    cuts 10 passes to the work of about 4)."""
    m, n = w.shape
    nb = n // DIM
    unit = block_ldl(h)
    hat = torch.zeros_like(w)
    stages = codebook(w[:1, :DIM])[1].shape[1]
    codes = torch.zeros(m, nb, stages, dtype=torch.int64, device=w.device)

    buffers = [(max(0, end - BUFFER_BLOCKS), end) for end in range(nb, 0, -BUFFER_BLOCKS)]
    for b0, b1 in buffers:
        c0, c1 = b0 * DIM, b1 * DIM
        acc = (w[:, c1:] - hat[:, c1:]) @ unit[c1:, c0:c1]
        with _one_thread():
            for k in reversed(range(b0, b1)):
                s, local = slice(k * DIM, (k + 1) * DIM), slice(k * DIM - c0, (k + 1) * DIM - c0)
                hat[:, s], codes[:, k] = codebook(w[:, s] + acc[:, local])
                acc[:, : k * DIM - c0] += (w[:, s] - hat[:, s]) @ unit[s, c0 : k * DIM]

    diag_inv = torch.linalg.inv(torch.diagonal(h.reshape(nb, DIM, nb, DIM), dim1=0, dim2=2).permute(2, 0, 1))
    active = torch.arange(m, device=w.device)
    for _ in range(tune_iters):
        if not len(active):
            break
        sub_hat, sub_codes = hat[active], codes[active]
        delta = w[active] - sub_hat
        changed = torch.zeros(len(active), dtype=torch.bool, device=w.device)
        for b0, b1 in buffers:
            c0, c1 = b0 * DIM, b1 * DIM
            prod = delta @ h[:, c0:c1]
            with _one_thread():
                for k in reversed(range(b0, b1)):
                    s, local = slice(k * DIM, (k + 1) * DIM), slice(k * DIM - c0, (k + 1) * DIM - c0)
                    new, sub_codes[:, k] = codebook(sub_hat[:, s] + prod[:, local] @ diag_inv[k])
                    change = new - sub_hat[:, s]
                    changed |= (change != 0).any(dim=1)
                    sub_hat[:, s] = new
                    delta[:, s] -= change
                    prod -= change @ h[s, c0:c1]
        hat[active], codes[active] = sub_hat, sub_codes
        active = active[changed]
    return hat, codes


def proxy_loss(delta: torch.Tensor, h: torch.Tensor) -> float:
    """tr(Δ H Δᵀ)."""
    return float(((delta @ h) * delta).sum())


def _seed(seed: int, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"quip_sharp:{seed}:{what}".encode()).digest()[:8], "little") >> 1


@register_quantizer("quip_sharp")
class QuipSharpQuantizer(Quantizer):
    """QuIP# without fine-tuning: 2 bits = E8P12, 4 bits = E8P12RVQ4B. `group_size` and `sym` do not apply.

    Linears that read the same input (q/k/v, gate/up) at the same width share the input-side transform and
    run as one BlockLDLQ over their stacked rows: rows are independent given H, so this equals quantizing each
    alone with that transform, with fewer, larger steps. (The official code fuses them the same way;
    QuIP-for-all draws an input-side transform per Linear.) Each keeps its own output side and scale. Signs
    and rotations come from `seed` and the Linears' full names, so runs are reproducible; all are stored.

    Sample YAML::

        method: quip_sharp
        bits: 2
        options: {sigma_reg: 0.01, tune_iters: 10, scale_e8p: 0.9, scale_rvq4: 1.03, resid_scale_rvq4: 3.45}
        calibration: {source: wikitext2, n_samples: 128, seq_len: 512}
    """

    version = 1
    needs_calibration = True
    stats = frozenset({"xtx"})
    Options = QuipSharpOptions

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        self.options = QuipSharpOptions.model_validate(self.config.options)
        self._prefix = ""

    @property
    def inputs_from(self) -> InputsFrom:
        return "fp"

    @torch.no_grad()
    def quantize_block(self, ctx: BlockContext) -> dict[str, QuantizedLayer]:
        self._prefix = f"model.layers.{ctx.index}."
        linears = ctx.linears
        groups = ctx.input_groups()
        stats = ctx.collect_stats([n for g in groups for n in g], self.stats)
        results: dict[str, QuantizedLayer] = {}
        for group in groups:
            for bits in dict.fromkeys(self.bits_for(n) for n in group):
                names = [n for n in group if self.bits_for(n) == bits]
                layers = self.quantize_stack([(n, linears[n].weight) for n in names], stats[names[0]])
                for name, layer in zip(names, layers, strict=True):
                    linears[name].weight.copy_(layer.dequantize(linears[name].weight.dtype))
                    results[name] = layer
        return results

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> E8PLayer:
        return self.quantize_stack([(name, weight)], stats)[0]

    def quantize_stack(self, weights: list[tuple[str, torch.Tensor]], stats: LayerStats | None) -> list[E8PLayer]:
        """Quantize Linears (name relative to the block, weight) that share one input and one bit width."""
        full = [self._prefix + name for name, _ in weights]
        what = f"QuIP# ({', '.join(full)})"
        bits = self.bits_for(weights[0][0])
        if bits not in STAGES:
            raise QuantsafeError(f"{what}: {bits} bits is not supported; use 2 (E8P12) or 4 (E8P12RVQ4B)")
        if stats is None:
            raise QuantsafeError(f"{what} needs calibration statistics (the layers' input Hessian)")
        cols = int(weights[0][1].shape[1])
        if cols % DIM:
            raise QuantsafeError(f"{what}: {cols} input columns is not a multiple of {DIM}")
        opts, dev = self.options, weights[0][1].device
        rht_in = random_hadamard(cols, torch.Generator().manual_seed(_seed(self.config.seed, f"{full[0]}:in")),
                                 dev, f"{what} input side")

        h = stats.hessian().float()
        h = h / torch.diagonal(h).mean()
        h.diagonal().add_(opts.sigma_reg)
        h = rht_in.forward(rht_in.forward(h).T.contiguous())
        h = (h + h.T) / 2

        stages = STAGES[bits]
        rho = opts.scale_e8p if stages == 1 else opts.scale_rvq4
        resid = opts.resid_scale_rvq4
        parts = []
        for name, weight in zip(full, (w for _, w in weights), strict=True):
            gen = torch.Generator().manual_seed(_seed(self.config.seed, f"{name}:out"))
            rht_out = random_hadamard(int(weight.shape[0]), gen, dev, f"QuIP# ({name}) output side")
            w = rht_out.forward(rht_in.forward(weight.detach().float()).T.contiguous()).T.contiguous()
            scale = (w.square().mean().sqrt() / rho).clamp(min=_MIN_SCALE).to(torch.float16).reshape(1)
            parts.append((rht_out, w, scale))
        stacked = torch.cat([w / scale.float() for _, w, scale in parts])
        hat, codes = block_ldlq(stacked, h, lambda x: quantize_rvq(x, stages, resid), opts.tune_iters)

        layers = []
        start = 0
        for rht_out, w, scale in parts:
            rows = slice(start, start + w.shape[0])
            start += w.shape[0]
            layer = E8PLayer(codes=to_int16(codes[rows]), scale=scale, signs_in=rht_in.signs,
                             signs_out=rht_out.signs, rot_in=rht_in.rot, rot_out=rht_out.rot, resid_scale=resid)
            layer.loss = proxy_loss(hat[rows] * scale.float() - w, h)
            layers.append(layer)
        return layers
