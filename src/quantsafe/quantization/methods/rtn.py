"""Round-to-nearest: the calibration-free baseline every calibrated method must beat."""

from __future__ import annotations

import torch

from quantsafe.quantization.base import LayerStats, Quantizer, register_quantizer
from quantsafe.quantization.uniform import UniformLayer, fit_grid, quantize_to_codes


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None, sym: bool) -> UniformLayer:
    """Fit a min-max grid per (row, group of `group_size` consecutive columns); round every weight to it."""
    w = weight.detach().float()
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    n_groups = -(-cols // g)
    pad = n_groups * g - cols
    if pad:  # repeat the last column: it cannot change a group's min or max
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    grouped = w.reshape(rows * n_groups, g)
    scale, zero = fit_grid(grouped, bits, sym)
    codes = quantize_to_codes(grouped, scale, zero, bits).reshape(rows, n_groups * g)[:, :cols]
    return UniformLayer(
        codes=codes.to(torch.uint8),
        scales=scale.reshape(rows, n_groups).half(),
        zeros=None if sym else zero.reshape(rows, n_groups).to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


@register_quantizer("rtn")
class RTNQuantizer(Quantizer):
    """Per-group min-max round-to-nearest (asymmetric by default); no calibration.

    Sample YAML::

        method: rtn
        bits: 4
        group_size: 64
    """

    version = 1

    def quantize(self, weight: torch.Tensor, stats: LayerStats | None, name: str) -> UniformLayer:
        return rtn_quantize(weight, self.bits_for(name), self.config.group_size, self.config.sym)
