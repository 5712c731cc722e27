"""Quantization-aware training with a straight-through estimator (STE), the paper's v2 QAT baseline following
GIFT-SW (algorithms.md §6).

Every Linear of the decoder blocks trains in full: its fp32 master copy W (fp32 even when the model runs in
bf16, where a 1e-5 step would vanish) is fake-quantized in every forward, Q(W) = s·clamp(round(W/s), −2^(b−1),
2^(b−1) − 1) with s = max|W_row| / (2^(b−1) − 1) recomputed from the current W (not learned), and the gradient
passes straight through to W. Embeddings, norms and lm_head stay frozen. At the end Q(W) is exported.

Grid: symmetric and signed, q ∈ {−2^(b−1), …, 2^(b−1) − 1}; int2 is {−2, −1, 0, 1}·s, int3 {−4 … 3}·s, int4
{−8 … 7}·s. Stored as a `UniformLayer` with zeros=None (implied zero 2^(b−1), unsigned codes q + 2^(b−1)), which
holds exactly this grid when its scale is this s: W = s·(code − 2^(b−1)). Since |W| ≤ max|W_row| = q_max·s,
the level −2^(b−1) is never reached with this scale: int2 STE weights take only {−1, 0, 1}·s (ternary), int4
15 of its 16 levels. s is rounded up to fp16 *before* it is used, in training and export alike, so the trained
forward and the stored weights are the same numbers.
`group_size` null is GIFT-SW's per-row grid; a group size gives one s per (row, group) instead.

Deviations from GIFT-SW's recipe (500 steps × batch 128 on TULU-V2-Mix, lr 1e-5, cosine, 3% warm-up, 128 of
4096 salient columns kept in full precision): the data are the calibration windows (TULU-V2-Mix is not available
offline; see `quantization.training`); the default budget is 32 steps × 2 windows × 256 tokens, minutes on two
CPU cores for the 0.5B model (GIFT-SW's budget would take weeks); no salient columns are kept, so the result is
a pure int-k model as the paper's tables label it (keeping ≈3% fp16 columns would add ≈0.5 bits per weight).
Adam (β 0.9/0.999, no weight decay) as in GIFT-SW; gradient clipping is not stated there and off here.
At lr 1e-5 for 32 steps a weight moves at most ≈3e-4, a small fraction of a 4-bit step: with these defaults STE
stays close to its own starting point (round-to-nearest on this grid); raise `steps`/`lr` on a GPU.

Sample YAML::

    method: ste
    bits: 3
    sym: true               # the default; `sym: false` is refused (STE's grid is the symmetric signed one)
    group_size: null        # the default: per row (GIFT-SW)
    options: {steps: 32, batch_size: 2, grad_accum: 1, window: 256, lr: 1.0e-5, schedule: cosine,
              warmup_ratio: 0.03}
    calibration: {source: wikitext2, n_samples: 32, seq_len: 512}   # training windows (or text_file)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from quantsafe.errors import QuantsafeError
from quantsafe.quantization.base import LayerStats, QuantizedLayer, Quantizer, register_quantizer
from quantsafe.quantization.config import QuantConfig
from quantsafe.quantization.sequential import Progress, block_linears, decoder_layers
from quantsafe.quantization.training import Schedule, TrainOptions, TrainReport, train, training_windows
from quantsafe.quantization.uniform import UniformLayer

_MIN_SCALE = torch.finfo(torch.float16).tiny


class STEOptions(TrainOptions):
    """STE training settings; GIFT-SW's where they fit a CPU (see the module docstring)."""

    steps: int = Field(32, ge=1)  # GIFT-SW: 500 (of batch 128); 32 keeps the 0.5B run to minutes on 2 cores
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)
    window: int | None = Field(256, ge=8)
    lr: float = Field(1e-5, gt=0)  # GIFT-SW's LLaMA-3 rate
    schedule: Schedule = "cosine"  # GIFT-SW
    warmup_ratio: float = Field(0.03, ge=0, lt=1)  # GIFT-SW
    max_grad_norm: float | None = Field(None, gt=0)  # not stated by GIFT-SW


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 values up to the next fp16 value (so the stored scale still covers max|W|)."""
    half = x.clamp(min=_MIN_SCALE).half()
    half = torch.where(half.float() < x, torch.nextafter(half, torch.full_like(half, torch.inf)), half)
    return half.float()


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`w` [rows, cols] as [rows, groups, g]; a partial last group is padded with zeros (max|W| unchanged)."""
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    groups = -(-cols // g)
    if groups * g != cols:
        w = torch.cat([w, w.new_zeros(rows, groups * g - cols)], dim=1)
    return w.reshape(rows, groups, g)


def ste_scale(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """s = max|W| / (2^(b−1) − 1) per (row, group), rounded up to fp16 (fp32 [rows, groups])."""
    return _fp16_up(_grouped(w.detach().float(), group_size).abs().amax(dim=2) / (2 ** (bits - 1) - 1))


def ste_codes(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Signed integer levels clamp(round(W/s), −2^(b−1), 2^(b−1) − 1) (fp32 [rows, cols])."""
    cols = w.shape[1]
    grouped = _grouped(w.detach().float(), group_size)
    q = torch.clamp(torch.round(grouped / scale[..., None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.reshape(w.shape[0], -1)[:, :cols]


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Q(W) in the forward, identity in the backward. Written q + (W − W.detach()) rather than
    W + (Q(W) − W).detach(): the same gradient, and the forward value is exactly Q(W) (x − x is exactly 0)."""
    with torch.no_grad():
        scale = ste_scale(w, bits, group_size)
        idx = torch.arange(w.shape[1], device=w.device) // (w.shape[1] if group_size is None else group_size)
        q = ste_codes(w, scale, bits, group_size) * scale[:, idx]
    return q + (w - w.detach())


def ste_export(w: torch.Tensor, bits: int, group_size: int | None) -> UniformLayer:
    """Q(W) as stored: unsigned codes q + 2^(b−1), fp16 scales s, implied zero 2^(b−1)."""
    scale = ste_scale(w, bits, group_size)
    codes = ste_codes(w, scale, bits, group_size) + 2 ** (bits - 1)
    return UniformLayer(codes=codes.to(torch.uint8), scales=scale.half(), zeros=None, bits=bits,
                        group_size=group_size)


def _fake_quant_forward(linear: nn.Linear, master: torch.Tensor, bits: int, group_size: int | None,
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(master, bits, group_size).to(x.dtype), linear.bias)

    return forward


@register_quantizer("ste")
class STEQuantizer(Quantizer):
    """Full fine-tuning of the decoder-block Linears through a symmetric per-row fake quantizer (GIFT-SW)."""

    version = 1
    needs_calibration = True
    Options = STEOptions
    config_defaults: ClassVar[dict[str, Any]] = {"group_size": None, "sym": True}  # GIFT-SW's per-row grid

    def __init__(self, config: QuantConfig) -> None:
        super().__init__(config)
        if not config.sym:
            raise QuantsafeError("method 'ste' trains on the symmetric signed grid: set `sym: true` in its config")
        self.options = STEOptions.model_validate(config.options)
        self.report: TrainReport | None = None  # the last training run (losses per step, wall time)

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> UniformLayer:
        """Q(W) of an (already trained) weight; with no training this is round-to-nearest on STE's grid."""
        return ste_export(weight, self.bits_for(name), self.config.group_size)

    def quantize_model(self, model: nn.Module, tokens: torch.Tensor | None, batch_size: int = 8,
                       progress: Progress | None = None) -> dict[str, QuantizedLayer]:
        """Train, then export. `batch_size` (the pipeline's forward batch) is unused: the training batch is an
        option, so it is part of the artifact id."""
        if tokens is None:
            raise QuantsafeError("method 'ste' trains on the calibration windows and got none")
        targets = {f"model.layers.{i}.{name}": (name, linear)
                   for i, block in enumerate(decoder_layers(model)) for name, linear in block_linears(block).items()}
        model.requires_grad_(False)
        masters: dict[str, torch.Tensor] = {}
        group_size = self.config.group_size
        try:
            for full, (name, linear) in targets.items():
                master = linear.weight.detach().to(torch.float32, copy=True).requires_grad_(True)
                masters[full] = master
                module: nn.Module = linear  # an instance attribute shadows Linear.forward until deleted
                module.forward = _fake_quant_forward(linear, master, self.bits_for(name), group_size)
            params = list(masters.values())
            optimizer = torch.optim.Adam(params, lr=self.options.lr, betas=(0.9, 0.999), weight_decay=0.0)
            self.report = train(model, params, optimizer, training_windows(tokens, self.options.window),
                                self.options, self.config.seed, progress)
        finally:
            for _, linear in targets.values():
                if "forward" in vars(linear):
                    del linear.forward
        results: dict[str, QuantizedLayer] = {}
        with torch.no_grad():
            for full, (name, linear) in targets.items():
                layer = ste_export(masters.pop(full), self.bits_for(name), group_size)
                linear.weight.copy_(layer.dequantize(linear.weight.dtype))
                results[full] = layer
        return results
